"""The server's settings: one frozen dataclass, checked in one place before anything starts."""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """How `flashjax serve` listens and what it accepts (the engine's own options are `LLM.load`'s)."""

    model_name: str = "smollm2"  # what /v1/models and every response call the model
    host: str = "127.0.0.1"  # loopback unless asked: a model server is not a public service by default
    port: int = 8080
    api_key: str | None = None  # when set, `Authorization: Bearer KEY` on every endpoint but /health and the page
    queue_limit: int = 64  # requests waiting for the engine (the running one not counted); past it: 503
    max_body_bytes: int = 1 << 20  # a request body over this is refused (413) before it is parsed
    default_max_tokens: int = 512  # for a request that names no max_tokens (capped by the context left)
    shutdown_timeout_s: float = 10.0  # after Ctrl-C/SIGTERM, how long a running request may take to finish
    retry_after_s: int = 2  # the Retry-After a 503 (queue full, loading) suggests
    warm_up: bool = True  # compile the common shapes before /health says ok, so the first request is not slow
    log_level: str = "info"

    def __post_init__(self):
        _integer("port", self.port, 0, 65535)
        _integer("queue_limit", self.queue_limit, 1)
        _integer("max_body_bytes", self.max_body_bytes, 1024)
        _integer("default_max_tokens", self.default_max_tokens, 1)
        _integer("retry_after_s", self.retry_after_s, 1)
        if isinstance(self.shutdown_timeout_s, bool) or not isinstance(self.shutdown_timeout_s, (int, float)) \
                or not math.isfinite(self.shutdown_timeout_s) or self.shutdown_timeout_s < 0:
            raise ValueError(f"shutdown timeout must be a number of seconds >= 0, got {self.shutdown_timeout_s!r}")
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be a non-empty string, got {self.host!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("the API key must be a non-empty string")
        if self.log_level not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError(f"unknown log level {self.log_level!r}")


def _integer(name: str, value, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
