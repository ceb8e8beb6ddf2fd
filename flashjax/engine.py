"""Prefill and decode: the dense runner, the helpers every runner shares, and the generation loop.

The dense runner keeps every weight resident and runs the whole model in one
jitted call per token. Buffers have fixed capacity (the KV cache is sized
once per request, rounded up to `EngineConfig.cache_block`; prompts are padded
to `EngineConfig.prefill_block`), so a new token never triggers a compile.
With `--devices N` its weights and KV cache are split over N devices
(`tensor_parallel.py`); the runner's code is the same.

Every runner implements `runner_protocol.Runner`; the helpers below are the
parts of that contract every runner computes the same way.
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
from flashjax.runner_protocol import Runner
from flashjax.sampling import SamplingParams, sample


class ContextLengthError(ValueError):
    """The prompt does not fit in the model's context."""


# ---- helpers every runner shares ----------------------------------------------------------------

def round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def context_limit(cfg: ModelConfig, engine_cfg: EngineConfig) -> int:
    """Tokens one sequence may hold: `--max-context`, never past the model's own limit."""
    return min(engine_cfg.max_context or cfg.max_position, cfg.max_position)


def cache_capacity(n_tokens: int, cfg: ModelConfig, engine_cfg: EngineConfig) -> int:
    """KV cache slots for a sequence of `n_tokens`: rounded up to `cache_block` (so a new size, and a
    compile, is rare), at most the context limit."""
    return min(round_up(n_tokens, engine_cfg.cache_block), context_limit(cfg, engine_cfg))


def new_kv_cache(cfg: ModelConfig, capacity: int, dtype, sharding=None):
    """A zeroed KV cache (batch 1) of `capacity` slots; with `sharding` (one for every array, e.g. a
    runner's replicated or split-by-head sharding) created in place on the devices."""
    if sharding is None:
        return init_kv_cache(cfg, 1, capacity, dtype)
    return jax.jit(init_kv_cache, static_argnums=(0, 1, 2, 3), out_shardings=sharding)(cfg, 1, capacity, dtype)


def kv_capacity(cache) -> int:
    """Slots of a KV cache (a list of (k, v) [B, K, S, H] per layer)."""
    return cache[0][0].shape[2]


def ensure_kv_cache(cache, cfg: ModelConfig, capacity: int, dtype, sharding=None):
    """`cache` when it already has `capacity` slots (stale slots are rewritten before any query sees
    them), else a new one: a runner's `start`."""
    if cache is not None and kv_capacity(cache) == capacity:
        return cache
    return new_kv_cache(cfg, capacity, dtype, sharding)


def pad_prompt(prompt: np.ndarray, block: int, capacity: int) -> np.ndarray:
    """tokens [1, padded]: the prompt, then zeros up to a multiple of `block` (at most `capacity`), so
    prompts of many lengths share a few compiled shapes. The padding is written past the prompt,
    where no query of the prompt sees it (causal), and later tokens overwrite it."""
    tokens = np.zeros((1, min(round_up(len(prompt), block), capacity)), np.int32)
    tokens[0, :len(prompt)] = prompt
    return tokens


def prompt_positions(padded: int, length, xp=np):
    """Positions [1, padded] of a padded prompt: 0..length-1, then the padding held at the last real
    position. The padding's slots still follow the prompt (the cache is written at `start`); its
    positions only keep the call's largest position the prompt's own, which LongRoPE reads to choose
    its frequencies."""
    return xp.minimum(xp.arange(padded, dtype=xp.int32), length - 1)[None]


# One dispatch (about 10 us on XLA:CPU) where the unjitted fold_in makes several (about 140 us).
_fold_in = jax.jit(jax.random.fold_in)


def sampling_args(key, pos: int, sampling: SamplingParams) -> tuple:
    """The sampler's arguments for the token after position `pos` (prefill: the prompt's last):
    (key folded with pos + 1, temperature, top_k, top_p). All are traced, never static, so changing
    them does not recompile (greedy or not is the one static choice: `sampling.greedy`)."""
    return (_fold_in(key, np.int32(pos + 1)), np.float32(sampling.temperature or 1.0), np.int32(sampling.top_k),
            np.float32(sampling.top_p))


# ---- the dense runner ---------------------------------------------------------------------------

def _prefill(cfg: ModelConfig, params, tokens, length, cache, key, temperature, top_k, top_p, greedy):
    # tokens [B, T] padded past `length`; padded slots are overwritten by later decode steps
    # before any query can see them (a query at position p sees slots <= p only).
    positions = jnp.broadcast_to(prompt_positions(tokens.shape[1], length, jnp), tokens.shape)
    x, cache = forward(cfg, params, tokens, positions, 0, cache)
    # [B, 1, D] -> [B, V]
    last = jax.lax.dynamic_slice_in_dim(x, length - 1, 1, axis=1)
    logits = final_logits(cfg, params, last)[:, 0]
    token = sample(logits, key, temperature, top_k, top_p, greedy)
    return token, logits, cache


