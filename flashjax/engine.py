"""Prefill and decode: the jitted entry points and the generation loop around them.

The dense runner keeps every weight resident and runs the whole model in one
jitted call per token. Buffers have fixed capacity (the KV cache is sized
once per request, rounded up to `EngineConfig.cache_block`; prompts are padded
to `EngineConfig.prefill_block`), so a new token never triggers a compile.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flashjax.config import EngineConfig, ModelConfig
from flashjax.model.transformer import final_logits, forward, init_kv_cache
from flashjax.sampling import SamplingParams, sample


class ContextLengthError(ValueError):
    """The prompt does not fit in the model's context."""


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


@functools.partial(jax.jit, static_argnames=("cfg", "greedy"), donate_argnames=("cache",))
def _prefill(cfg: ModelConfig, params, tokens, length, cache, key, temperature, top_k, top_p, greedy):
    # tokens [B, T] padded past `length`; padded slots are overwritten by later decode steps
    # before any query can see them (a query at position p sees slots <= p only).
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x, cache = forward(cfg, params, tokens, positions, 0, cache)
    # [B, 1, D] -> [B, V]
    last = jax.lax.dynamic_slice_in_dim(x, length - 1, 1, axis=1)
    logits = final_logits(cfg, params, last)[:, 0]
    token = sample(logits, jax.random.fold_in(key, length), temperature, top_k, top_p, greedy)
    return token, logits, cache


@functools.partial(jax.jit, static_argnames=("cfg", "greedy"), donate_argnames=("cache",))
def _decode(cfg: ModelConfig, params, token, pos, cache, key, temperature, top_k, top_p, greedy):
    # token [B], pos scalar: the slot this token is written to.
    positions = jnp.full((token.shape[0], 1), pos)
    x, cache = forward(cfg, params, token[:, None], positions, pos, cache)
    logits = final_logits(cfg, params, x)[:, 0]
    next_token = sample(logits, jax.random.fold_in(key, pos + 1), temperature, top_k, top_p, greedy)
    return next_token, logits, cache


@functools.partial(jax.jit, static_argnames=("cfg",))
def _all_logits(cfg: ModelConfig, params, tokens, cache):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x, _ = forward(cfg, params, tokens, positions, 0, cache)
    return final_logits(cfg, params, x)


class DenseRunner:
    """Every weight resident; one jitted call per token.

    Executables are compiled ahead of time (`jit(...).lower(...).compile()`)
    and kept per shape, so compile time is reported apart from run time and
    `compile_count()` counts exactly the variants built.
    """

    def __init__(self, cfg: ModelConfig, params, engine_cfg: EngineConfig):
        self.cfg, self.params, self.engine_cfg = cfg, params, engine_cfg
        self.cache = None
        self.compute_dtype = jnp.dtype(engine_cfg.compute_dtype)
        self._executables: dict = {}
        self.compile_ms = 0.0

    def _executable(self, fn, shape_key, *args, greedy: bool):
        key = (fn.__name__, shape_key, greedy)
        if key not in self._executables:
            t0 = time.perf_counter()
            self._executables[key] = fn.lower(self.cfg, *args, greedy=greedy).compile()
            self.compile_ms += (time.perf_counter() - t0) * 1e3
        return self._executables[key]

    def start(self, capacity: int) -> None:
        if self.cache is None or self.cache[0][0].shape[2] != capacity:
            self.cache = init_kv_cache(self.cfg, 1, capacity, self.compute_dtype)
        self.compile_ms = 0.0

    def prefill(self, prompt: np.ndarray, s: SamplingParams, key):
        capacity = self.cache[0][0].shape[2]
        padded = min(_round_up(len(prompt), self.engine_cfg.prefill_block), capacity)
        tokens = np.zeros((1, padded), np.int32)
        tokens[0, :len(prompt)] = prompt
        args = (self.params, tokens, np.int32(len(prompt)), self.cache, key,
                np.float32(s.temperature or 1.0), np.int32(s.top_k), np.float32(s.top_p))
        run = self._executable(_prefill, (padded, capacity), *args, greedy=s.greedy)
        token, logits, self.cache = run(*args)
        return token, logits

    def warm_up(self, s: SamplingParams, key) -> None:
        """Compiles the decode step for the current capacity before any timing starts."""
        self._decode_executable(s, key)

    def _decode_executable(self, s: SamplingParams, key):
        args = (self.params, jnp.zeros((1,), jnp.int32), np.int32(0), self.cache, key,
                np.float32(1.0), np.int32(0), np.float32(1.0))
        return self._executable(_decode, self.cache[0][0].shape[2], *args, greedy=s.greedy)

    def decode(self, token, pos: int, s: SamplingParams, key):
        run = self._decode_executable(s, key)
        token, logits, self.cache = run(self.params, token, np.int32(pos), self.cache, key,
                                        np.float32(s.temperature or 1.0), np.int32(s.top_k), np.float32(s.top_p))
        return token, logits

    def stats(self) -> dict:
        return {"compile_ms": self.compile_ms}

    def compile_count(self) -> int:
        """Executables built so far (flat after warm-up: no recompiles per token)."""
        return len(self._executables)


