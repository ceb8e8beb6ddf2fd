"""The engine thread: loads the model once, then generates for one queued request at a time.

The engine is not thread-safe (one KV cache, one set of neuron caches), so exactly one thread ever
calls it: this one. Requests reach it through a bounded queue; a full queue is refused at once
(503 with Retry-After) rather than left to wait without end. Each request gets its events (`Started`,
`Delta` text, then `Finished` or `Failed`) through the `sink` its handler gave, and can be cancelled
from any thread: the engine checks between tokens, closes the token generator and takes the next
request at once.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable

from flashjax.sampling import SamplingParams
from flashjax.server.config import ServerConfig
from flashjax.server.errors import ApiError
from flashjax.server.metrics import Metrics
from flashjax.server.prompts import Prompt
from flashjax.server.stops import StopMatcher

log = logging.getLogger("flashjax.server")

LOADING, READY, FAILED, STOPPING = "loading", "ready", "failed", "stopping"


# ---- what a request hears from the engine ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Started:
    queue_ms: float


@dataclasses.dataclass(frozen=True)
class Delta:
    text: str


@dataclasses.dataclass(frozen=True)
class Finished:
    finish_reason: str  # "stop" (end of sequence or a stop string) | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int  # every token generated, an end-of-sequence token included (as LLM.generate's)
    figures: dict  # flashjax's per-request figures (the responses' "flashjax" field)


@dataclasses.dataclass(frozen=True)
class Failed:
    error: ApiError


class Job:
    """One request on its way through the engine."""

    def __init__(self, job_id: str, prompt: Prompt, sampling: SamplingParams, stops: tuple[str, ...],
                 sink: Callable[[object], None], received_at: float | None = None):
        self.id, self.prompt, self.sampling, self.stops, self.sink = job_id, prompt, sampling, stops, sink
        self.received_at = time.perf_counter() if received_at is None else received_at
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        """From any thread: the engine stops this request at its next token (or never starts it)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def emit(self, event) -> None:
        try:
            self.sink(event)
        except RuntimeError:  # the request's event loop is gone (shutdown): nobody is listening
            self.cancel()


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What /v1/models says, fixed once the model is loaded."""

    name: str
    context_length: int
    memory_plan: dict


# ---- the worker ---------------------------------------------------------------------------------

class Worker:
    def __init__(self, load: Callable[[], object], config: ServerConfig, metrics: Metrics | None = None,
                 on_failure: Callable[[str], None] | None = None):
        self._load, self.config = load, config
        self.metrics = metrics or Metrics(queue_length=lambda: self.waiting, running=lambda: self.running)
        self._on_failure = on_failure or (lambda message: None)
        self.state = LOADING
        self.error: str | None = None
        self.llm = None  # set once loaded; other threads only read its tokenizer and config
        self.info: ModelInfo | None = None
        self._lock = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._main, name="flashjax-engine", daemon=True)

    # -- any thread --

    def start(self) -> None:
        self._thread.start()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return int(self._running is not None)

    def require_ready(self) -> None:
        if self.state == READY:
            return
        retry = {"Retry-After": str(self.config.retry_after_s)}
        if self.state == LOADING:
            raise ApiError(503, "the model is loading; try again shortly", None, "model_loading", retry)
        if self.state == STOPPING:
            raise ApiError(503, "the server is shutting down", None, "shutting_down")
        raise ApiError(503, f"the model failed to load: {self.error}", None, "model_load_failed")

    def submit(self, job: Job) -> None:
        """Queues `job`, or raises ApiError(503) when the queue is full or the server is stopping."""
        with self._lock:
            self.require_ready()
            if len(self._waiting) >= self.config.queue_limit:
                raise ApiError(503, f"the server is busy: {len(self._waiting)} requests are waiting (the limit); "
                                    f"retry later", None, "queue_full",
                               {"Retry-After": str(self.config.retry_after_s)})
            self._waiting.append(job)
            self._lock.notify()

    def begin_shutdown(self) -> None:
        """Stop taking requests and refuse the waiting ones; the running one goes on (stop() ends it)."""
        with self._lock:
            if self.state == READY:
                self.state = STOPPING
            refused = list(self._waiting)
            self._waiting.clear()
        for job in refused:
            job.emit(Failed(ApiError(503, "the server is shutting down", None, "shutting_down")))

    def stop(self, timeout: float = 30.0) -> None:
        """Ends the engine thread: the running request is cancelled at its next token, the engine closed."""
        self.begin_shutdown()
        with self._lock:
            self._stop = True
            if self._running is not None:
                self._running.cancel()
            self._lock.notify()
        if self._thread.is_alive():
            # A model still loading cannot be interrupted; the thread is a daemon and dies with the process.
            self._thread.join(timeout)

    # -- the engine thread --

    def _main(self) -> None:
        try:
            llm = self._load()
            self.llm = llm
            self.info = describe(llm, self.config.model_name)
            if self.config.warm_up:
                self._warm_up(llm)
        except BaseException as e:  # noqa: BLE001 - any failure to load ends the server with its message
            self.state, self.error = FAILED, str(e) or type(e).__name__
            log.error("error: %s", self.error)
            if self.llm is not None:
                self.llm.close()
            self._on_failure(self.error)
            return
        with self._lock:
            if self.state == LOADING and not self._stop:
                self.state = READY
        log.info("model %s ready: context %d tokens; %s", self.info.name, self.info.context_length,
                 self.info.memory_plan["description"])
        try:
            while True:
                with self._lock:
                    while not self._waiting and not self._stop:
                        self._lock.wait()
                    if self._stop:
                        break
                    job = self._running = self._waiting.popleft()
                try:
                    self._serve(llm, job)
                except Exception:  # noqa: BLE001 - a bug in one request must not leave the queue unserved
                    log.exception("%s: failed", job.id)
                    job.emit(Failed(ApiError(500, "internal error while generating", None, "internal_error")))
                finally:
                    with self._lock:
                        self._running = None
        finally:
            llm.close()

    def _warm_up(self, llm) -> None:
        """Compiles the shapes most requests use (greedy and sampled, a short and a default-length
        request), so the first requests do not pay for compiling."""
        ids = llm.tokenizer.encode("Hello", add_special_tokens=True) if llm.tokenizer is not None else [0]
        for max_tokens in sorted({16, self.config.default_max_tokens}):
            for sampling in (SamplingParams(), SamplingParams(temperature=1.0)):
                gen = llm.generate_ids(ids, max_tokens=max_tokens, sampling=sampling, stop_at_eos=False)
                try:
                    next(gen), next(gen)
                finally:
                    gen.close()

    def _serve(self, llm, job: Job) -> None:
        if job.cancelled:  # the client left while it waited
            log.info("%s: client disconnected while queued; not started", job.id)
            self.metrics.generations.labels("cancelled").inc()
            return
        started = time.perf_counter()
        job.emit(Started((started - job.received_at) * 1e3))
        try:
            finish, n, times = self._generate(llm, job)
        except Exception as e:  # noqa: BLE001 - one request's failure must not end the server
            log.exception("%s: generation failed", job.id)
            status = 400 if isinstance(e, ValueError) else 500
            job.emit(Failed(ApiError(status, f"generation failed: {e}", None, "generation_failed")))
            self.metrics.generations.labels("error").inc()
            return
        figures = self._figures(llm, job, started, times)
        self._count(job, finish, n, times, figures)
        if finish == "cancelled":
            log.info("%s: client disconnected after %d tokens; generation stopped", job.id, n)
            return
        job.emit(Finished(finish, len(job.prompt.ids), n, figures))
        log.info("%s: %d prompt + %d generated tokens (%s), first token after %.0f ms, %s tok/s", job.id,
                 len(job.prompt.ids), n, finish, figures["time_to_first_token_ms"] or 0,
                 f"{figures['tokens_per_s']:.1f}" if figures["tokens_per_s"] else "n/a")

    def _generate(self, llm, job: Job) -> tuple[str, int, list[float]]:
        """Runs the tokens through the decoder and the stop strings: (finish reason, tokens, token times)."""
        from flashjax.tokenizer import StreamDecoder

        decoder = StreamDecoder(llm.tokenizer) if llm.tokenizer is not None else None
        stops = StopMatcher(job.stops)
        eos = set(llm.eos_token_ids)
        times: list[float] = []
        gen = llm.generate_ids(list(job.prompt.ids), max_tokens=job.prompt.max_tokens, sampling=job.sampling)
        try:
            while True:
                if job.cancelled:
                    return "cancelled", len(times), times
                try:
                    token = next(gen)
                except StopIteration as done:
                    finish = "length" if done.value["finish_reason"] == "length" else "stop"
                    break
                times.append(time.perf_counter())
                # The end-of-sequence token ends the text; it is not part of it.
                if token in eos or decoder is None:
                    continue
                text = stops.feed(decoder.feed(token))
                if text:
                    job.emit(Delta(text))
                if stops.stopped:
                    return "stop", len(times), times
        finally:
            gen.close()  # a cut-short generator leaves nothing behind: the next request restarts the runner
        tail = stops.feed(decoder.flush()) if decoder is not None else ""
        tail += stops.flush()
        if tail:
            job.emit(Delta(tail))
        return ("stop" if stops.stopped else finish), len(times), times

    def _figures(self, llm, job: Job, started: float, times: list[float]) -> dict:
        """flashjax's per-request figures: queueing, time to first token, decode speed, and what the
        flash engine read (from the runner's own statistics of this sequence)."""
        n = len(times)
        decode_s = times[-1] - times[0] if n > 1 else 0.0
        figures = {
            "queue_ms": (started - job.received_at) * 1e3,
            "time_to_first_token_ms": (times[0] - job.received_at) * 1e3 if times else None,
            "prefill_ms": (times[0] - started) * 1e3 if times else None,
            "decode_ms_per_token": decode_s * 1e3 / (n - 1) if n > 1 else None,
            "tokens_per_s": (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
            "seed": job.sampling.seed,
        }
        stats = llm.runner.stats()
        figures["engine"] = stats.get("sparsity")
        figures["compile_ms"] = stats.get("compile_ms")
        if "bytes_read_per_token" in stats:  # the flash engine reads FFN weights from disk
            figures["bytes_read_per_token"] = stats["bytes_read_per_token"]
            figures["cache_hit_rate"] = stats.get("cache_hit_rate")
            figures["memory_budget_bytes"] = stats.get("memory_budget_bytes")
        return figures

    def _count(self, job: Job, finish: str, n: int, times: list[float], figures: dict) -> None:
        m = self.metrics
        m.generations.labels(finish).inc()
        m.prompt_tokens.inc(len(job.prompt.ids))
        m.generated_tokens.inc(n)
        if times:
            m.ttft.observe(times[0] - job.received_at)
        for a, b in zip(times, times[1:]):
            m.token_latency.observe(b - a)
        if figures.get("bytes_read_per_token") is not None:
            m.bytes_read.inc(figures["bytes_read_per_token"] * max(n - 1, 0))  # a mean over the decode steps
        if figures.get("cache_hit_rate") is not None:
            m.cache_hit_rate.set(figures["cache_hit_rate"])


def describe(llm, name: str) -> ModelInfo:
    """The model's context length and memory plan (called on the engine thread, once)."""
    from flashjax.engine import context_limit

    stats = llm.runner.stats()
    cfg = llm.config
    plan = {"engine": stats.get("sparsity"), "devices": stats.get("devices", 1), "n_layers": cfg.n_layers,
            "d_ffn": cfg.d_ffn}
    if "weights_bytes" in stats:  # the flash engine: its plan under the budget
        plan.update(weights_bytes=stats["weights_bytes"], memory_budget_bytes=stats.get("memory_budget_bytes"),
                    resident_bytes=stats.get("resident_bytes"), cache_rows_per_layer=stats.get("cache_rows_per_layer"),
                    ffn_bytes_on_disk=stats.get("ffn_bytes"), resident_dtype=stats.get("resident_dtype"),
                    cache_dtype=stats.get("cache_dtype"))
        budget = plan["memory_budget_bytes"]
        plan["description"] = (
            f"flash engine ({plan['engine']}): "
            + (f"budget {budget / 1e6:.1f} MB; " if budget is not None else "no budget; ")
            + f"resident weights {plan['resident_bytes'] / 1e6:.1f} MB; neuron caches {cfg.n_layers} x "
              f"{plan['cache_rows_per_layer']}/{cfg.d_ffn} rows; total {plan['weights_bytes'] / 1e6:.1f} MB")
    else:
        plan.update(weights_bytes=llm.weight_bytes, memory_budget_bytes=None)
        plan["description"] = f"dense engine: every weight resident, {llm.weight_bytes / 1e6:.1f} MB"
    return ModelInfo(name, context_limit(cfg, llm.engine_config), plan)
