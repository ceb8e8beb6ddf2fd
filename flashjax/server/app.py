"""The HTTP side: routes, the API key, body limits, and turning engine events into OpenAI responses.

Handlers never touch the engine: they validate, encode the prompt, queue a `worker.Job` and relay its
events. Every refusal is an `ApiError` (errors.py), rendered in OpenAI's shape by one handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import pathlib
import time

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from flashjax.server import prompts, schema, sse
from flashjax.server.config import ServerConfig
from flashjax.server.errors import ApiError, bad_request
from flashjax.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from flashjax.server.responses import Reply
from flashjax.server.worker import READY, Delta, Failed, Finished, Job, Started, Worker

log = logging.getLogger("flashjax.server")

STATIC = pathlib.Path(__file__).parent / "static"
# Open without the API key: the health probe, and the chat page's static files (the page holds no
# data; it asks for the key before it calls the API).
PUBLIC_PATHS = ("/health", "/")
PUBLIC_PREFIXES = ("/static/",)
KEEP_ALIVE_S = 15.0  # a queued stream sends a comment this often, so idle-timeout proxies keep it open
DISCONNECT_POLL_S = 1.0  # how often a non-streamed request checks that its client is still there


@dataclasses.dataclass(frozen=True)
class AppState:
    worker: Worker
    config: ServerConfig


def create_app(worker: Worker, config: ServerConfig) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        worker.start()  # loads the model in the background: /health says 503 until it is ready
        yield
        await run_in_threadpool(worker.stop)

    routes = [
        Route("/health", health),
        Route("/v1/models", list_models),
        Route("/v1/models/{model:path}", get_model),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/metrics", metrics),
        Route("/", page),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(CountRequests, worker=worker),
                                Middleware(RequireApiKey, api_key=config.api_key)],
                    exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _server_error})
    app.state.flashjax = AppState(worker, config)
    return app


def _state(request: Request) -> AppState:
    return request.app.state.flashjax


# ---- errors -------------------------------------------------------------------------------------

def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    # Routing's own refusals (404, 405) in OpenAI's shape too.
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(ApiError(exc.status_code, message, None, exc.detail.lower().replace(" ", "_"),
                                   dict(exc.headers or {})))


async def _server_error(request: Request, exc: Exception) -> Response:
    # Only a bug gets here (bad input is an ApiError); the server keeps serving.
    log.exception("internal error on %s %s", request.method, request.url.path)
    return error_response(ApiError(500, f"internal server error: {type(exc).__name__}", None, "internal_error"))


# ---- middleware ---------------------------------------------------------------------------------

class RequireApiKey:
    """`Authorization: Bearer KEY` on every path but the public ones, compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str | None):
        self.app = app
        self.expected = None if api_key is None else f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.expected is not None and not _public(scope["path"]):
            given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
            if not hmac.compare_digest(given, self.expected):
                error = ApiError(401, "a valid API key is required: send the header Authorization: Bearer KEY",
                                 None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class CountRequests:
    """flashjax_requests{route, status} for every HTTP response."""

    ROUTES = ("/health", "/v1/models", "/v1/chat/completions", "/v1/completions", "/metrics", "/")

    def __init__(self, app: ASGIApp, worker: Worker):
        self.app, self.worker = app, worker

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = path if path in self.ROUTES else "/static" if path.startswith("/static/") else \
            "/v1/models" if path.startswith("/v1/models/") else "other"

        async def counting_send(message) -> None:
            if message["type"] == "http.response.start":
                self.worker.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


# ---- simple endpoints ---------------------------------------------------------------------------

async def health(request: Request) -> Response:
    worker = _state(request).worker
    if worker.state == READY:
        return JSONResponse({"status": "ok"})
    try:
        worker.require_ready()
    except ApiError as e:
        return JSONResponse({"status": worker.state, **e.body()}, status_code=503, headers=e.headers)
    raise AssertionError("unreachable")


def _model_card(worker: Worker) -> dict:
    info = worker.info
    return {"id": info.name, "object": "model", "created": 0, "owned_by": "flashjax",
            "context_length": info.context_length, "memory_plan": info.memory_plan}


async def list_models(request: Request) -> Response:
    worker = _state(request).worker
    worker.require_ready()
    return JSONResponse({"object": "list", "data": [_model_card(worker)]})


async def get_model(request: Request) -> Response:
    worker = _state(request).worker
    worker.require_ready()
    name = request.path_params["model"]
    if name != worker.info.name:
        raise ApiError(404, f"the model {name!r} does not exist; this server has {worker.info.name!r}", "model",
                       "model_not_found")
    return JSONResponse(_model_card(worker))


async def metrics(request: Request) -> Response:
    return Response(_state(request).worker.metrics.render(), media_type=METRICS_CONTENT_TYPE)


async def page(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


# ---- completions --------------------------------------------------------------------------------

async def chat_completions(request: Request) -> Response:
    return await _complete(request, schema.parse_chat)


async def completions(request: Request) -> Response:
    return await _complete(request, schema.parse_completion)


async def read_json(request: Request, limit: int):
    """The body as JSON, refused (413) past `limit` bytes without reading the rest."""
    too_large = ApiError(413, f"the request body is over the limit of {limit} bytes", None, "body_too_large")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request(f"Content-Length {declared!r} is not a number", None, "invalid_header")
        if int(declared) > limit:
            raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    if not body.strip():
        raise bad_request("the request body is empty: send a JSON object", None, "invalid_json")
    try:
        return json.loads(bytes(body))
    except RecursionError:
        raise bad_request("the request body is nested too deeply", None, "invalid_json") from None
    except ValueError as e:  # JSONDecodeError, and UnicodeDecodeError for bytes that are not UTF-8
        raise bad_request(f"the request body is not valid JSON: {e}", None, "invalid_json") from None


class Channel:
    """A request's events, from the engine thread to the request's coroutine."""

    def __init__(self):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, event) -> None:  # the engine thread
        self._loop.call_soon_threadsafe(self._queue.put_nowait, event)

    async def get(self, timeout: float):
        return await asyncio.wait_for(self._queue.get(), timeout)


async def _complete(request: Request, parse) -> Response:
    received_at = time.perf_counter()
    state = _state(request)
    worker = state.worker
    worker.require_ready()
    req = parse(await read_json(request, state.config.max_body_bytes))
    prompt = await run_in_threadpool(prompts.encode, worker.llm, req, worker.info.context_length,
                                     state.config.default_max_tokens)
    reply = Reply.new(req.kind, worker.info.name)
    channel = Channel()
    job = Job(reply.id, prompt, req.sampling, req.stop, channel.put, received_at)
    worker.submit(job)
    if req.stream:
        return sse.EventStreamResponse(_stream(channel, job, reply, req.include_usage), on_close=job.cancel)
    try:
        return await _collect(request, channel, reply)
    finally:
        job.cancel()  # a no-op once finished; stops the engine if this request's task was cancelled


async def _collect(request: Request, channel: Channel, reply: Reply) -> Response:
    texts = []
    while True:
        try:
            event = await channel.get(DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return Response(status_code=499)  # nobody reads it; the finally above cancels the job
            continue
        if isinstance(event, Delta):
            texts.append(event.text)
        elif isinstance(event, Finished):
            return JSONResponse(reply.body("".join(texts), event))
        elif isinstance(event, Failed):
            return error_response(event.error)


async def _stream(channel: Channel, job: Job, reply: Reply, include_usage: bool):
    """SSE events for one request: the role, each piece of text, the finish, usage, then [DONE]."""
    while True:
        try:
            event = await channel.get(KEEP_ALIVE_S)
        except asyncio.TimeoutError:
            yield sse.KEEP_ALIVE
            continue
        if isinstance(event, Started):
            first = reply.first_chunk(include_usage)
            if first is not None:
                yield sse.event(first)
        elif isinstance(event, Delta):
            yield sse.event(reply.text_chunk(event.text, include_usage))
        elif isinstance(event, Finished):
            for chunk in reply.final_chunks(event, include_usage):
                yield sse.event(chunk)
            yield sse.DONE
            return
        elif isinstance(event, Failed):
            # Headers (200) are already sent: the error travels in the stream, as OpenAI's does.
            yield sse.event(event.error.body())
            yield sse.DONE
            return