@dataclasses.dataclass
class GenerationResult:
    text: str
    prompt_tokens: list[int]
    tokens: list[int]
    finish_reason: str  # "eos" | "length"
    stats: dict

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def drain(generator) -> tuple[list[int], dict]:
    """Runs a `generate_tokens` (or `LLM.generate_ids`) generator to the end: (token ids, stats)."""
    tokens = []
    while True:
        try:
            tokens.append(next(generator))
        except StopIteration as done:
            return tokens, done.value


def generate_tokens(runner, cfg: ModelConfig, engine_cfg: EngineConfig, prompt: Sequence[int],
                    max_tokens: int, sampling: SamplingParams, eos_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yields generated token ids; returns the stats dict (StopIteration.value) when done."""
    prompt = np.asarray(prompt, dtype=np.int32)
    context = min(engine_cfg.max_context or cfg.max_position, cfg.max_position)
    if len(prompt) == 0:
        raise ValueError("the prompt is empty")
    if len(prompt) >= context:
        raise ContextLengthError(f"the prompt has {len(prompt)} tokens but the context holds {context} "
                                 f"(including at least one generated token); shorten it or raise --max-context")
    max_tokens = min(max_tokens, context - len(prompt))
    capacity = min(_round_up(len(prompt) + max_tokens, engine_cfg.cache_block), context)
    runner.start(capacity)
    key = jax.random.PRNGKey(sampling.seed)
    eos = set(int(e) for e in eos_ids)
    runner.warm_up(sampling, key)

    t0 = time.perf_counter()
    compile_before = runner.stats().get("compile_ms", 0.0)
    token_dev, _ = runner.prefill(prompt, sampling, key)
    first = int(token_dev[0])
    # Compiling a new prompt shape is reported as compile_ms, not as prefill time.
    prefill_s = time.perf_counter() - t0 - (runner.stats().get("compile_ms", 0.0) - compile_before) / 1e3

    t1 = time.perf_counter()
    generated, finish = 0, "length"
    host_token = first
    for n in range(max_tokens):
        # Dispatch the next step before reading this token back, so host work overlaps compute.
        next_dev = None
        if n + 1 < max_tokens and host_token not in eos:
            next_dev, _ = runner.decode(token_dev, len(prompt) + n, sampling, key)
        generated += 1
        yield host_token
        if host_token in eos:
            finish = "eos"
            break
        if next_dev is None:
            break
        token_dev = next_dev
        host_token = int(token_dev[0])
    decode_s = time.perf_counter() - t1
    steps = max(generated - 1, 0)  # the first token comes from prefill
    stats = {
        "prompt_tokens": int(len(prompt)),
        "generated_tokens": generated,
        "prefill_ms": prefill_s * 1e3,
        "prefill_tokens_per_s": len(prompt) / prefill_s if prefill_s else None,
        "decode_ms_per_token": decode_s * 1e3 / steps if steps else None,
        "tokens_per_s": steps / decode_s if steps and decode_s else None,
        "finish_reason": finish,
    }
    stats.update(runner.stats())
    return stats
