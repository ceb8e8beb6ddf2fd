"""Quantized weights: 8-bit and 4-bit blocks with their scales, on disk, in memory and in the matmul.

Two formats, both in blocks of GROUP = 32 consecutive values of a stored row (the row of a weight
matrix in the Hugging Face [out, in] layout, or a neuron's record part):

- "q8": value = scale * q, q int8, one float16 scale per block (ggml's Q8_0: 8.5 bits per value).
- "q4": value = scale * q + offset, q in 0..15, one float16 scale and one float16 offset per block
  (ggml's Q4_1: 5 bits per value). A block's 16 bytes hold its values i (low nibble) and i + 16
  (high nibble), ggml's order, so a Q4_1 GGUF tensor is copied code for code and a Q4_K one keeps
  its codes (its sub-block scale d * sc and offset -dmin * m become the block's scale and offset).

Why these two (measured on the default model, see the README's "Quantized weights"): an offset per
block halves the 4-bit error of a symmetric Q4_0-style block on these weights for 0.5 bit more per
value; groups of 32 divide every matrix row of the supported models and match the GGUF blocks, so
no GGUF tensor is regrouped.

In memory a quantized matrix is a `QuantizedMatrix` pytree; `flashjax.model.matmul.weight_matmul`
multiplies by it one cache-sized block of rows at a time, so no full-size float copy exists. On disk
(FFN records, `record_bytes`) a row's quantized form is one byte string: values, then scales, then
offsets, so one read still brings a whole neuron.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

GROUP = 32
KINDS = ("q8", "q4")


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown quantization {kind!r}; choose one of {', '.join(KINDS)}")
    return kind


def quantizable(k: int) -> bool:
    """Whether rows of `k` values split into whole blocks."""
    return k % GROUP == 0 and k > 0


def value_bytes(kind: str, k: int) -> int:
    """Bytes of the quantized values of one row of `k` values."""
    return k if kind == "q8" else k // 2


def row_bytes(kind: str, k: int) -> int:
    """Bytes of one quantized row of `k` values: values, float16 scales (and q4's float16 offsets)."""
    blocks = k // GROUP
    return value_bytes(kind, k) + 2 * blocks * (1 if kind == "q8" else 2)


def bits_per_value(kind: str) -> float:
    return 8 * row_bytes(kind, GROUP) / GROUP


# -- numpy: quantize, dequantize, bytes -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantizedRows:
    """A quantized matrix as numpy arrays (the converter's and the store's form).

    values: q8 int8 [rows, k]; q4 uint8 [rows, k // 2] (two values per byte, ggml's order);
    scales, offsets: float16 [rows, k // GROUP] (offsets None for q8)."""

    kind: str
    values: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None = None
    # Where the rows came from (a GGUF block type, for the converter's report) and the relative RMS
    # error of their values against that source's own dequantized values (0 for a code-for-code copy).
    origin: str = ""
    origin_error: float = 0.0

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape[0], self.scales.shape[1] * GROUP

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.values, self.scales, self.offsets) if a is not None)

    def rows(self, index) -> "QuantizedRows":
        """The rows `index` (a slice, or an index array such as a permutation)."""
        return dataclasses.replace(self, values=self.values[index], scales=self.scales[index],
                                   offsets=None if self.offsets is None else self.offsets[index])

    def dequantize(self) -> np.ndarray:
        """float32 [rows, k], computed as ggml does (float32 scale times code, plus offset)."""
        rows, k = self.shape
        codes = unpack_codes(self.values) if self.kind == "q4" else self.values
        blocks = codes.reshape(rows, k // GROUP, GROUP).astype(np.float32) * self.scales.astype(np.float32)[..., None]
        if self.offsets is not None:
            blocks += self.offsets.astype(np.float32)[..., None]
        return blocks.reshape(rows, k)

    def to_bytes(self) -> np.ndarray:
        """uint8 [rows, row_bytes]: each row's values, scales, offsets (a record part)."""
        as_bytes = lambda a, dtype: np.ascontiguousarray(a, dtype).view(np.uint8)  # noqa: E731
        pieces = [as_bytes(self.values, self.values.dtype), as_bytes(self.scales, "<f2")]
        if self.offsets is not None:
            pieces.append(as_bytes(self.offsets, "<f2"))
        return np.concatenate(pieces, axis=1)

    @classmethod
    def from_bytes(cls, kind: str, raw: np.ndarray, k: int) -> "QuantizedRows":
        """The inverse of `to_bytes` for rows of `k` values."""
        raw = np.ascontiguousarray(raw, np.uint8)
        nv, nb = value_bytes(kind, k), k // GROUP
        values = raw[:, :nv].view(np.int8) if kind == "q8" else raw[:, :nv]
        scales = np.ascontiguousarray(raw[:, nv:nv + 2 * nb]).view("<f2").astype(np.float16)
        offsets = (np.ascontiguousarray(raw[:, nv + 2 * nb:nv + 4 * nb]).view("<f2").astype(np.float16)
                   if kind == "q4" else None)
        return cls(kind, np.ascontiguousarray(values), scales, offsets)


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """uint8 codes 0..15 [rows, k] -> [rows, k // 2]: byte j of a block = code j | code (j + 16) << 4."""
    rows, k = codes.shape
    blocks = codes.reshape(rows, k // GROUP, 2, GROUP // 2).astype(np.uint8)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(rows, k // 2)


def unpack_codes(packed: np.ndarray) -> np.ndarray:
    """The inverse of `pack_codes`: uint8 [rows, k // 2] -> codes 0..15 [rows, k]."""
    rows = packed.shape[0]
    blocks = packed.reshape(rows, -1, GROUP // 2)
    return np.stack([blocks & 15, blocks >> 4], axis=2).reshape(rows, -1)


def quantize(w: np.ndarray, kind: str) -> QuantizedRows:
    """Quantizes float rows w [rows, k] (k a multiple of GROUP), rounding to the nearest code with
    the block's float16 scale (the scale is rounded first, so codes fit the scale that is stored)."""
    check_kind(kind)
    w = np.asarray(w, np.float32)
    rows, k = w.shape
    if not quantizable(k):
        raise ValueError(f"rows of {k} values do not split into blocks of {GROUP}")
    blocks = w.reshape(rows, k // GROUP, GROUP)
    if kind == "q8":
        scale = (np.abs(blocks).max(axis=-1) / 127.0).astype(np.float16)
        s32 = scale.astype(np.float32)[..., None]
        q = np.where(s32 > 0, np.rint(blocks / np.where(s32 > 0, s32, 1.0)), 0.0)
        return QuantizedRows(kind, np.clip(q, -127, 127).astype(np.int8).reshape(rows, k), scale)
    low, high = blocks.min(axis=-1), blocks.max(axis=-1)
    offset = low.astype(np.float16)
    scale = ((high - offset.astype(np.float32)) / 15.0).astype(np.float16)
    s32, o32 = scale.astype(np.float32)[..., None], offset.astype(np.float32)[..., None]
    q = np.where(s32 > 0, np.rint((blocks - o32) / np.where(s32 > 0, s32, 1.0)), 0.0)
    codes = np.clip(q, 0, 15).astype(np.uint8).reshape(rows, k)
    return QuantizedRows(kind, pack_codes(codes), scale, offset)


def relative_rms_error(approx: np.ndarray, exact: np.ndarray) -> float:
    """RMS of the difference over the RMS of `exact` (0 for an exact copy)."""
    exact = np.asarray(exact, np.float64)
    diff = np.asarray(approx, np.float64) - exact
    scale = float(np.sqrt(np.mean(exact * exact)))
    return float(np.sqrt(np.mean(diff * diff))) / scale if scale > 0 else float(np.sqrt(np.mean(diff * diff)))


# -- jax: the in-memory matrix ----------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedMatrix:
    """A quantized weight matrix on a device (see `QuantizedRows` for the arrays); `kind` is static,
    so a jitted function compiles once per format."""

    values: jax.Array
    scales: jax.Array
    offsets: jax.Array | None
    kind: str = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self) -> tuple[int, int]:
        return self.values.shape[0], self.scales.shape[1] * GROUP

    @property
    def dtype(self):
        return self.scales.dtype  # what a block dequantizes from; never equal to a compute dtype

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for a in (self.values, self.scales, self.offsets) if a is not None)

    @classmethod
    def from_rows(cls, rows: QuantizedRows) -> "QuantizedMatrix":
        return cls(jnp.asarray(rows.values), jnp.asarray(rows.scales),
                   None if rows.offsets is None else jnp.asarray(rows.offsets), rows.kind)

    def map_arrays(self, fn) -> "QuantizedMatrix":
        """The same matrix with `fn` applied to each array along its rows (slicing, gathering)."""
        return QuantizedMatrix(fn(self.values), fn(self.scales), None if self.offsets is None else fn(self.offsets),
                               self.kind)

    def row_block(self, start, size: int) -> "QuantizedMatrix":
        return self.map_arrays(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis=0))

    def dequantize(self, dtype=jnp.float32):
        """[rows, k] in `dtype`. Called on cache-sized row blocks (weight_matmul), where XLA fuses the
        unpacking, scaling and the convert into one pass."""
        rows, k = self.shape
        if self.kind == "q4":
            packed = self.values.reshape(rows, k // GROUP, GROUP // 2)
            codes = jnp.concatenate([packed & 15, packed >> 4], axis=-1)  # [rows, blocks, GROUP]
        else:
            codes = self.values.reshape(rows, k // GROUP, GROUP)
        blocks = codes.astype(jnp.float32) * self.scales.astype(jnp.float32)[..., None]
        if self.offsets is not None:
            blocks = blocks + self.offsets.astype(jnp.float32)[..., None]
        return blocks.reshape(rows, k).astype(dtype)


    def dequantize_halves(self, dtype=jnp.float32):
        """q4 only: (low, high) [rows, k // 2] in `dtype`: each block's values 0..15 (its bytes' low
        nibbles) and 16..31 (high nibbles), blocks in order. Multiplying the halves separately and
        splitting x to match (`weight_matmul`) avoids interleaving the nibbles, which XLA:CPU does
        ten times slower than the unpacking itself (measured: bench_matmul.py)."""
        rows, k = self.shape
        packed = self.values.reshape(rows, k // GROUP, GROUP // 2)
        scales = self.scales.astype(jnp.float32)[..., None]
        offsets = self.offsets.astype(jnp.float32)[..., None]

        def half(codes):
            return (codes.astype(jnp.float32) * scales + offsets).reshape(rows, k // 2).astype(dtype)

        return half(packed & 15), half(packed >> 4)


def split_halves(x):
    """x [..., k] -> (values 0..15, values 16..31 of each block of GROUP), each [..., k // 2]."""
    lead, k = x.shape[:-1], x.shape[-1]
    blocks = x.reshape(lead + (k // GROUP, 2, GROUP // 2))
    return blocks[..., 0, :].reshape(lead + (k // 2,)), blocks[..., 1, :].reshape(lead + (k // 2,))


def merge_halves(low, high):
    """The inverse of `split_halves`: two [..., k // 2] -> [..., k]."""
    lead, half = low.shape[:-1], low.shape[-1]
    shape = lead + (half // (GROUP // 2), 1, GROUP // 2)
    return jnp.concatenate([low.reshape(shape), high.reshape(shape)], axis=-2).reshape(lead + (2 * half,))


def decode_rows(raw, kind: str, k: int) -> QuantizedMatrix:
    """Record bytes uint8 [N, row_bytes(kind, k)] (a jax array) -> the QuantizedMatrix they hold.
    Slices and bitcasts only: XLA fuses them into the dequantizing loop that reads them."""
    n = raw.shape[0]
    nv, nb = value_bytes(kind, k), k // GROUP

    def halves(start):  # float16 [N, nb] from 2 * nb bytes
        return jax.lax.bitcast_convert_type(raw[:, start:start + 2 * nb].reshape(n, nb, 2), jnp.float16)

    values = raw[:, :nv]
    if kind == "q8":
        values = jax.lax.bitcast_convert_type(values, jnp.int8)
    return QuantizedMatrix(values, halves(nv), halves(nv + 2 * nb) if kind == "q4" else None, kind)


def decode_float(raw, dtype) -> jax.Array:
    """Record bytes uint8 [N, width * itemsize] -> [N, width] of `dtype` (float parts of a quantized
    record, such as its biases)."""
    size = jnp.dtype(dtype).itemsize
    return jax.lax.bitcast_convert_type(raw.reshape(raw.shape[0], -1, size), dtype)
