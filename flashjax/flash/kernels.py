"""Jitted pieces of the flash engine's per-layer step.

Each layer's neuron cache lives on the device as one buffer per record part
({"gate": [C, D], "up": [C, D], "down": [C, D], "b_up": [C, 1]}), so the FFN
dots read contiguous matrices; rows 0..count-1 are live. Updates arrive padded
to a power-of-two length and out-of-range destinations are dropped, so a
token never meets a new shape. Axis letters: B batch, T tokens, D d_model,
N neurons (rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from flashjax.config import ModelConfig
from flashjax.model.layers import ffn_activation
from flashjax.model.transformer import attention_block, embed, ffn_input, final_logits, inverse_frequencies
from flashjax.sampling import sample


@functools.partial(jax.jit, static_argnames=("cfg",))
def embed_tokens(cfg: ModelConfig, params, tokens, positions):
    return embed(cfg, params, tokens, positions)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("kv",))
def attention_step(cfg: ModelConfig, layer, x, positions, start, kv):
    """One layer up to its FFN: returns (residual stream, FFN input, this layer's KV cache)."""
    x, kv = attention_block(cfg, layer, x, positions, start, kv, inverse_frequencies(cfg))
    return x, ffn_input(cfg, layer, x), kv


def _rows_ffn(cfg: ModelConfig, parts: dict, valid, h):
    """FFN contribution of the neurons in `parts` (rows where `valid`) for inputs h [B, T, D]."""
    # [B, T, N]
    up = jnp.einsum("btd,nd->btn", h, parts["up"])
    if "b_up" in parts:
        up = up + parts["b_up"][:, 0]
    gate = jnp.einsum("btd,nd->btn", h, parts["gate"]) if cfg.is_glu else None
    act = jnp.where(valid, ffn_activation(cfg, gate, up), 0.0)
    # [B, T, D]
    return jnp.einsum("btn,nd->btd", act, parts["down"])


def split_records(rows, part_slices, dtype):
    """[N, R] records (storage dtype) -> {part: [N, width]} in the compute dtype."""
    return {name: rows[:, start:stop].astype(dtype) for name, (start, stop) in part_slices}


@functools.partial(jax.jit, static_argnames=("cfg", "live_rows"))
def cached_ffn(cfg: ModelConfig, x, h, buffers, count, b_down, live_rows):
    """x + FFN(h) over the cached rows (+ the resident down-projection bias).

    Only the first `live_rows` (a power-of-two bucket >= count, static) rows of the cache are
    multiplied, so a mostly empty cache costs little; rows in [count, live_rows) are masked.
    """
    live = {name: buf[:live_rows] for name, buf in buffers.items()}
    out = _rows_ffn(cfg, live, jnp.arange(live_rows) < count, h)
    if b_down is not None:
        out = out + b_down
    return x + out.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "part_slices"))
def scratch_ffn(cfg: ModelConfig, part_slices, x, h, scratch, n_scratch):
    """x + FFN over a chunk of records streamed through scratch (read this step, not cached)."""
    out = _rows_ffn(cfg, split_records(scratch, part_slices, x.dtype), jnp.arange(scratch.shape[0]) < n_scratch, h)
    return x + out.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("part_slices",), donate_argnames=("buffers",))
def update_cache(part_slices, buffers, moves_src, moves_dst, load_slots, loaded):
    """Deletes by moving rows moves_src -> moves_dst, then writes `loaded` records at load_slots.

    Sources of moves are never destinations (the cache moves rows from its tail into holes below
    the new count), so gather-then-scatter is well defined. Padding uses an out-of-range destination.
    """
    out = {}
    for name, (start, stop) in part_slices:
        buf = buffers[name]
        buf = buf.at[moves_dst].set(buf[moves_src], mode="drop")
        buf = buf.at[load_slots].set(loaded[:, start:stop].astype(buf.dtype), mode="drop")
        out[name] = buf
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "greedy"))
def head(cfg: ModelConfig, params, x, last, key, temperature, top_k, top_p, greedy):
    """Final norm, logits and sampling at position `last` of x [B, T, D]."""
    logits = final_logits(cfg, params, jax.lax.dynamic_slice_in_dim(x, last, 1, axis=1))[:, 0]
    return sample(logits, key, temperature, top_k, top_p, greedy), logits
