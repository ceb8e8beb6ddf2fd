"""The flash format: converter round trips, the bundled record layout, neuron reads, checksums, and
conversions that fail or are interrupted."""

import ctypes
import dataclasses
import hashlib
import json
import mmap
import os
import pathlib
import shutil
import sys
import tempfile
import threading

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _ci import skip_or_fail
from conftest import build_tiny
from flashjax.store import (ConvertError, FFNStore, StoreChecksumError, auto_ffn_block, convert, load_resident,
                            model_config_from_dict, open_flash_model, read_manifest)
from flashjax.bench.compare import disk_info
from flashjax.store.manifest import is_ffn_on_disk
from flashjax.store import open_model_source
from flashjax.weights import CheckpointError

# The package's `convert` is the function; the module it lives in is patched below.
convert_module = sys.modules["flashjax.store.convert"]
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _tensors(spec) -> dict:
    return dict(open_model_source(spec).iter_tensors())


def _tree_digest(path: pathlib.Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _expected(path: str, array: np.ndarray, dtype: str) -> np.ndarray:
    # Matrices and everything in the FFN records go through the storage dtype; resident vectors
    # (norms, biases) are kept in float32.
    if array.ndim == 2 or is_ffn_on_disk(path):
        return array.astype(DTYPES[dtype]).astype(np.float32)
    return array


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("store_src")
    out = {}
    for name in ("llama_gqa", "opt", "llama3_rope"):
        build_tiny(name, root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def converted(tiny_dirs, tmp_path_factory):
    """(name, dtype, bundle) -> converted directory, converted once per module."""
    root = tmp_path_factory.mktemp("store_out")
    cache = {}

    def get(name, dtype="float32", bundle=True, ffn_block=8):
        key = (name, dtype, bundle, ffn_block)
        if key not in cache:
            out = root / f"{name}_{dtype}_{bundle}_{ffn_block}"
            convert(tiny_dirs[name], out, dtype=dtype, progress=False, bundle=bundle, ffn_block=ffn_block)
            cache[key] = out
        return cache[key]
    return get


# -- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama_gqa", "opt", "llama3_rope"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bundle", [True, False])
def test_round_trip(tiny_dirs, converted, name, dtype, bundle):
    source = _tensors(tiny_dirs[name])
    out = converted(name, dtype, bundle)
    flash = open_model_source(out)
    assert flash.fmt == "flash" and flash.config == open_model_source(tiny_dirs[name]).config
    got = dict(flash.iter_tensors())
    assert sorted(got) == sorted(source)
    for path, array in source.items():
        assert got[path].dtype == np.float32 and got[path].shape == array.shape, path
        np.testing.assert_array_equal(got[path], _expected(path, array, dtype), err_msg=path)


def test_convert_takes_a_model_source_object(tiny_dirs, tmp_path):
    # Generators of synthetic weights hand convert a ModelSource rather than a path.
    source = open_model_source(tiny_dirs["opt"])
    manifest = convert(source, tmp_path / "m", dtype="float32", progress=False)
    assert manifest.source["fmt"] == "hf"
    got = _tensors(tmp_path / "m")
    for path, array in _tensors(tiny_dirs["opt"]).items():
        np.testing.assert_array_equal(got[path], array, err_msg=path)


def test_ffn_block_not_dividing_d_ffn(tiny_dirs, converted):
    # d_ffn = 96; a block of 64 leaves a padded last block that must never show.
    source = _tensors(tiny_dirs["opt"])
    got = _tensors(converted("opt", "float32", True, ffn_block=64))
    for path in source:
        np.testing.assert_array_equal(got[path], source[path], err_msg=path)


def test_model_config_survives_json(tiny_dirs):
    configs = [open_model_source(d).config for d in tiny_dirs.values()]
    configs.append(dataclasses.replace(configs[0], rope_scaling=("linear", 2.0), sliding_window=8))
    assert any(c.rope_scaling and c.rope_scaling[0] == "llama3" for c in configs)
    for cfg in configs:
        back = model_config_from_dict(json.loads(json.dumps(dataclasses.asdict(cfg))))
        assert back == cfg and hash(back) == hash(cfg) and type(back.eos_token_ids) is tuple


def test_manifest_contents(converted):
    out = converted("opt", "float16")
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format_version"] == 1 and raw["dtype"] == "float16"
    assert raw["layout"]["bundle"] == ["up", "down", "b_up"]
    assert raw["layout"]["record_width"] == 48 * 2 + 1 and raw["layout"]["ffn_block"] == 8
    layer = raw["layers"][1]
    assert layer["path"] == "ffn/layer_001" and len(layer["sha256"]) == 64
    assert layer["bytes"] == sum(os.path.getsize(out / f) for f in layer["files"])
    assert raw["source"]["fmt"] == "hf"
    # One shard file per layer, not one file per neuron.
    assert len([f for f in layer["files"] if not f.endswith("zarr.json")]) == 1
    llama = json.loads((converted("llama_gqa") / "manifest.json").read_text())
    assert llama["layout"]["bundle"] == ["gate", "up", "down"]
    unbundled = json.loads((converted("llama_gqa", "float32", False) / "manifest.json").read_text())
    assert unbundled["layout"]["bundle"] is None
    assert set(unbundled["layers"][0]["arrays"]) == {"gate", "up", "down"}


def test_load_resident(tiny_dirs, converted):
    import jax.numpy as jnp

    from flashjax.model.params import empty_tree

    out = converted("opt", "float16")
    tree = load_resident(out, jnp.float32)
    cfg = read_manifest(out).config
    skeleton = empty_tree(cfg)
    assert set(tree) == set(skeleton) and len(tree["layers"]) == cfg.n_layers
    source = _tensors(tiny_dirs["opt"])
    for i, layer in enumerate(tree["layers"]):
        assert set(layer) == {"attn_norm", "attn", "ffn_norm", "ffn"}
        assert set(layer["ffn"]) == {"b_down"}  # the rest of the FFN stays on disk
        np.testing.assert_array_equal(np.asarray(layer["ffn"]["b_down"]), source[f"layers.{i}.ffn.b_down"])
        np.testing.assert_array_equal(np.asarray(layer["attn"]["wq"]),
                                      _expected("wq", source[f"layers.{i}.attn.wq"], "float16"))
    assert tree["embed"]["embedding"].dtype == jnp.float32
    assert load_resident(out, jnp.bfloat16)["embed"]["embedding"].dtype == jnp.bfloat16


# -- the record layout and reads ---------------------------------------------------------------------


def _expected_records(source: dict, layer: int, glu: bool) -> np.ndarray:
    p = f"layers.{layer}.ffn."
    biases = [source[p + b][:, None] for b in ("b_gate", "b_up") if p + b in source]
    if glu:  # llama3_rope has mlp_bias: its records end with b_gate[i], b_up[i]
        return np.concatenate([source[p + "w_gate"], source[p + "w_up"], source[p + "w_down"].T] + biases, axis=1)
    return np.concatenate([source[p + "w_up"], source[p + "w_down"].T] + biases, axis=1)


@pytest.mark.parametrize("name", ["llama_gqa", "opt", "llama3_rope"])
@pytest.mark.parametrize("bundle", [True, False])
def test_record_i_is_the_bundle_of_neuron_i(tiny_dirs, converted, name, bundle):
    source = _tensors(tiny_dirs[name])
    store = FFNStore(converted(name, "float32", bundle))
    for layer in range(store.n_layers):
        expected = _expected_records(source, layer, name != "opt")
        assert store.record_width == expected.shape[1]
        np.testing.assert_array_equal(store.read_layer(layer), expected)


@pytest.fixture(scope="module")
def opt_store(tiny_dirs, converted):
    source = _tensors(tiny_dirs["opt"])
    store = FFNStore(converted("opt", "float16", True))
    return store, [_expected_records(source, i, False).astype(np.float16) for i in range(store.n_layers)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_read_neurons_returns_exactly_those_rows(opt_store, data):
    store, records = opt_store
    layer = data.draw(st.integers(0, store.n_layers - 1))
    ids = sorted(data.draw(st.sets(st.integers(0, store.d_ffn - 1), max_size=store.d_ffn)))
    ids = np.array(ids, dtype=np.int64)
    rows = store.read_neurons(layer, ids)
    assert rows.shape == (len(ids), store.record_width) and rows.dtype == np.float16
    np.testing.assert_array_equal(rows, records[layer][ids])


@pytest.mark.parametrize("ids", [[], "all", [0], [95], [7, 8], list(range(16, 40)), [0, 95]])
def test_read_neurons_edge_cases(opt_store, ids):
    store, records = opt_store
    ids = np.arange(store.d_ffn) if ids == "all" else np.array(ids, dtype=np.int64)
    before = store.take_stats()
    del before
    rows = store.read_neurons(1, ids)
    np.testing.assert_array_equal(rows, records[1][ids])
    stats = store.take_stats()
    blocks = len(np.unique(ids // store.ffn_block))
    assert stats.neurons == len(ids) and stats.chunks == blocks and stats.calls == (1 if len(ids) else 0)
    assert stats.bytes == blocks * store.ffn_block * store.record_nbytes


def test_read_neurons_rejects_bad_ids(opt_store):
    store, _ = opt_store
    for bad in ([3, 2], [1, 1], [-1], [store.d_ffn]):
        with pytest.raises(ValueError, match="sorted, unique"):
            store.read_neurons(0, np.array(bad))
    with pytest.raises(IndexError):
        store.read_neurons(store.n_layers, np.array([0]))


def test_reads_in_flight_from_another_thread(opt_store):
    store, records = opt_store
    rng = np.random.default_rng(0)
    sets = [np.sort(rng.choice(store.d_ffn, 40, replace=False)) for _ in range(store.n_layers)]
    pending = [store.read_neurons_async(i, ids) for i, ids in enumerate(sets)]  # all issued before any wait
    results = {}
    worker = threading.Thread(target=lambda: results.update(
        {i: store.read_neurons(i, ids) for i, ids in enumerate(sets)}))
    worker.start()
    worker.join()
    for i, ids in enumerate(sets):
        np.testing.assert_array_equal(pending[i].result(), records[i][ids])
        np.testing.assert_array_equal(results[i], records[i][ids])


def test_evict_page_cache_keeps_reads_working(opt_store):
    store, records = opt_store
    store.evict_page_cache()
    np.testing.assert_array_equal(store.read_layer(0), records[0])


MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")  # a file there is its pages: nothing can be evicted


def _fstype(path) -> str:
    """The type of the filesystem holding `path` (the package's own mount lookup)."""
    return disk_info(str(path)).get("fstype", "")


def _resident_pages(path) -> tuple[int, int]:
    """(pages of the file in the page cache, pages of the file), by mincore(2) on a fresh shared
    read-only mapping that touches nothing (so it neither faults pages in nor pins them)."""
    size = os.path.getsize(path)
    n_pages = -(-size // mmap.PAGESIZE)
    if size == 0:
        return 0, 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr is not None and addr != ctypes.c_void_p(-1).value, os.strerror(ctypes.get_errno())
        try:
            vec = (ctypes.c_ubyte * n_pages)()
            assert libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) == 0, os.strerror(ctypes.get_errno())
            return sum(v & 1 for v in vec), n_pages
        finally:
            libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)


@pytest.fixture
def disk_dir(tmp_path):
    """A directory on a filesystem whose page cache can be dropped: tmp_path, unless it lies on a
    memory filesystem (tmpfs, ramfs: the file is its pages), then a directory inside the repository."""
    if _fstype(tmp_path) not in MEMORY_FILESYSTEMS:
        yield tmp_path
        return
    repo = pathlib.Path(__file__).resolve().parents[1]
    if _fstype(repo) in MEMORY_FILESYSTEMS:
        skip_or_fail(f"both {tmp_path} and {repo} are on memory filesystems: page-cache eviction cannot be seen")
    path = pathlib.Path(tempfile.mkdtemp(prefix=".evict-test-", dir=repo))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_evict_page_cache_drops_the_files_pages(tiny_dirs, disk_dir):
    """evict_page_cache really empties the page cache of the model's files (mincore), so the next read
    comes from the disk: first, every file read in full is resident (the check can see pages), then
    after eviction no page of any file is, and a read brings the FFN shard's pages back."""
    model = disk_dir / "model"
    convert(tiny_dirs["opt"], model, dtype="float16", progress=False)  # just written: dirty pages too
    store = FFNStore(model)
    records = [store.read_layer(layer) for layer in range(store.n_layers)]
    files = [str(p) for p in sorted(model.rglob("*")) if p.is_file() and p.stat().st_size > 0]
    for path in files:
        pathlib.Path(path).read_bytes()
    before = {path: _resident_pages(path) for path in files}
    assert all(resident == total > 0 for resident, total in before.values()), before

    store.evict_page_cache()
    after = {path: _resident_pages(path)[0] for path in files}
    assert sum(after.values()) == 0, {p: n for p, n in after.items() if n}

    # Reads still return the same records, and the shard's pages come back from the disk.
    for layer in range(store.n_layers):
        np.testing.assert_array_equal(store.read_layer(layer), records[layer])
    shards = [p for p in files if os.sep + "ffn" + os.sep in p]
    assert shards and sum(_resident_pages(p)[0] for p in shards) > 0


def test_auto_ffn_block():
    assert auto_ffn_block(3456) == 8  # SmolLM2 float16 records
    assert auto_ffn_block(16386) == 1  # OPT-6.7B-shaped ReLU records with the bias
    assert auto_ffn_block(100) == 256 and auto_ffn_block(10**6) == 1


# -- refusing, never touching the source, interruptions ----------------------------------------------


def test_refuses_to_overwrite_unless_asked(tiny_dirs, tmp_path):
    out = tmp_path / "model"
    convert(tiny_dirs["llama_gqa"], out, dtype="float32", progress=False)
    with pytest.raises(ConvertError, match="already exists"):
        convert(tiny_dirs["llama_gqa"], out, dtype="float16", progress=False)
    assert read_manifest(out).dtype == "float32"
    convert(tiny_dirs["llama_gqa"], out, dtype="float16", progress=False, overwrite=True)
    assert read_manifest(out).dtype == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no partial or old copies left
    open_flash_model(out)


def test_refuses_output_in_or_around_the_source(tiny_dirs, tmp_path):
    src = tiny_dirs["llama_gqa"]
    for out in (src, src / "flash", src.parent):
        with pytest.raises(ConvertError, match="source"):
            convert(src, out, progress=False, overwrite=True)
    assert not (src / "flash").exists()


def test_source_untouched(tiny_dirs, tmp_path):
    src = tiny_dirs["opt"]
    before, stat = _tree_digest(src), {p: p.stat().st_mtime_ns for p in src.rglob("*")}
    convert(src, tmp_path / "a", dtype="float16", progress=False)
    flash_before = _tree_digest(tmp_path / "a")
    convert(tmp_path / "a", tmp_path / "b", dtype="float32", progress=False)  # a flash model as the source
    assert _tree_digest(src) == before and {p: p.stat().st_mtime_ns for p in src.rglob("*")} == stat
    assert _tree_digest(tmp_path / "a") == flash_before


def _raise_on_layer_1(original):
    def write_layer(model_dir, layer, *args, **kwargs):
        if layer == 1:
            raise KeyboardInterrupt("simulated interruption while writing layer 1")
        return original(model_dir, layer, *args, **kwargs)
    return write_layer


def test_interrupted_conversion_leaves_nothing_that_loads(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_module, "write_layer", _raise_on_layer_1(convert_module.write_layer))
    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_dirs["llama_gqa"], out, progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CheckpointError):
        open_model_source(out)


def test_interrupted_overwrite_keeps_the_old_model(tiny_dirs, tmp_path, monkeypatch):
    out = tmp_path / "model"
    convert(tiny_dirs["llama_gqa"], out, dtype="float32", progress=False)
    before = _tree_digest(out)
    monkeypatch.setattr(convert_module, "write_layer", _raise_on_layer_1(convert_module.write_layer))
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_dirs["llama_gqa"], out, dtype="float16", progress=False, overwrite=True)
    assert _tree_digest(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_killed_conversion_leaves_nothing_that_loads(converted, tmp_path):
    # A conversion killed outright (no cleanup) leaves its .partial- directory without manifest.json.
    import shutil
    partial = tmp_path / "model.partial-abcd"
    shutil.copytree(converted("llama_gqa"), partial)
    (partial / "manifest.json").unlink()
    with pytest.raises(CheckpointError):
        open_model_source(partial)
    with pytest.raises(CheckpointError, match="manifest.json"):
        open_flash_model(partial)


# -- checksums ---------------------------------------------------------------------------------------


def _shard(model_dir: pathlib.Path, layer: int) -> pathlib.Path:
    (shard,) = [p for p in (model_dir / f"ffn/layer_{layer:03d}").rglob("*") if p.is_file() and p.name != "zarr.json"]
    return shard


def test_corrupted_byte_in_a_shard(converted, tmp_path):
    import shutil
    out = tmp_path / "model"
    shutil.copytree(converted("opt", "float16"), out)
    open_flash_model(out).ffn_store().verify()
    shard = _shard(out, 1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(StoreChecksumError, match="layer 1") as err:
        open_flash_model(out)
    assert "c/0/0/0" in str(err.value)
    with pytest.raises(StoreChecksumError, match="layer 1"):
        open_model_source(out)
    store = open_flash_model(out, verify=False).ffn_store()  # size unchanged: only the checksum sees it
    with pytest.raises(StoreChecksumError, match="layer 1"):
        store.verify()


def test_truncated_shard(converted, tmp_path):
    import shutil
    out = tmp_path / "model"
    shutil.copytree(converted("llama_gqa", "float16"), out)
    shard = _shard(out, 0)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(StoreChecksumError, match="layer 0.*truncated"):
        open_flash_model(out)
    with pytest.raises(StoreChecksumError, match="layer 0.*truncated"):
        FFNStore(out)  # even without the full checksum pass
    shard.unlink()
    with pytest.raises(StoreChecksumError, match="layer 0.*missing"):
        open_flash_model(out, verify=False).ffn_store()


# -- tokenizer files ---------------------------------------------------------------------------------


def _write_small_tokenizer(directory: pathlib.Path):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = RustTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello flash"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                       special_tokens=[("<|im_start|>", 1)])
    tok.save(str(directory / "tokenizer.json"))
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": template}))
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))


def _same_tokenizer(a, b):
    texts = ["hello world", "the lazy fox<|im_end|> and more", "", "  spaces  and\nnewlines\n", "ünïcödé 🎉"]
    for text in texts:
        assert a.encode(text) == b.encode(text), text
        assert a.encode(text, add_special_tokens=False) == b.encode(text, add_special_tokens=False), text
    assert (a.bos_token_id, a.eos_token_ids, a.bos_token, a.eos_token, a.chat_template, a.vocab_size) == \
           (b.bos_token_id, b.eos_token_ids, b.bos_token, b.eos_token, b.chat_template, b.vocab_size)


def test_tokenizer_from_hf_source(tmp_path):
    src = tmp_path / "src"
    build_tiny("llama_gqa", src)
    _write_small_tokenizer(src)
    convert(src, tmp_path / "flash", progress=False)
    original = open_model_source(src).tokenizer()
    assert original.eos_token_ids == (2, 0)
    _same_tokenizer(open_model_source(tmp_path / "flash").tokenizer(), original)
    assert read_manifest(tmp_path / "flash").tokenizer is True


def test_no_tokenizer_in_source(converted):
    from flashjax.tokenizer import TokenizerError

    out = converted("llama_gqa")
    assert read_manifest(out).tokenizer is False
    with pytest.raises(TokenizerError):
        open_model_source(out).tokenizer()


# -- the real default model --------------------------------------------------------------------------


@pytest.mark.slow
def test_default_gguf_converts(default_gguf, tmp_path):
    from flashjax.tokenizer import Tokenizer

    out = tmp_path / "smollm2"
    manifest = convert(default_gguf, out, dtype="float32", progress=False)
    assert manifest.layout.bundle == ("gate", "up", "down") and manifest.layout.ffn_block == 4
    flash = open_model_source(out)
    got = dict(flash.iter_tensors())
    source = open_model_source(default_gguf)
    n = 0
    for path, array in source.iter_tensors():  # one tensor at a time: the GGUF's dequantized values
        np.testing.assert_array_equal(got.pop(path), array, err_msg=path)
        n += 1
    assert not got and n > 200
    _same_tokenizer(flash.tokenizer(), Tokenizer.from_gguf(default_gguf))
    chat = [{"role": "user", "content": "What is 2+2?"}]
    assert flash.tokenizer().apply_chat_template(chat) == source.tokenizer().apply_chat_template(chat)
