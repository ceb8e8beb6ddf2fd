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

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from flashjax.config import ModelConfig
from flashjax.flash.shards import NEURONS
from flashjax.model.layers import ffn_over_neurons, neuron_weights, route
from flashjax.model.transformer import attention_block, embed, ffn_input, ffn_residual, final_logits
from flashjax.quant import decode_float, decode_rows
from flashjax.sampling import sample


@functools.partial(jax.jit, static_argnames=("cfg", "dtype"))
def embed_tokens(cfg: ModelConfig, params, tokens, positions, dtype):
    """The residual stream starts in the compute dtype even when the tables are held narrower."""
    return embed(cfg, params, tokens, positions).astype(dtype)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("kv",))
def attention_step(cfg: ModelConfig, layer, x, positions, start, kv):
    """One layer up to its FFN: returns (residual stream, FFN input, this layer's KV cache). `cfg` is
    the layer's own (`ModelConfig.layer_config`), as in every step that runs attention."""
    x, kv = attention_block(cfg, layer, x, positions, start, kv)
    return x, ffn_input(cfg, layer, x), kv


@functools.partial(jax.jit, static_argnames=("cfg", "select", "ahead"), donate_argnames=("kv",))
def attention_select_step(cfg: ModelConfig, select, ahead, layer, x, positions, start, kv, rule, ahead_rule):
    """One layer up to its FFN, and the choice of its neurons, in one dispatch, for selectors that
    pick from the layer's own FFN input (predictor, gate).

    `select(params, h, value)` is the layer's rule (flash/selection.py `MaskRule`: threshold or top-k
    on predictor scores or on |silu(gate)|), `rule` its (params, value); `ahead`, when not None,
    guesses layer l+1's neurons from this layer's FFN input (lookahead) with `ahead_rule`.
    Returns (residual stream, FFN input, KV cache, needed [F] bool, predicted for l+1 [F] bool or None).
    """
    x, kv = attention_block(cfg, layer, x, positions, start, kv)
    h = ffn_input(cfg, layer, x)
    (params, value) = rule
    needed = select(params, h, value)
    predicted = None
    if ahead is not None:
        (ahead_params, ahead_value) = ahead_rule
        predicted = ahead(ahead_params, h, ahead_value)
    return x, h, kv, needed, predicted


@functools.partial(jax.jit, static_argnames=("cfg", "select"), donate_argnames=("kv",))
def attention_route_step(cfg: ModelConfig, layer, next_router, x, positions, start, kv, select=None, rule=None):
    """One mixture-of-experts layer up to its FFN, and the router's choice, in one dispatch. With
    `next_router` (layer l+1's router) the next layer's experts are guessed from this layer's FFN
    input too, so their reads can start while this layer computes (the router applied early). With
    `select` (a flash/selection.py `MaskRule` function, static: every layer shares one compile) and
    its `rule` (params, value), the layer's neuron mask inside the experts (predictor, gate path).
    Returns (residual stream, FFN input, KV cache, expert weights [B, T, E], guess for l+1 or None,
    needed [F] bool or None)."""
    x, kv = attention_block(cfg, layer, x, positions, start, kv)
    h = ffn_input(cfg, layer, x)
    weights = route(cfg, layer["ffn"]["router"], h)
    guess = None if next_router is None else route(cfg, next_router, h)
    needed = None
    if select is not None:
        (params, value) = rule
        needed = select(params, h, value)
    return x, h, kv, weights, guess, needed


@dataclasses.dataclass(frozen=True)
class RecordPart:
    """Where a part of a neuron's record lies (columns start:stop) and how it is encoded: `kind` None
    (float records: the part as stored), "q8"/"q4" (quantized bytes of `values` values) or
    "float32" (a quantized record's bias, as bytes). Hashable: the jitted steps take it as static."""

    name: str
    start: int
    stop: int
    kind: str | None = None
    values: int = 0

    @classmethod
    def of_layout(cls, layout) -> tuple["RecordPart", ...]:
        return tuple(cls(name, layout.part_slice(name).start, layout.part_slice(name).stop, layout.part_kind(name),
                         layout.part_values(name)) for name in layout.names)


