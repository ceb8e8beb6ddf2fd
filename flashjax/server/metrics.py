"""Prometheus metrics for GET /metrics, in a registry of the server's own (no process-wide state, so
two servers in one process, as in tests, never share counts)."""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Time to first token spans queueing and prefill (a fraction of a second to minutes under load);
# per-token latency spans a small model on a GPU (ms) to a big one read from disk (seconds).
_TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    def __init__(self, queue_length: Callable[[], int] = lambda: 0, running: Callable[[], int] = lambda: 0):
        # The client library adds a `*_created` timestamp series per counter by default; scrapers
        # do not need it and it doubles the page (process-wide, like the library's own default).
        disable_created_metrics()
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("flashjax_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=registry)
        self.generations = Counter("flashjax_generations", "Generations ended, by finish reason "
                                   "(stop, length, cancelled: the client left; error)", ["finish_reason"],
                                   registry=registry)
        self.prompt_tokens = Counter("flashjax_prompt_tokens", "Prompt tokens processed", registry=registry)
        self.generated_tokens = Counter("flashjax_generated_tokens", "Tokens generated", registry=registry)
        self.ttft = Histogram("flashjax_time_to_first_token_seconds",
                              "From the request's arrival (queueing included) to its first generated token",
                              buckets=_TTFT_BUCKETS, registry=registry)
        self.token_latency = Histogram("flashjax_time_per_output_token_seconds",
                                       "Time between consecutive generated tokens of a request",
                                       buckets=_TOKEN_BUCKETS, registry=registry)
        self.bytes_read = Counter("flashjax_bytes_read", "FFN bytes read from disk by the flash engine in decode "
                                  "steps (0 on the dense engine)", registry=registry)
        self.cache_hit_rate = Gauge("flashjax_cache_hit_rate", "Share of needed neurons found in the flash "
                                    "engine's cache, over the last request (NaN: dense engine)", registry=registry)
        self.cache_hit_rate.set(float("nan"))
        self.queue_length = Gauge("flashjax_queue_length", "Requests waiting for the engine", registry=registry)
        self.queue_length.set_function(queue_length)
        self.running = Gauge("flashjax_requests_running", "Requests the engine is generating for (0 or 1)",
                             registry=registry)
        self.running.set_function(running)

    def render(self) -> bytes:
        return generate_latest(self.registry)
