"""A minimal reader of the safetensors format, one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header mapping
each tensor name to its dtype, shape and byte range, then the raw data. We
parse it ourselves rather than use the `safetensors` package because numpy
has no bfloat16 (ml_dtypes does) and because we want errors that name the
file and tensor when a file is truncated.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

from flashjax.weights.errors import CheckpointError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """Index of one `.safetensors` file; `read(name)` returns one tensor as numpy."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) < 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file (no header)")
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > size - 8:
                    raise CheckpointError(f"{self.path}: truncated safetensors file (header of {header_len} bytes "
                                          f"does not fit in a {size}-byte file)")
                header = json.loads(f.read(header_len))
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._file_size = size
        self._entries = header

    def names(self) -> list[str]:
        return list(self._entries)

    def add_alias(self, alias: str, name: str) -> None:
        """Makes tensor `name` readable as `alias` too (checkpoints that nest the same tensors under
        another prefix)."""
        self._entries[alias] = self._entries[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def read(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        dtype_name = entry["dtype"]
        if dtype_name not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype_name}")
        dtype = np.dtype(_DTYPES[dtype_name])
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != expected:
            raise CheckpointError(f"{self.path}: tensor {name!r} spans {end - begin} bytes but its shape "
                                  f"{shape} and dtype {dtype_name} need {expected}")
        if self._data_start + end > self._file_size:
            raise CheckpointError(f"{self.path}: truncated file: tensor {name!r} ends at byte "
                                  f"{self._data_start + end} but the file has {self._file_size} bytes")
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            buf = f.read(end - begin)
        return np.frombuffer(buf, dtype=dtype).reshape(shape)