def decode_part(part: RecordPart, raw):
    """A part's rows [N, stop - start] as `ffn_over_neurons` multiplies them: as stored, a quantized
    matrix (slices and bitcasts, fused into the dequantizing loop), or float32 biases."""
    if part.kind is None:
        return raw
    if part.kind == "float32":
        return decode_float(raw, jnp.float32)
    return decode_rows(raw, part.kind, part.values)


def _rows_ffn(cfg: ModelConfig, parts: dict, valid, h, part_slices, expert_weights=None, row_experts=None):
    """FFN contribution of the neurons in `parts` ({name: raw rows}, rows where `valid`) for h [B, T, D];
    a mixture of experts weighs each row by its expert's weight (`row_experts` [N] names them)."""
    decoded = {part.name: decode_part(part, parts[part.name]) for part in part_slices}
    scale = None if expert_weights is None else neuron_weights(cfg, expert_weights, row_experts)
    return ffn_over_neurons(cfg, h, decoded, live=valid, scale=scale)


def _routed_slots_ffn(cfg: ModelConfig, buffers: dict, slots, experts, expert_weights, h, part_slices):
    """A mixture of experts' cached experts that the router chose, one slot at a time (`slots` [k]:
    slot s holds rows s * expert_ffn ..; -1: none), each weighed by its expert's weight: a token
    multiplies its k experts, never the other cached ones (their weight is 0 anyway)."""
    f = cfg.expert_ffn

    def one_expert(i, out):
        def compute(out):
            start = slots[i] * f
            rows = {part.name: decode_part(part, jax.lax.dynamic_slice_in_dim(buffers[part.name], start, f, axis=0))
                    for part in part_slices}
            # [B, T, F]: the expert's weight on each of its neurons
            scale = jnp.broadcast_to(expert_weights[..., experts[i], None], h.shape[:-1] + (f,))
            return out + ffn_over_neurons(cfg, h, rows, scale=scale)

        return jax.lax.cond(slots[i] >= 0, compute, lambda out: out, out)

    # The sum varies over the device axis (each device its own cache), as the loop's carry must say.
    zeros = jax.lax.pcast(jnp.zeros(h.shape, h.dtype), (NEURONS,), to="varying")
    return jax.lax.fori_loop(0, slots.shape[0], one_expert, zeros)


def split_records(rows, part_slices):
    """[N, R] records -> {part: [N, width]}, still as stored (converted as multiplied)."""
    return {part.name: rows[:, part.start:part.stop] for part in part_slices}


def _on_shards(mesh, fn, in_specs, out_specs):
    """`fn` per device of the ("neurons",) mesh: each sees its own shard of the P(NEURONS) inputs."""
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def _sparse_ffn(cfg: ModelConfig, mesh, part_slices, h, cached, scratch, expert_weights=None):
    """FFN(h) [B, T, D] over every device's cached rows plus a chunk of streamed records, summed
    across the mesh (+ nothing else: the caller adds the down-projection bias).

    `cached`: ({part: [S * capacity, width]}, counts [S]) or None (no cache): every device's buffer,
    rows past its count masked. The whole capacity is multiplied, so the count never changes a
    shape. `scratch`: (records [S, rows, R], valid rows [S]) or None. A mixture of experts passes
    `expert_weights` [B, T, E] (the router's); its `cached` carries the slots of the routed experts
    the cache holds and those experts ([k] each, slot -1 for none), its `scratch` the expert of every
    row ([S, rows]).
    """
    args, specs = [h], [P()]
    if expert_weights is not None:
        args.append(expert_weights)
        specs.append(P())
    for rows in (cached, scratch):
        if rows is not None:
            args.append(rows)
            specs.append((P(NEURONS),) * len(rows))

    def local(h, *parts):
        out, parts = jnp.zeros(h.shape, h.dtype), iter(parts)
        weights = next(parts) if expert_weights is not None else None
        if cached is not None:
            buffers, counts, *routed = next(parts)
            if routed:  # a mixture of experts: only the routed experts' slots
                out = out + _routed_slots_ffn(cfg, buffers, *routed, weights, h, part_slices)
            else:
                capacity = next(iter(buffers.values())).shape[0]
                out = out + _rows_ffn(cfg, buffers, jnp.arange(capacity) < counts[0], h, part_slices)
        if scratch is not None:
            records, n_valid, *row_experts = next(parts)
            out = out + _rows_ffn(cfg, split_records(records[0], part_slices), jnp.arange(records.shape[1]) < n_valid[0], h,
                                  part_slices, weights, row_experts[0][0] if row_experts else None)
        return jax.lax.psum(out, NEURONS)

    return _on_shards(mesh, local, tuple(specs), P())(*args)


