"""Next-token selection: greedy, or temperature with top-k and top-p, from a seeded key."""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 mean no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        _check_number("temperature", self.temperature)
        _check_integer("top_k", self.top_k)
        _check_number("top_p", self.top_p)
        _check_integer("seed", self.seed)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_max_tokens(max_tokens) -> int:
    """The number of tokens a request may generate: an integer of at least 1 (the context may cap it)."""
    _check_integer("max_tokens", max_tokens)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    return int(max_tokens)


def _check_integer(name: str, value) -> None:
    # bool is an int subclass, and True as a token count is a mistake, not a 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")


def _check_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")


def sample(logits, key, temperature, top_k, top_p, greedy: bool):
    """logits [B, V] -> token ids [B]. `greedy` is static; the rest are traced (no recompiles)."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    # [B, V] sorted descending, shared by top-k and top-p.
    sorted_logits = -jnp.sort(-logits, axis=-1)
    vocab = logits.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(sorted_logits, jnp.full((logits.shape[0], 1), k - 1), axis=-1)
    # Top-p: keep the smallest prefix whose probability reaches top_p (always at least one token).
    sorted_probs = jax.nn.softmax(jnp.where(jnp.arange(vocab) < k, sorted_logits, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.maximum(kth, cutoff)
    masked = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)