def _decode(cfg: ModelConfig, params, token, pos, cache, key, temperature, top_k, top_p, greedy):
    # token [B], pos scalar: the slot this token is written to.
    positions = jnp.full((token.shape[0], 1), pos)
    x, cache = forward(cfg, params, token[:, None], positions, pos, cache)
    logits = final_logits(cfg, params, x)[:, 0]
    next_token = sample(logits, key, temperature, top_k, top_p, greedy)
    return next_token, logits, cache


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def _sequence_logits(cfg: ModelConfig, params, tokens, length, dtype: str):
    # tokens [B, T] padded past `length` -> logits [B, T, V]; a scratch cache of T slots, dropped.
    positions = jnp.broadcast_to(prompt_positions(tokens.shape[1], length, jnp), tokens.shape)
    x, _ = forward(cfg, params, tokens, positions, 0, init_kv_cache(cfg, tokens.shape[0], tokens.shape[1], dtype))
    return final_logits(cfg, params, x)


class DenseRunner:
    """Every weight resident; one jitted call per token (a `runner_protocol.Runner`).

    Executables are compiled ahead of time (`jit(...).lower(...).compile()`)
    and kept per shape, so compile time is reported apart from run time and
    `compile_count()` counts exactly the variants built.

    `parallel` (a `tensor_parallel.TensorParallel`): the params were placed on its mesh; the KV cache
    is created there too, and the cache, token and logits leave each step with the shardings they
    entered with, so the compiled step accepts them again next token.
    """

    one_pass_logits = True

    def __init__(self, cfg: ModelConfig, params, engine_cfg: EngineConfig, parallel=None):
        self.cfg, self.params, self.engine_cfg = cfg, params, engine_cfg
        self.parallel = parallel
        self.cache = None
        self.compute_dtype = jnp.dtype(engine_cfg.compute_dtype)
        self._kv_sharding = None if parallel is None else parallel.kv_sharding
        placement = {}
        if parallel is not None:
            kv = (self._kv_sharding, self._kv_sharding)
            placement = dict(out_shardings=(parallel.replicated, parallel.replicated, [kv] * cfg.n_layers))
        jit = functools.partial(jax.jit, static_argnames=("cfg", "greedy"), donate_argnames=("cache",), **placement)
        self._prefill, self._decode = jit(_prefill), jit(_decode)
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
        self.cache = ensure_kv_cache(self.cache, self.cfg, capacity, self.compute_dtype, self._kv_sharding)
        self.compile_ms = 0.0

    def prefill(self, prompt: np.ndarray, sampling: SamplingParams, key):
        capacity = kv_capacity(self.cache)
        tokens = pad_prompt(prompt, self.engine_cfg.prefill_block, capacity)
        args = (self.params, tokens, np.int32(len(prompt)), self.cache, *sampling_args(key, len(prompt) - 1, sampling))
        run = self._executable(self._prefill, (tokens.shape[1], capacity), *args, greedy=sampling.greedy)
        token, logits, self.cache = run(*args)
        return token, logits

    def warm_up(self, sampling: SamplingParams, key) -> None:
        """Compiles the decode step for the current capacity before any timing starts."""
        args = (self.params, jnp.zeros((1,), jnp.int32), np.int32(0), self.cache, *sampling_args(key, 0, sampling))
        self._executable(self._decode, kv_capacity(self.cache), *args, greedy=sampling.greedy)

    def decode(self, token, pos: int, sampling: SamplingParams, key):
        args = (self.params, token, np.int32(pos), self.cache, *sampling_args(key, pos, sampling))
        run = self._executable(self._decode, kv_capacity(self.cache), *args, greedy=sampling.greedy)
        token, logits, self.cache = run(*args)
        return token, logits

    def sequence_logits(self, tokens: np.ndarray) -> np.ndarray:
        """Logits [T, V] of every position, one forward pass. The input is padded to a multiple of the
        prefill block (within the context), so sequences of many lengths share a few compiled shapes."""
        tokens = np.asarray(tokens, np.int32).reshape(-1)
        room = max(len(tokens), context_limit(self.cfg, self.engine_cfg))
        padded = pad_prompt(tokens, self.engine_cfg.prefill_block, room)
        logits = _sequence_logits(self.cfg, self.params, padded, np.int32(len(tokens)), self.compute_dtype.name)
        if not logits.is_fully_addressable:
            # Split across processes (jax.distributed): gathered whole on every device to be read here.
            logits = jax.jit(lambda a: a, out_shardings=self.parallel.replicated)(logits)
            logits = logits.addressable_shards[0].data
        return np.asarray(logits, np.float32)[0, :len(tokens)]

    def stats(self) -> dict:
        return {"sparsity": "dense", "compile_ms": self.compile_ms,
                "devices": 1 if self.parallel is None else self.parallel.n_devices}

    def compile_count(self) -> int:
        """Executables built so far (flat after warm-up: no recompiles per token)."""
        return len(self._executables)

    def close(self) -> None:
        """Drops the KV cache and the compiled steps; the weights belong to the caller."""
        self.cache = None
        self._executables.clear()


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


def generate_tokens(runner: Runner, cfg: ModelConfig, engine_cfg: EngineConfig, prompt: Sequence[int],
                    max_tokens: int, sampling: SamplingParams, eos_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yields generated token ids; returns the stats dict (StopIteration.value) when done."""
    prompt = np.asarray(prompt, dtype=np.int32)
    context = context_limit(cfg, engine_cfg)
    if len(prompt) == 0:
        raise ValueError("the prompt is empty")
    if len(prompt) >= context:
        raise ContextLengthError(f"the prompt has {len(prompt)} tokens but the context holds {context} "
                                 f"(including at least one generated token); shorten it or raise --max-context")
    max_tokens = min(max_tokens, context - len(prompt))
    capacity = cache_capacity(len(prompt) + max_tokens, cfg, engine_cfg)
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