def _with_bias(out, b_down):
    return out if b_down is None else out + b_down


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "part_slices"), donate_argnames=("kv",))
def layer_step(cfg: ModelConfig, mesh, part_slices, layer, x, positions, start, kv, cached, scratch):
    """One whole layer in one dispatch, for neuron sets known before the layer runs (naive, hybrid,
    oracle, prefill): attention, then the FFN over the cached rows and one scratch chunk.
    Returns (residual stream, FFN input, this layer's KV cache, (stream before the FFN, FFN output
    so far): what `ffn_step` adds further scratch chunks to)."""
    x, kv = attention_block(cfg, layer, x, positions, start, kv)
    h = ffn_input(cfg, layer, x)
    out = _with_bias(_sparse_ffn(cfg, mesh, part_slices, h, cached, scratch), layer["ffn"].get("b_down"))
    return ffn_residual(cfg, layer.get("post_ffn_norm"), x, out), h, kv, (x, out)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "part_slices"))
def ffn_step(cfg: ModelConfig, mesh, part_slices, post_ffn_norm, partial, h, b_down, cached, scratch,
             expert_weights=None):
    """The FFN over the cached rows and one scratch chunk, added to what an earlier step of this
    layer computed: `partial` is (stream before the FFN, FFN output so far or None). For neuron sets
    chosen from the layer's own FFN input (predictor, gate, a mixture of experts' router, with its
    `expert_weights`), where attention ran as its own step, and for scratch chunks past the first.
    Returns (residual stream, (stream before the FFN, FFN output))."""
    x, so_far = partial
    out = _with_bias(_sparse_ffn(cfg, mesh, part_slices, h, cached, scratch, expert_weights), b_down)
    if so_far is not None:
        out = so_far + out
    return ffn_residual(cfg, post_ffn_norm, x, out), (x, out)


@functools.partial(jax.jit, static_argnames=("mesh", "part_slices"), donate_argnames=("buffers",))
def update_cache(mesh, part_slices, buffers, moves_src, moves_dst, load_slots, loaded):
    """Per device: deletes by moving rows moves_src -> moves_dst, then writes `loaded` records at
    load_slots. Index arrays are [S, size] and `loaded` is [S, size, R], row s for device s.

    Sources of moves are never destinations (the cache moves rows from its tail into holes below
    the new count), so gather-then-scatter is well defined. Padding uses an out-of-range destination.
    """

    def local(buffers, moves_src, moves_dst, load_slots, loaded):
        out = {}
        for part in part_slices:
            buf = buffers[part.name]
            buf = buf.at[moves_dst[0]].set(buf[moves_src[0]], mode="drop")
            buf = buf.at[load_slots[0]].set(loaded[0, :, part.start:part.stop].astype(buf.dtype), mode="drop")
            out[part.name] = buf
        return out

    return _on_shards(mesh, local, (P(NEURONS),) * 5, P(NEURONS))(buffers, moves_src, moves_dst, load_slots, loaded)


@functools.partial(jax.jit, static_argnames=("cfg", "greedy"))
def head(cfg: ModelConfig, params, x, last, key, temperature, top_k, top_p, greedy):
    """Final norm, logits and sampling at position `last` of x [B, T, D]."""
    logits = final_logits(cfg, params, jax.lax.dynamic_slice_in_dim(x, last, 1, axis=1))[:, 0]
    return sample(logits, key, temperature, top_k, top_p, greedy), logits

