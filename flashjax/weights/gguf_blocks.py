"""GGUF quantized blocks read as flashjax's quantized rows, code for code (no float round trip).

The block types that map onto `flashjax.quant`'s formats without changing a weight's value:

- Q8_0 (f16 d, 32 x int8 q; value d * q) -> q8, exactly.
- Q5_0 (f16 d, 32 high bits, 16 bytes of low nibbles; value d * (q - 16)) -> q8 with codes q - 16, exactly.
- Q4_0 (f16 d, 16 bytes of nibbles; value d * (q - 8)) -> q4 with scale d and offset -8 d, exactly
  (-8 d is d scaled by a power of two, so float16 holds it).
- Q4_1 (f16 d, f16 m, 16 bytes; value d * q + m) -> q4, exactly: the same bytes.
- Q4_K (super-blocks of 256: f16 d, f16 dmin, 12 bytes of 6-bit sub-block scales and mins, 128
  bytes of nibbles; value d * sc * q - dmin * m per sub-block of 32) -> q4 with the same codes and
  scale d * sc, offset -dmin * m rounded to float16 (the only change: `tensor_error` reports it).

Byte layouts follow ggml-quants.c (`dequantize_row_*`), read with numpy; `gguf.quants.dequantize`
is the reference the tests compare with. Everything else returns None: the caller dequantizes.
"""

from __future__ import annotations

import numpy as np

from flashjax.quant import GROUP, QuantizedRows, pack_codes

DIRECT = {"Q8_0": "q8", "Q5_0": "q8", "Q4_0": "q4", "Q4_1": "q4", "Q4_K": "q4"}


def _f16(raw: np.ndarray, start: int) -> np.ndarray:
    """float16 [rows, blocks] from bytes start:start+2 of each block of raw [rows, blocks, size]."""
    return np.ascontiguousarray(raw[:, :, start:start + 2]).view("<f2")[..., 0].astype(np.float16)


def _nibble_codes(qs: np.ndarray) -> np.ndarray:
    """ggml's 16-byte nibble block [rows, blocks, 16] -> codes [rows, blocks, 32] (low nibbles are
    values 0..15, high nibbles 16..31)."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _rows(kind: str, codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray | None) -> QuantizedRows:
    rows = codes.shape[0]
    flat = codes.reshape(rows, -1)
    values = pack_codes(flat) if kind == "q4" else flat.astype(np.int8)
    return QuantizedRows(kind, values, scales.reshape(rows, -1), None if offsets is None else offsets.reshape(rows, -1))


def _q4_k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 packed bytes per super-block [rows, sb, 12] -> (sc, m) 6-bit ints [rows, sb, 8]
    (ggml's get_scale_min_k4)."""
    s = scales.astype(np.uint16)
    sc = np.empty(s.shape[:-1] + (8,), np.uint16)
    m = np.empty_like(sc)
    sc[..., :4] = s[..., 0:4] & 63
    m[..., :4] = s[..., 4:8] & 63
    sc[..., 4:] = (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)
    m[..., 4:] = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return sc, m


def read_blocks(type_name: str, data: np.ndarray, k: int) -> QuantizedRows | None:
    """The quantized rows of a GGUF tensor's data (uint8 [rows, row bytes]) with rows of `k` values,
    or None when its type has no direct mapping."""
    if type_name not in DIRECT or k % GROUP:
        return None
    rows = data.shape[0]
    raw = np.asarray(data, np.uint8)
    if type_name == "Q8_0":
        b = raw.reshape(rows, -1, 34)
        return _rows("q8", b[:, :, 2:].view(np.int8), _f16(b, 0), None)
    if type_name == "Q5_0":
        b = raw.reshape(rows, -1, 22)
        high = np.ascontiguousarray(b[:, :, 2:6]).view("<u4")[..., 0]  # bit j: value j's fifth bit
        bits = ((high[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16)
        codes = _nibble_codes(b[:, :, 6:]).astype(np.int16) | (bits << 4)
        return _rows("q8", (codes - 16).astype(np.int8), _f16(b, 0), None)
    if type_name == "Q4_0":
        b = raw.reshape(rows, -1, 18)
        d = _f16(b, 0)
        return _rows("q4", _nibble_codes(b[:, :, 2:]), d, (d.astype(np.float32) * -8).astype(np.float16))
    if type_name == "Q4_1":
        b = raw.reshape(rows, -1, 20)
        return _rows("q4", _nibble_codes(b[:, :, 4:]), _f16(b, 0), _f16(b, 2))
    # Q4_K
    b = raw.reshape(rows, -1, 144)
    d, dmin = _f16(b, 0).astype(np.float32), _f16(b, 2).astype(np.float32)
    sc, m = _q4_k_scales(b[:, :, 4:16])
    qs = b[:, :, 16:].reshape(rows, -1, 4, 32)  # 4 chunks of 64 values: low nibbles, then high
    codes = np.stack([qs & 15, qs >> 4], axis=3).reshape(rows, -1, 8, 32)  # sub-blocks in order
    scales = (d[..., None] * sc).astype(np.float16)
    offsets = (-(dmin[..., None] * m)).astype(np.float16)
    return _rows("q4", codes, scales, offsets)
