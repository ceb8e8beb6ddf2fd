"""Multiplying activations by weights held narrower than the compute dtype, in one place.

Every weight product of the model goes through `weight_matmul`: resident weights (attention, the
head), the dense FFN, and the flash engine's cached and streamed neuron rows, whether they are held
in the compute dtype or as stored (float16, bfloat16, or 8- and 4-bit blocks with their scales:
`flashjax.quant.QuantizedMatrix`).

Why a function of its own: XLA:CPU converts a narrow matrix by writing the converted copy to memory
before the dot (the dot is a library call that does not fuse its operands), so `w.astype(f32) @ h`
costs a memory copy of the float32 matrix, about ten times the float32 product itself when the
matrix is larger than the cache. Converting one cache-sized block of rows at a time inside a loop
keeps the converted block in cache. bfloat16 is fastest as an elementwise product and a sum, which
XLA:CPU fuses into one pass over the weights. GPUs and TPUs fuse the convert into the dot, so
there the plain form is used. `benchmarks/bench_matmul.py` measures every form; the choices and
block size below come from its table (the README's "Performance notes" sum it up).

Axis letters: K the contracted axis, N the other axis of the weight matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flashjax.quant import QuantizedMatrix, merge_halves, split_halves

# Rows of a weight block converted at once: about this many bytes once converted to float32, so a
# block stays in the L2 cache. Measured on XLA:CPU (bench_matmul.py): 128 KiB-512 KiB are within
# noise of each other and 4-14x faster than converting the whole matrix; 2 MiB and up fall back
# toward the whole-matrix cost.
BLOCK_BYTES = 256 * 1024


def block_rows(k: int, itemsize: int = 4) -> int:
    """Rows per converted block for weight rows of `k` values (a multiple of 8, at least 8)."""
    return max(8, (BLOCK_BYTES // (k * itemsize)) // 8 * 8)


def weight_matmul(x, w, w_rows_are_outputs: bool = True):
    """x [..., K] times a weight matrix held in any float dtype or quantized; the result is in x's dtype.

    `w_rows_are_outputs=True`: w [N, K] (the Hugging Face [out, in] layout): x @ w.T -> [..., N].
    `w_rows_are_outputs=False`: w [K, N] (neuron-major records' down rows): x @ w -> [..., N].
    A quantized matrix's blocks run along its stored rows, so either orientation dequantizes whole
    rows: it is always multiplied a block of rows at a time (on every platform: the unpacking does
    not fuse into a library dot), unless it is smaller than a block.
    """
    dtype = x.dtype
    one_block = w.shape[0] * w.shape[1] * jnp.dtype(dtype).itemsize <= BLOCK_BYTES  # converted whole, it stays in cache
    if isinstance(w, QuantizedMatrix):
        return _block_product(x, w, w_rows_are_outputs) if one_block else _blockwise(x, w, w_rows_are_outputs)
    if w.dtype == dtype or jax.default_backend() != "cpu":
        return _plain(x, w.astype(dtype), w_rows_are_outputs)
    one_token = x.size == x.shape[-1]
    if w.dtype == jnp.bfloat16 and one_token:
        return _product_and_sum(x, w, w_rows_are_outputs)
    if one_block:
        return _block_product(x, w, w_rows_are_outputs)
    if one_token or w_rows_are_outputs:
        return _blockwise(x, w, w_rows_are_outputs)
    # Several tokens with the rows contracted (a prefill's down projection): the blocks' partial
    # sums [blocks, T, N] would cost more than the one converted copy.
    return _plain(x, w.astype(dtype), w_rows_are_outputs)


def _quantized_product(x, w: QuantizedMatrix, w_rows_are_outputs: bool):
    """x times a quantized matrix small enough to dequantize at once (a block of rows). 4-bit rows
    are dequantized as two halves, x split (or the output merged) to match: see
    `QuantizedMatrix.dequantize_halves`."""
    if w.kind != "q4":
        return _plain(x, w.dequantize(x.dtype), w_rows_are_outputs)
    low, high = w.dequantize_halves(x.dtype)
    if w_rows_are_outputs:
        x_low, x_high = split_halves(x)
        return _plain(x_low, low, True) + _plain(x_high, high, True)
    return merge_halves(_plain(x, low, False), _plain(x, high, False))


def _block_product(x, w_block, w_rows_are_outputs: bool):
    """x times one block of rows of w (any dtype, or quantized), converted only inside this product."""
    if isinstance(w_block, QuantizedMatrix):
        return _quantized_product(x, w_block, w_rows_are_outputs)
    return _plain(x, w_block.astype(x.dtype), w_rows_are_outputs)


def _plain(x, w, w_rows_are_outputs: bool):
    # [..., N]
    return jnp.einsum("...k,nk->...n", x, w) if w_rows_are_outputs else jnp.einsum("...k,kn->...n", x, w)


def _product_and_sum(x, w, w_rows_are_outputs: bool):
    """One fused pass of convert, multiply and reduce (no converted copy of w): the fastest form
    for bfloat16 and one token. The operand order matters on XLA:CPU: the converted weights with a
    leading unit axis, times x shaped to broadcast, measured 3 ms for 8192 x 2048 where the same
    product written x-first measured 200 ms (the layouts it picks differ)."""
    lead, k = x.shape[:-1], x.shape[-1]
    w32 = w.astype(x.dtype)[None]
    if w_rows_are_outputs:
        # [1, N, K] * [M, 1, K] -> [M, N]
        out = jnp.sum(w32 * x.reshape(-1, 1, k), axis=-1)
    else:
        # [1, K, N] * [M, K, 1] -> [M, N]
        out = jnp.sum(w32 * x.reshape(-1, k, 1), axis=-2)
    return out.reshape(lead + out.shape[-1:])


def _blockwise(x, w, w_rows_are_outputs: bool):
    """Row blocks of w converted one at a time inside a loop; the last, partial block on its own
    (static slices of a contiguous prefix and suffix: nothing is padded or copied). `lax.map` over
    block indices rather than a loop with a carry: inside shard_map (the flash engine splits neurons
    over devices) a carry would need the operands' sharding types spelled out."""
    rows, k = w.shape  # k: the length of one stored row, whichever axis is contracted
    block = min(block_rows(k, jnp.dtype(x.dtype).itemsize), rows)
    n_full = rows // block
    head = n_full * block

    def rows_of(start, size):
        if isinstance(w, QuantizedMatrix):
            return w.row_block(start, size)
        return jax.lax.dynamic_slice_in_dim(w, start, size, axis=0)

    tail = w.map_arrays(lambda a: a[head:]) if isinstance(w, QuantizedMatrix) else w[head:]  # past the last block

    if w_rows_are_outputs:
        # Output columns [i * block, (i + 1) * block) come from the same rows of w: [n_full, ..., block]
        parts = jax.lax.map(lambda i: _block_product(x, rows_of(i * block, block), True), jnp.arange(n_full))
        out = jnp.moveaxis(parts, 0, -2).reshape(x.shape[:-1] + (head,))
        if head < rows:
            out = jnp.concatenate([out, _block_product(x, tail, True)], axis=-1)
        return out

    # Rows of w are contracted: each block adds x[..., block] @ w[block] to the sum.
    def block_sum(i):
        return _block_product(jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=-1), rows_of(i * block, block), False)

    out = jnp.sum(jax.lax.map(block_sum, jnp.arange(n_full)), axis=0)
    if head < rows:
        out = out + _block_product(x[..., head:], tail, False)
    return out


def weight_rows(w, ids, dtype=jnp.float32):
    """Rows `ids` [...] of a weight table [V, K] (an embedding lookup) -> [..., K]. A float table's
    rows keep its dtype; a quantized table dequantizes only the rows taken, to `dtype`."""
    if isinstance(w, QuantizedMatrix):
        flat = ids.reshape(-1)
        rows = w.map_arrays(lambda a: jnp.take(a, flat, axis=0)).dequantize(dtype)
        return rows.reshape(ids.shape + rows.shape[-1:])
    return jnp.take(w, ids, axis=0)
