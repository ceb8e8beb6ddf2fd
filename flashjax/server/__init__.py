"""`flashjax serve`: an OpenAI-compatible HTTP server with streaming, metrics and a chat page.

    config.py     ServerConfig: where it listens, what it accepts (one frozen dataclass)
    schema.py     the OpenAI request bodies, checked into a CompletionRequest
    prompts.py    a request's prompt as token ids, checked against the loaded model
    worker.py     the engine thread: loads the model, serves one queued request at a time
    stops.py      stop strings over streamed text
    responses.py  OpenAI response bodies and stream chunks
    sse.py        server-sent events, and a response that notices a client leaving
    metrics.py    Prometheus metrics
    app.py        routes, API key, body limit, errors
    run.py        binding, uvicorn, clean shutdown on a signal
    static/       the chat page (plain HTML, CSS and JavaScript)
"""

from flashjax.server.config import ServerConfig


def serve(load, config: ServerConfig) -> int:
    """Serves the model `load()` returns until Ctrl-C or SIGTERM: see `flashjax.server.run.serve`."""
    from flashjax.server.run import serve as run

    return run(load, config)


__all__ = ["ServerConfig", "serve"]
