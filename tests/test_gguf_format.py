"""flashjax.weights.gguf_format against gguf.GGUFReader, the independent reference.

Every field value and every tensor (name, type, dims, offset, bytes) must equal what GGUFReader gives,
on small files written with gguf.GGUFWriter (every value type, float and quantized tensors) and on real
models; truncated and corrupt files must raise GGUFFormatError naming the file and the part at fault.
"""

from __future__ import annotations

import random
import struct

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

from flashjax.tokenizer import Tokenizer, TokenizerError, _merges_from_scores
from flashjax.weights.errors import CheckpointError
from flashjax.weights.gguf_format import GGUFContainer, GGUFFormatError
from flashjax.weights.gguf_reader import GGUFFile

SCALARS = [  # key, value type, value written
    ("t.u8", V.UINT8, 200), ("t.i8", V.INT8, -100), ("t.u16", V.UINT16, 60000), ("t.i16", V.INT16, -30000),
    ("t.u32", V.UINT32, 4_000_000_000), ("t.i32", V.INT32, -2_000_000_000), ("t.u64", V.UINT64, 2**63 + 5),
    ("t.i64", V.INT64, -2**62), ("t.f32", V.FLOAT32, 0.1), ("t.f64", V.FLOAT64, 0.1),
    ("t.true", V.BOOL, True), ("t.false", V.BOOL, False), ("t.str", V.STRING, "héllo ▁ 😀\n\x00end"),
    ("t.empty_str", V.STRING, ""),
]
ARRAYS = [  # key, element type, values written
    ("t.a_u8", V.UINT8, [0, 255, 7]), ("t.a_i8", V.INT8, [-128, 127]), ("t.a_u16", V.UINT16, [1, 65535]),
    ("t.a_i16", V.INT16, [-32768, 5]), ("t.a_u32", V.UINT32, [2**32 - 1, 0]), ("t.a_i32", V.INT32, [-1, 2, -3]),
    ("t.a_u64", V.UINT64, [2**64 - 1]), ("t.a_i64", V.INT64, [-2**63, 2**63 - 1]),
    ("t.a_f32", V.FLOAT32, [0.1, -2.5, 1e30]), ("t.a_f64", V.FLOAT64, [0.1, -1e300]),
    ("t.a_bool", V.BOOL, [True, False, True]), ("t.a_str", V.STRING, ["a", "", "▁b😀", "<0x0A>"] * 50),
]
NESTED = {"t.nested_ints": [[1, 2], [3, 4, 5]], "t.nested_strs": [["a", "bc"], ["d"]],
          "t.nested3": [[[1.5], [2.5, 3.5]], [[4.5]]]}


