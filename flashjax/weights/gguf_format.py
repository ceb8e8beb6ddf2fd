"""A small, fast reader of the GGUF container format (llama.cpp's model files).

    model = GGUFContainer("model.gguf")
    model.fields["tokenizer.ggml.tokens"]   # python values: int, float, bool, str, (nested) lists
    t = model.tensors["token_embd.weight"]  # name, tensor_type, dims, shape, data_offset, n_bytes, data

It reads what `gguf.GGUFReader` reads and gives tensor data in the same form (so
`gguf.quants.dequantize(t.data, t.tensor_type)` works on it), but parses arrays in bulk: GGUFReader
builds a few numpy views per array element, which takes tens of seconds on a 262k-token vocabulary.

Layout (gguf/gguf_reader.py, gguf/constants.py; little-endian): magic "GGUF", uint32 version (2 or 3),
uint64 tensor count, uint64 key/value count, the key/values (string key, uint32 value type, value),
the tensor infos (string name, uint32 n_dims, uint64 dims fastest-first, uint32 ggml type, uint64
offset into the data section), then the data section, which starts at the next multiple of
`general.alignment` (default 32). A string is a uint64 byte count and UTF-8 bytes; an array is a uint32
element type, a uint64 count and the elements (any type, arrays included).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

SUPPORTED_VERSIONS = (2, 3)

# Fixed-size value types: their little-endian numpy dtype.
_SCALAR_DTYPES = {
    GGUFValueType.UINT8: np.dtype("<u1"), GGUFValueType.INT8: np.dtype("<i1"),
    GGUFValueType.UINT16: np.dtype("<u2"), GGUFValueType.INT16: np.dtype("<i2"),
    GGUFValueType.UINT32: np.dtype("<u4"), GGUFValueType.INT32: np.dtype("<i4"),
    GGUFValueType.UINT64: np.dtype("<u8"), GGUFValueType.INT64: np.dtype("<i8"),
    GGUFValueType.FLOAT32: np.dtype("<f4"), GGUFValueType.FLOAT64: np.dtype("<f8"),
    GGUFValueType.BOOL: np.dtype("<u1"),  # turned into bool after reading: any nonzero byte is true
}
_STRING_HEADER = 8  # the uint64 byte count in front of a string
_ARRAY_HEADER = 12  # an array's uint32 element type and uint64 count
_MAX_ARRAY_DEPTH = 8  # deeper nesting only comes from a corrupt file (and would exhaust the stack)

# Tensor types given as typed arrays in numpy shape; every other type (quantized blocks, and BF16,
# which numpy lacks) is given as raw uint8 bytes, rows of blocks, as gguf.GGUFReader does.
_PLAIN_TENSOR_DTYPES = {
    GGMLQuantizationType.F32: np.dtype("<f4"), GGMLQuantizationType.F16: np.dtype("<f2"),
    GGMLQuantizationType.F64: np.dtype("<f8"), GGMLQuantizationType.I8: np.dtype("<i1"),
    GGMLQuantizationType.I16: np.dtype("<i2"), GGMLQuantizationType.I32: np.dtype("<i4"),
    GGMLQuantizationType.I64: np.dtype("<i8"),
}

_U64 = struct.Struct("<Q")


class GGUFFormatError(ValueError):
    """A file that is not a GGUF file we can read; the message names the file and, where it applies,
    the key or tensor."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: not a readable GGUF file: {reason}")
        self.path, self.reason = path, reason


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    dims: tuple[int, ...]  # GGUF order, fastest-varying first (gguf.ReaderTensor.shape)
    data_offset: int  # absolute position of the data in the file
    n_bytes: int
    data: np.ndarray  # zero-copy view of the memory-mapped file; read-only

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy order (slowest-varying first)."""
        return self.dims[::-1]

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.dims, dtype=object))


class _Cursor:
    """Bounds-checked little-endian reads from the file's bytes; `what` in each call names the part
    being read for the error message."""

    def __init__(self, buf: memoryview, path: str):
        self.buf, self.path, self.pos = buf, path, 0

    def fail(self, reason: str) -> GGUFFormatError:
        return GGUFFormatError(self.path, reason)

    def need(self, n: int, what: str) -> None:
        if self.pos + n > len(self.buf):
            raise self.fail(f"truncated file: {what} needs bytes {self.pos}..{self.pos + n} "
                            f"but the file has {len(self.buf)} bytes")

    def numbers(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        self.need(count * dtype.itemsize, what)
        out = np.frombuffer(self.buf, dtype, count, self.pos)
        self.pos += count * dtype.itemsize
        return out

    def u32(self, what: str) -> int:
        return int(self.numbers(_SCALAR_DTYPES[GGUFValueType.UINT32], 1, what)[0])

    def u64(self, what: str) -> int:
        return int(self.numbers(_SCALAR_DTYPES[GGUFValueType.UINT64], 1, what)[0])

    def string(self, what: str) -> str:
        return self.strings(1, what)[0]

    def strings(self, count: int, what: str) -> list[str]:
        # The hot loop for vocabularies: struct and memoryview slices, no numpy per element.
        self.need(count * _STRING_HEADER, what)  # fails at once on an absurd count
        buf, size, pos, out = self.buf, len(self.buf), self.pos, []
        unpack, append = _U64.unpack_from, out.append
        for i in range(count):
            (n,) = unpack(buf, pos)  # in bounds: the check above and the one below
            pos += _STRING_HEADER
            if pos + n + (count - i - 1) * _STRING_HEADER > size:  # this string and the later headers
                self.pos = pos
                self.need(n + (count - i - 1) * _STRING_HEADER, _item(what, i, count))
            try:
                append(str(buf[pos:pos + n], "utf-8"))
            except UnicodeDecodeError as e:
                raise self.fail(f"{_item(what, i, count)} is not valid UTF-8 ({e})") from None
            pos += n
        self.pos = pos
        return out

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(what)
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {raw}") from None

    def array_header(self, what: str) -> tuple[GGUFValueType, int]:
        return self.value_type(f"{what} (array element type)"), self.u64(f"{what} (array length)")

    def scalar(self, vtype: GGUFValueType, what: str) -> Any:
        """One value of a type other than ARRAY: a python int, float, bool or str."""
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        return self.array(vtype, 1, what, depth=0)[0]

    def array(self, element_type: GGUFValueType, count: int, what: str, depth: int) -> list:
        """The `count` elements of an array; `depth` counts the arrays around them."""
        if element_type == GGUFValueType.STRING:
            return self.strings(count, what)
        if element_type == GGUFValueType.ARRAY:
            if depth >= _MAX_ARRAY_DEPTH:
                raise self.fail(f"{what} nests arrays more than {_MAX_ARRAY_DEPTH} deep")
            self.need(count * _ARRAY_HEADER, what)  # fails at once on an absurd count
            items = (_item(what, i, count) for i in range(count))
            return [self.array(*self.array_header(item), item, depth + 1) for item in items]
        values = self.numbers(_SCALAR_DTYPES[element_type], count, what)
        return (values != 0 if element_type == GGUFValueType.BOOL else values).tolist()


def _item(what: str, index: int, count: int) -> str:
    return what if count == 1 else f"{what} [{index}]"


class GGUFContainer:
    """A GGUF file, memory-mapped: its metadata parsed into python values, its tensors as views."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        # np.memmap refuses empty files; the cursor then reports the missing magic.
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
        cursor = _Cursor(memoryview(self._map), self.path)
        self.version = self._read_header(cursor)
        tensor_count = cursor.u64("the tensor count")
        kv_count = cursor.u64("the key/value count")
        self.fields: dict[str, Any] = {}
        self.field_types: dict[str, tuple[GGUFValueType, ...]] = {}  # (type,) or (ARRAY, element type)
        self._read_fields(cursor, kv_count)
        infos = self._read_tensor_infos(cursor, tensor_count)
        self.alignment = self._alignment(cursor)
        self.data_offset = -(-cursor.pos // self.alignment) * self.alignment  # the next multiple
        self.tensors: dict[str, GGUFTensor] = {}
        for name, dims, ggml_type, offset in infos:
            self.tensors[name] = self._tensor(cursor, name, dims, ggml_type, self.data_offset + offset)

    @staticmethod
    def _read_header(cursor: _Cursor) -> int:
        magic = bytes(cursor.buf[:4])
        if magic != struct.pack("<I", GGUF_MAGIC):
            raise cursor.fail(f"it starts with {magic!r}, not the GGUF magic b'GGUF'")
        cursor.pos = 4
        version = cursor.u32("the version")
        if version and version & 0xFFFF == 0:
            # Read little-endian, a big-endian file's small version has zero low bytes (gguf.GGUFReader's test).
            raise cursor.fail("big-endian GGUF files are not supported")
        if version not in SUPPORTED_VERSIONS:
            raise cursor.fail(f"GGUF version {version} is not supported (only versions 2 and 3)")
        return version

    def _read_fields(self, cursor: _Cursor, count: int) -> None:
        # A key/value is at least a string header, a type and one byte: an absurd count fails at once.
        cursor.need(count * (_STRING_HEADER + 4 + 1), f"{count} key/values")
        for index in range(count):
            key = cursor.string(f"key {index}")
            if key in self.fields:
                raise cursor.fail(f"key {key!r} appears twice")
            what = f"key {key!r}"
            vtype = cursor.value_type(what)
            if vtype == GGUFValueType.ARRAY:
                element_type, length = cursor.array_header(what)
                self.fields[key] = cursor.array(element_type, length, what, depth=1)
                self.field_types[key] = (vtype, element_type)
            else:
                self.fields[key] = cursor.scalar(vtype, what)
                self.field_types[key] = (vtype,)

    @staticmethod
    def _read_tensor_infos(cursor: _Cursor, count: int) -> list[tuple[str, tuple[int, ...], int, int]]:
        cursor.need(count * (_STRING_HEADER + 4 + 4 + 8), f"{count} tensor infos")
        infos, names = [], set()
        for index in range(count):
            name = cursor.string(f"tensor info {index} (name)")
            if name in names:
                raise cursor.fail(f"tensor {name!r} appears twice")
            names.add(name)
            n_dims = cursor.u32(f"tensor {name!r} (n_dims)")
            dims = cursor.numbers(_SCALAR_DTYPES[GGUFValueType.UINT64], n_dims, f"tensor {name!r} (dims)")
            dims = tuple(dims.tolist())
            ggml_type = cursor.u32(f"tensor {name!r} (type)")
            offset = cursor.u64(f"tensor {name!r} (offset)")
            infos.append((name, dims, ggml_type, offset))
        return infos

    def _alignment(self, cursor: _Cursor) -> int:
        if "general.alignment" not in self.fields:
            return GGUF_DEFAULT_ALIGNMENT
        alignment = self.fields["general.alignment"]
        if self.field_types["general.alignment"] != (GGUFValueType.UINT32,):
            raise cursor.fail("general.alignment is not a uint32")
        if alignment == 0 or alignment & (alignment - 1):
            raise cursor.fail(f"general.alignment = {alignment} is not a power of two")
        return alignment

    def _tensor(self, cursor: _Cursor, name: str, dims: tuple[int, ...], raw_type: int, start: int) -> GGUFTensor:
        try:
            ggml_type = GGMLQuantizationType(raw_type)
            block_size, type_size = GGML_QUANT_SIZES[ggml_type]
        except (ValueError, KeyError):
            raise cursor.fail(f"tensor {name!r} has unknown ggml type {raw_type}") from None
        shape = dims[::-1]
        dtype = _PLAIN_TENSOR_DTYPES.get(ggml_type)
        if dtype is None:  # raw bytes, rows of blocks: (..., dims[0] // block_size * type_size)
            dtype = np.dtype(np.uint8)
            if not dims or dims[0] % block_size:
                raise cursor.fail(f"tensor {name!r} of type {ggml_type.name} has dims {list(dims)}: its rows are "
                                  f"not a whole number of {block_size}-element blocks")
            shape = (*shape[:-1], dims[0] // block_size * type_size)
        n_bytes = int(np.prod(dims, dtype=object)) * type_size // block_size
        if start + n_bytes > len(cursor.buf):
            raise cursor.fail(f"truncated file: tensor {name!r} ends at byte {start + n_bytes} "
                              f"but the file has {len(cursor.buf)} bytes")
        data = np.frombuffer(cursor.buf, dtype, n_bytes // dtype.itemsize, start).reshape(shape)
        return GGUFTensor(name, ggml_type, dims, start, n_bytes, data)
