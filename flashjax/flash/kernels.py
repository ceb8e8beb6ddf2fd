"""Jitted pieces of the flash engine's per-layer step.

Each layer's neuron cache lives on the devices as one buffer per record part
({"gate": [S*C, D], "up": [S*C, D], "down": [S*C, D], "b_gate"/"b_up": [S*C, 1]}, split
by device over the ("neurons",) mesh, S devices of C rows each: see
flash/shards.py), so the FFN dots read contiguous matrices; rows 0..count-1
of each device's part are live. Updates arrive padded
to a power-of-two length and out-of-range destinations are dropped, so a
token never meets a new shape. Axis letters: B batch, T tokens, D d_model,
N neurons (rows), S devices.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from flashjax.config import ModelConfig
from flashjax.flash.shards import NEURONS
from flashjax.model.layers import ffn_over_neurons
from flashjax.model.transformer import attention_block, embed, ffn_input, final_logits, inverse_frequencies
from flashjax.sampling import sample


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def embed_tokens(cfg: ModelConfig, params, tokens, positions, dtype):
    """The residual stream starts in the compute dtype even when the tables are held narrower."""
    return embed(cfg, params, tokens, positions).astype(dtype)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("kv",))
def attention_step(cfg: ModelConfig, layer, x, positions, start, kv):
    """One layer up to its FFN: returns (residual stream, FFN input, this layer's KV cache)."""
    x, kv = attention_block(cfg, layer, x, positions, start, kv, inverse_frequencies(cfg))
    return x, ffn_input(cfg, layer, x), kv


def _rows_ffn(cfg: ModelConfig, parts: dict, valid, h):
    """FFN contribution of the neurons in `parts` (rows where `valid`) for inputs h [B, T, D]."""
    return ffn_over_neurons(cfg, h, parts, live=valid)


def split_records(rows, part_slices):
    """[N, R] records -> {part: [N, width]}, still in the storage dtype (converted as multiplied)."""
    return {name: rows[:, start:stop] for name, (start, stop) in part_slices}


def _on_shards(mesh, fn, in_specs, out_specs):
    """`fn` per device of the ("neurons",) mesh: each sees its own shard of the P(NEURONS) inputs."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "live_rows"))
def cached_ffn(cfg: ModelConfig, mesh, x, h, buffers, counts, b_down, live_rows):
    """x + FFN(h) over every device's cached rows (+ the resident down-projection bias).

    `buffers`: {part: [S * capacity, width]} split by device; `counts`: [S] live rows per device.
    Only the first `live_rows` (a power-of-two bucket >= every count, static) rows of each device's
    cache are multiplied, so a mostly empty cache costs little; rows past a device's count are
    masked. The devices' partial outputs are summed across the mesh.
    """

    def local(h, buffers, counts):
        # A cache kept in the storage dtype (cache_dtype="storage") is converted block by block as it
        # is multiplied (model/matmul.py), never as a whole.
        live = {name: buf[:live_rows] for name, buf in buffers.items()}
        return jax.lax.psum(_rows_ffn(cfg, live, jnp.arange(live_rows) < counts[0], h), NEURONS)

    out = _on_shards(mesh, local, (P(), P(NEURONS), P(NEURONS)), P())(h, buffers, counts)
    if b_down is not None:
        out = out + b_down
    return x + out.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "part_slices"))
def scratch_ffn(cfg: ModelConfig, mesh, part_slices, x, h, scratch, n_scratch):
    """x + FFN over chunks of records streamed through scratch (read this step, not cached).

    `scratch`: [S, rows, R] storage dtype, device s's chunk; `n_scratch`: [S] its valid rows.
    """

    def local(h, scratch, n_scratch):
        rows = split_records(scratch[0], part_slices)
        return jax.lax.psum(_rows_ffn(cfg, rows, jnp.arange(scratch.shape[1]) < n_scratch[0], h), NEURONS)

    out = _on_shards(mesh, local, (P(), P(NEURONS), P(NEURONS)), P())(h, scratch, n_scratch)
    return x + out.astype(x.dtype)


@functools.partial(jax.jit, static_argnames=("mesh", "part_slices"), donate_argnames=("buffers",))
def update_cache(mesh, part_slices, buffers, moves_src, moves_dst, load_slots, loaded):
    """Per device: deletes by moving rows moves_src -> moves_dst, then writes `loaded` records at
    load_slots. Index arrays are [S, size] and `loaded` is [S, size, R], row s for device s.

    Sources of moves are never destinations (the cache moves rows from its tail into holes below
    the new count), so gather-then-scatter is well defined. Padding uses an out-of-range destination.
    """

    def local(buffers, moves_src, moves_dst, load_slots, loaded):
        out = {}
        for name, (start, stop) in part_slices:
            buf = buffers[name]
            buf = buf.at[moves_dst[0]].set(buf[moves_src[0]], mode="drop")
            buf = buf.at[load_slots[0]].set(loaded[0, :, start:stop].astype(buf.dtype), mode="drop")
            out[name] = buf
        return out

    return _on_shards(mesh, local, (P(NEURONS),) * 5, P(NEURONS))(buffers, moves_src, moves_dst, load_slots, loaded)


@functools.partial(jax.jit, static_argnames=("cfg", "greedy"))
def head(cfg: ModelConfig, params, x, last, key, temperature, top_k, top_p, greedy):
    """Final norm, logits and sampling at position `last` of x [B, T, D]."""
    logits = final_logits(cfg, params, jax.lax.dynamic_slice_in_dim(x, last, 1, axis=1))[:, 0]
    return sample(logits, key, temperature, top_k, top_p, greedy), logits