def _tensors() -> dict[str, tuple[np.ndarray, Q | None]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    return {
        "f32": (rng.standard_normal((3, 5)).astype(np.float32), None),
        "f16": (rng.standard_normal((2, 3, 4)).astype(np.float16), None),
        "f64": (np.arange(6, dtype=np.float64), None),
        "i8": (np.arange(-3, 3, dtype=np.int8).reshape(2, 3), None),
        "i32": (np.arange(8, dtype=np.int32), None),
        "one": (np.array([1.5], np.float32), None),
        "q8_0": (gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0),
        "q4_1": (gguf.quants.quantize(x.reshape(2, 2, 64), Q.Q4_1), Q.Q4_1),
        "bf16": (gguf.quants.quantize(x, Q.BF16), Q.BF16),
    }


def write_tiny_gguf(path, alignment: int | None = None):
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, vtype, value in SCALARS:
        writer.add_key_value(key, value, vtype)
    for key, vtype, values in ARRAYS:
        writer.add_key_value(key, values, V.ARRAY, sub_type=vtype)
    for key, values in NESTED.items():
        writer.add_key_value(key, values, V.ARRAY)
    for name, (data, raw_dtype) in _tensors().items():
        writer.add_tensor(name, data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_gguf(tmp_path / "tiny.gguf")


def _flat(value):
    # gguf.GGUFReader flattens nested arrays (its FIXME); ours keeps them nested.
    if isinstance(value, list) and value and isinstance(value[0], list):
        return [item for part in value for item in _flat(part)]
    return value


def assert_same_as_gguf_reader(path) -> GGUFContainer:
    ours, ref = GGUFContainer(path), gguf.GGUFReader(path)
    assert ours.version == ref.fields["GGUF.version"].contents()
    ref_fields = {key: f for key, f in ref.fields.items() if not key.startswith("GGUF.")}
    assert list(ours.fields) == list(ref_fields)
    for key, field in ref_fields.items():
        assert _flat(ours.fields[key]) == field.contents(), key
        # GGUFReader: [type] or [ARRAY, element type, ...] ([ARRAY] alone for an empty array)
        assert ours.field_types[key][:len(field.types)] == tuple(field.types[:2]), key
    assert (ours.alignment, ours.data_offset) == (ref.alignment, ref.data_offset)
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for t in ref.tensors:
        o = ours.tensors[t.name]
        assert (o.tensor_type, o.dims, o.n_elements, o.n_bytes, o.data_offset) == (
            t.tensor_type, tuple(t.shape.tolist()), t.n_elements, t.n_bytes, t.data_offset), t.name
        assert o.shape == o.dims[::-1]
        assert (o.data.dtype, o.data.shape) == (t.data.dtype, t.data.shape), t.name
        assert np.array_equal(o.data.view(np.uint8), t.data.view(np.uint8)), t.name
        assert not o.data.flags.owndata and not o.data.flags.writeable  # a view of the read-only map
    return ours


@pytest.mark.parametrize("alignment", [None, 64])
def test_tiny_file_matches_gguf_reader(tmp_path, alignment):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", alignment)
    ours = assert_same_as_gguf_reader(path)
    assert ours.alignment == (alignment or 32) and ours.data_offset % ours.alignment == 0


def test_values_are_plain_python(tiny):
    fields = GGUFContainer(tiny).fields
    for key, vtype, value in SCALARS:
        expected = float(np.float32(value)) if vtype == V.FLOAT32 else value
        assert fields[key] == expected and type(fields[key]) is type(value), key
    for key, vtype, values in ARRAYS:
        expected = np.array(values, np.float32).tolist() if vtype == V.FLOAT32 else values
        assert fields[key] == expected and all(type(v) is type(values[0]) for v in fields[key]), key
    for key, values in NESTED.items():
        assert fields[key] == values
    assert fields["general.architecture"] == "llama"


def test_tensor_data_dequantizes_like_gguf_reader(tiny):
    ours, ref = GGUFContainer(tiny), {t.name: t for t in gguf.GGUFReader(tiny).tensors}
    for name, (data, raw_dtype) in _tensors().items():
        t = ours.tensors[name]
        if raw_dtype is None:
            assert t.shape == data.shape and np.array_equal(t.data, data)
        else:
            assert t.shape == data.shape[:-1] + (t.dims[0],)
            np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type),
                                          gguf.quants.dequantize(ref[name].data, t.tensor_type))
    # flashjax's own reader on top: numpy shapes and float32 values
    file = GGUFFile(tiny)
    assert file.shape("q4_1") == (2, 2, 64) and file.read("q4_1").shape == (2, 2, 64)
    np.testing.assert_array_equal(file.read("f16"), _tensors()["f16"][0].astype(np.float32))


def test_empty_array_and_tensorless_file(tmp_path):
    path = tmp_path / "empty_array.gguf"
    path.write_bytes(_raw([_kv("a", V.ARRAY, struct.pack("<IQ", V.STRING, 0)),
                           _kv("b", V.ARRAY, struct.pack("<IQ", V.FLOAT32, 0))]))
    ours = assert_same_as_gguf_reader(path)
    assert ours.fields == {"a": [], "b": []} and ours.tensors == {}


