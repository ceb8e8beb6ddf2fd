"""The contract between an engine (a runner) and the code that drives it.

`engine.generate_tokens` (the generation loop), `evaluate` (perplexity, multiple choice) and the API
drive every engine through this Protocol alone: `engine.DenseRunner` (every weight resident) and
`flash.runner.FlashRunner` (FFN neurons read from disk) both implement it, and no caller asks which
one it holds. What differs between engines is a capability the runner declares
(`one_pass_logits`), not a type to test.

The helpers every runner shares (prompt padding, KV cache setup, sampling arguments per position,
the context limit) are in `flashjax.engine`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import numpy as np

from flashjax.sampling import SamplingParams


@runtime_checkable
class Runner(Protocol):
    """One model on one engine, one sequence at a time (batch 1).

    A request is `start(capacity)`, `warm_up`, one `prefill` of the prompt, then one `decode` per
    token. `prefill` and `decode` return device arrays (token [1] int32, logits [1, V]) without
    waiting for them, so the caller can dispatch the next step before reading this one back.
    """

    # Whether `sequence_logits` scores a whole sequence in one forward pass (the dense engine). An
    # engine without it (the flash engine, whose sparsity acts in decode steps) is scored step by step
    # through prefill and decode, and its `sequence_logits` raises NotImplementedError.
    one_pass_logits: bool

    def start(self, capacity: int) -> None:
        """Begins a sequence: a KV cache of `capacity` slots (reused when the size is unchanged),
        per-sequence state and statistics reset."""
        ...

    def warm_up(self, sampling: SamplingParams, key: jax.Array) -> None:
        """Compiles what decode steps at the current capacity need, before any timing starts."""
        ...

    def prefill(self, prompt: np.ndarray, sampling: SamplingParams, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Writes the prompt's tokens [T] at slots 0..T-1; returns (the next token [1], its logits [1, V])."""
        ...

    def decode(self, token: jax.Array, pos: int, sampling: SamplingParams,
               key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Writes `token` [1] at slot `pos`; returns (the next token [1], its logits [1, V])."""
        ...

    def sequence_logits(self, tokens: np.ndarray) -> np.ndarray:
        """Logits [T, V] (float32, host) of every position of tokens [T], in one forward pass that
        leaves the runner's KV cache alone. Only where `one_pass_logits` is True."""
        ...

    def stats(self) -> dict:
        """Figures of the sequence since `start`; "sparsity" names the engine ("dense", or the flash
        engine's mode), "compile_ms" (when present) is compile time kept out of the other figures."""
        ...

    def compile_count(self) -> int:
        """Executables built so far: flat once warm (no compile per token)."""
        ...

    def close(self) -> None:
        """Releases threads, files and device buffers. The runner is not used after (an LLM's
        `close()` and `with flashjax.load(...) as llm:` call this)."""
        ...
