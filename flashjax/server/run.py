"""Running the server: bind, serve with uvicorn, and stop cleanly on Ctrl-C or SIGTERM.

On the first signal the server stops accepting connections, refuses the requests still waiting for
the engine (503), lets the running one finish for up to `shutdown_timeout_s`, then cancels it (the
engine stops at its next token), closes the engine and returns 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import threading
from typing import Callable

import uvicorn

from flashjax.server.app import create_app
from flashjax.server.config import ServerConfig
from flashjax.server.worker import Worker

log = logging.getLogger("flashjax.server")


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, worker: Worker):
        super().__init__(config)
        self.worker = worker

    async def shutdown(self, sockets=None) -> None:
        # Refuse what is still queued at once, before uvicorn waits for the open connections: only the
        # running request gets the grace period.
        self.worker.begin_shutdown()
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises the signal once it has shut down, so the process would end as killed by it
        # (exit 130 or 143). A server asked to stop that stopped cleanly exits 0.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so a taken port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    # Listening now, not when uvicorn starts: a client that connects meanwhile waits in the backlog
    # instead of being refused.
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _configure_logging(level: str) -> None:
    logger = logging.getLogger("flashjax.server")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s:     flashjax: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False


def serve(load: Callable[[], object], config: ServerConfig) -> int:
    """Serves the model that `load()` returns (called once, on the engine thread) until a signal.
    Returns the process exit code: 0 after a requested stop, 2 when the model failed to load."""
    _configure_logging(config.log_level)
    sock = listen(config.host, config.port)
    host, port = sock.getsockname()[:2]
    failures: list[str] = []
    server: _Server | None = None

    def on_failure(message: str) -> None:
        failures.append(message)
        if server is not None:
            server.should_exit = True  # read by uvicorn's main loop every 0.1 s

    worker = Worker(load, config, on_failure=on_failure)
    uv_config = uvicorn.Config(create_app(worker, config), host=host, port=port, log_level=config.log_level,
                               timeout_graceful_shutdown=config.shutdown_timeout_s, lifespan="on", ws="none")
    server = _Server(uv_config, worker)
    shown = f"[{host}]" if ":" in host else host
    log.info("serving %s on http://%s:%d (loading the model; /health answers 503 until it is ready)",
             config.model_name, shown, port)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if failures:
        return 2
    log.info("stopped")
    return 0