@pytest.mark.slow
def test_default_model_matches_gguf_reader(default_gguf):
    assert_same_as_gguf_reader(default_gguf)


@pytest.mark.big_model
def test_gemma3_270m_matches_gguf_reader():
    from flashjax.hub import default_model_path

    ours = assert_same_as_gguf_reader(default_model_path("gemma3-270m"))
    assert len(ours.fields["tokenizer.ggml.tokens"]) == 262_144


@pytest.mark.big_model
def test_gemma3_270m_merges_are_transformers_merges():
    from transformers.tokenization_utils_base import generate_merges

    from flashjax.hub import default_model_path

    fields = GGUFContainer(default_model_path("gemma3-270m")).fields
    tokens, scores = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.scores"]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert _merges_from_scores(tokens, scores) == generate_merges(vocab, dict(zip(tokens, scores)))


def test_merges_from_scores_are_transformers_merges():
    """flashjax.tokenizer numbers pieces with numpy instead of looking up each split: the merges and
    their order must stay transformers' generate_merges (ties in score and lengths, NUL characters,
    tokens that are prefixes of others, fewer scores than tokens)."""
    from transformers.tokenization_utils_base import generate_merges

    rng = random.Random(0)
    for trial in range(200):
        alphabet = rng.choice(["ab", "abc\x00", "a\u00e9\U0001F600\x00 ", "xyz"])
        words = ("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) for _ in range(rng.randint(0, 60)))
        tokens = list(dict.fromkeys(words))
        scores = [rng.choice([0.0, -1.0, -2.5, rng.random()]) for _ in tokens][:None if trial % 5 else len(tokens) // 2]
        vocab = {token: i for i, token in enumerate(tokens)}
        assert _merges_from_scores(tokens, scores) == generate_merges(vocab, dict(zip(tokens, scores))), trial


# -- truncated and corrupt files -------------------------------------------------------------------

def _s(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def _kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _info(name: str, dims: list[int], ggml_type: int, offset: int = 0) -> bytes:
    return _s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)


def _raw(kvs=(), infos=(), data=b"", version=3, alignment=32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos), len(kvs)) + b"".join(kvs) + b"".join(infos)
    return head + bytes(-len(head) % alignment) + data


def _expect_error(path, pattern: str) -> str:
    with pytest.raises(GGUFFormatError, match=pattern) as info:
        GGUFContainer(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a readable GGUF file: "), message
    return message


def test_every_truncation_is_a_clear_error(tiny, tmp_path):
    full = tiny.read_bytes()
    ours = GGUFContainer(tiny)
    end = max(t.data_offset + t.n_bytes for t in ours.tensors.values())  # padding may follow
    cut = tmp_path / "cut.gguf"
    # every byte of the header, then a prime stride through the key/values, tensor infos and data
    for size in sorted({*range(64), *range(64, end, 13), ours.data_offset - 1, ours.data_offset, end - 1}):
        cut.write_bytes(full[:size])
        message = _expect_error(cut, "GGUF magic" if size < 4 else "truncated file")
        if size >= ours.data_offset:
            assert "tensor '" in message, message


def test_truncation_names_the_key_and_the_tensor(tiny, tmp_path):
    full = tiny.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full[:full.rindex(b"<0x0A>") + 3])  # inside the last string of t.a_str
    _expect_error(cut, r"truncated file: key 't\.a_str' \[199\] needs bytes")
    tensors = GGUFContainer(tiny).tensors
    last = max(tensors.values(), key=lambda t: t.data_offset)
    cut.write_bytes(full[:last.data_offset + last.n_bytes - 1])
    _expect_error(cut, f"truncated file: tensor '{last.name}' ends at byte {last.data_offset + last.n_bytes} "
                       f"but the file has {last.data_offset + last.n_bytes - 1} bytes")
    # and through flashjax's readers, with their own error types
    with pytest.raises(CheckpointError, match=rf"cut\.gguf: .*truncated file: tensor '{last.name}'"):
        GGUFFile(cut)
    with pytest.raises(TokenizerError, match=r"cut\.gguf: not a readable GGUF file: truncated"):
        Tokenizer.from_gguf(cut)


@pytest.mark.parametrize("content", [b"", b"GGU", b"GGML" + bytes(100), b"definitely not a gguf file"])
def test_not_a_gguf_file(tmp_path, content):
    path = tmp_path / "junk.gguf"
    path.write_bytes(content)
    _expect_error(path, "not the GGUF magic")


A, S, U32 = V.ARRAY, V.STRING, V.UINT32


CORRUPT = [  # file content, error message pattern
    (_raw(version=1), "GGUF version 1 is not supported"),
    (_raw(version=4), "GGUF version 4 is not supported"),
    (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian GGUF files are not supported"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 2**63), "truncated file: 9223372036854775808 key/values"),
    (b"GGUF" + struct.pack("<IQQ", 3, 2**62, 0), "truncated file: 4611686018427387904 tensor infos"),
    (_raw([_kv("k", 99, b"")]), "key 'k' has unknown value type 99"),
    (_raw([_kv("k", A, struct.pack("<IQ", 99, 1))]), r"key 'k' \(array element type\) has unknown value type 99"),
    (_raw([_kv("k", S, struct.pack("<Q", 2**63))]), "truncated file: key 'k' needs bytes"),
    (_raw([_kv("k", A, struct.pack("<IQ", U32, 2**61))]), "truncated file: key 'k' needs bytes"),
    (_raw([_kv("k", A, struct.pack("<IQ", S, 2**60))]), "truncated file: key 'k' needs bytes"),
    (_raw([_kv("k", A, struct.pack("<IQ", A, 2**60))]), "truncated file: key 'k' needs bytes"),
    (_raw([_kv("k", A, struct.pack("<IQ", A, 1) * 20 + struct.pack("<IQ", U32, 0))]), "nests arrays more than"),
    (_raw([_kv("k", U32, b"\1\0\0\0"), _kv("k", U32, b"\1\0\0\0")]), "key 'k' appears twice"),
    (_raw([_kv(b"\xff", U32, b"\1\0\0\0")]), "key 0 is not valid UTF-8"),
    (_raw([_kv("k", A, struct.pack("<IQ", S, 2) + _s("ok") + _s(b"\xc3"))]), r"key 'k' \[1\] is not valid UTF-8"),
    (_raw([_kv("general.alignment", V.UINT64, struct.pack("<Q", 32))]), "general.alignment is not a uint32"),
    (_raw([_kv("general.alignment", U32, struct.pack("<I", 48))]), "general.alignment = 48 is not a power of two"),
    (_raw([_kv("general.alignment", U32, struct.pack("<I", 0))]), "general.alignment = 0 is not a power of two"),
    (_raw(infos=[_info("w", [4], 99)], data=bytes(64)), "tensor 'w' has unknown ggml type 99"),
    (_raw(infos=[_info("w", [33], Q.Q8_0)], data=bytes(64)), r"tensor 'w' of type Q8_0 has dims \[33\]"),
    (_raw(infos=[_info("w", [4], Q.F32), _info("w", [4], Q.F32)], data=bytes(64)), "tensor 'w' appears twice"),
    (_raw(infos=[_info("w", [4], Q.F32, offset=32)], data=bytes(40)),
     "truncated file: tensor 'w' ends at byte"),
    (_raw(infos=[_info("w", [2**40, 2**40], Q.F32)]), "truncated file: tensor 'w' ends at byte"),
    (b"GGUF" + struct.pack("<IQQ", 3, 1, 0) + _s("w") + struct.pack("<I", 2**31) + bytes(64),
     r"truncated file: tensor 'w' \(dims\) needs bytes"),
]


@pytest.mark.parametrize("content, pattern", CORRUPT, ids=[pattern for _, pattern in CORRUPT])
def test_corrupt_files(tmp_path, content, pattern):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    _expect_error(path, pattern)
