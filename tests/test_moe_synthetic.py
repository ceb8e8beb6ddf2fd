"""benchmarks/moe_synthetic.py at its tiny scale: the flash copy and the GGUF hold the same weights,
flashjax and llama.cpp run them alike, and a write that cannot finish leaves nothing behind.

llama.cpp (llama-cpp-python) is optional: its tests skip with the reason when it does not import.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script():
    name = "moe_synthetic_script"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", "moe_synthetic.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


ms = _load_script()
TINY = ms.PRESETS["tiny"]
# Token-id prompts (the vocabulary is 320: bytes, eos 256, two-byte tokens).
PROMPTS = [[300, 281, 309, 291], [104, 101, 108, 108, 111, 32, 119, 111], [265, 270, 290, 310, 260, 299, 301, 263, 271],
           [42], [7, 99], [1, 2, 3]]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe") / "model"
    result = ms.write(out, TINY, progress=False, scale="tiny")
    return str(out), result


@pytest.fixture(scope="module")
def flash_llm(written):
    import flashjax

    llm = flashjax.load(os.path.join(written[0], "flash"), sparsity="dense", progress=False)
    yield llm
    llm.close()


def _llama_cpp():
    from flashjax.bench.peers import llama_cpp_available

    missing = llama_cpp_available()
    if missing:
        pytest.skip(missing)
    from llama_cpp import Llama

    return Llama


def _flashjax_greedy(llm, prompt):
    return list(llm.generate_ids(prompt, max_tokens=NEW_TOKENS, stop_at_eos=False))


def _llama_greedy(model, prompt):
    model.reset()
    model.eval(prompt)
    out = []
    for _ in range(NEW_TOKENS):
        out.append(int(np.argmax(model.scores[model.n_tokens - 1])))
        model.eval([out[-1]])
    return out


def test_writes_both_copies_and_the_report(written):
    out, result = written
    assert sorted(os.listdir(out)) == ["flash", "info.json", "model.gguf"]
    assert os.listdir(os.path.dirname(out)) == ["model"]  # no partial or temporary leftovers
    info = json.load(open(os.path.join(out, "info.json")))
    assert info == json.loads(json.dumps(result.info))
    assert info["bytes"]["gguf"] == os.path.getsize(os.path.join(out, "model.gguf"))
    estimate = ms.estimated_bytes(TINY)
    # The estimate leaves out metadata (the GGUF's vocabulary, the flash manifest and checkpoint files;
    # Orbax compresses the resident tensors a little: the default shape's flash copy is 2% under it).
    assert estimate["gguf"] < info["bytes"]["gguf"] < estimate["gguf"] + (1 << 20)
    assert 0.95 * estimate["flash"] < info["bytes"]["flash"] < estimate["flash"] + (1 << 20)

    routing = info["routing"]
    assert len(routing["layers"]) == TINY.n_layers
    held_out = routing["summary"]["held_out_tokens"]
    for layer in routing["layers"]:
        assert len(layer["usage"]) == TINY.n_experts and sum(layer["usage"]) == held_out * TINY.top_k
        assert 0 < layer["entropy"] <= 1 and layer["hottest_vs_mean"] >= 1
        assert layer["router_bias_error"] < 0.5  # the popularity bias is what was asked for
        assert layer["recent_attention_local"] > layer["recent_attention_other"]
    assert routing["logits"]["finite"] and routing["logits"]["distinct_argmax"] > 10

    from flashjax.store import read_manifest

    manifest = read_manifest(os.path.join(out, "flash"))
    assert manifest.dtype == "q4" and manifest.config == ms.model_config(TINY) and manifest.tokenizer
    assert all(r["max_error"] == 0.0 for r in manifest.source["quantization"])


def _gguf_tensors(path):
    import gguf

    reader = gguf.GGUFReader(path)
    fields = {f.name: f for f in reader.fields.values()}
    return reader, {t.name: t for t in reader.tensors}, fields


def test_both_files_hold_the_same_values(written):
    """Every tensor of the GGUF, dequantized, equals the flash copy's, read back through flashjax; and
    each is what the format's own quantizer makes of those values (gguf.quants, flashjax.quant)."""
    import gguf
    from flashjax.quant import QuantizedRows, quantize
    from flashjax.store import open_flash_source
    from flashjax.store.ffn_store import FFNStore
    from flashjax.weights.mapping import tensor_plan

    out, _ = written
    cfg = ms.model_config(TINY)
    reader, tensors, fields = _gguf_tensors(os.path.join(out, "model.gguf"))
    arch = fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "olmoe"
    flash = dict(open_flash_source(os.path.join(out, "flash")).iter_tensors())

    Q = gguf.GGMLQuantizationType
    kinds = {}
    for path, name, hook in tensor_plan(cfg, "gguf"):
        t = tensors[name]
        shape = tuple(int(n) for n in reversed(t.shape))
        stored = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        array = stored if hook is None else hook(stored)
        np.testing.assert_array_equal(array, flash[path], err_msg=f"{name} vs {path}")
        kinds[name.split(".", 2)[-1] if name.startswith("blk.") else name] = t.tensor_type
        if t.tensor_type in (Q.Q4_0, Q.Q8_0):  # the blocks are what llama.cpp's quantizer makes of the values
            requantized = gguf.quants.quantize(np.ascontiguousarray(stored), t.tensor_type)
            assert np.array_equal(requantized.reshape(-1), np.asarray(t.data).reshape(-1)), name
    assert kinds == {"token_embd.weight": Q.Q8_0, "output.weight": Q.Q8_0, "output_norm.weight": Q.F32,
                     "attn_norm.weight": Q.F32, "attn_q.weight": Q.Q4_0, "attn_k.weight": Q.Q4_0,
                     "attn_v.weight": Q.Q4_0, "attn_output.weight": Q.Q4_0, "attn_q_norm.weight": Q.F32,
                     "attn_k_norm.weight": Q.F32, "ffn_norm.weight": Q.F32, "ffn_gate_inp.weight": Q.F32,
                     "ffn_gate_exps.weight": Q.Q4_0, "ffn_up_exps.weight": Q.Q4_0, "ffn_down_exps.weight": Q.Q4_0}
    assert len(tensors) == len(list(tensor_plan(cfg, "gguf")))

    # The flash records: each neuron's rows are what flashjax.quant.quantize makes of their values.
    source = open_flash_source(os.path.join(out, "flash"))
    layout = source._files["manifest"].layout
    store = FFNStore(source.path, source._files["manifest"])
    for layer in range(cfg.n_layers):
        records = np.asarray(store.read_layer(layer))
        for name in layout.names:
            raw = records[:, layout.part_slice(name)]
            rows = QuantizedRows.from_bytes("q4", raw, cfg.d_model)
            assert np.array_equal(quantize(rows.dequantize(), "q4").to_bytes(), raw), (layer, name)


def test_the_reference_pass_is_flashjax(written, flash_llm):
    """The numpy forward pass that measured the routing computes what flashjax computes."""
    out, result = written
    logits = flash_llm.logits(result.probe_tokens)
    np.testing.assert_allclose(logits, result.probe_logits[0], atol=1e-3)
    assert logits.argmax(-1).tolist() == result.info["routing"]["reference"]["argmax"]


def _float_twin(src: str, dst: str) -> None:
    """The GGUF with every tensor dequantized to F32 (same metadata): llama.cpp then multiplies floats,
    not 8-bit activations by 4-bit blocks, so its logits can be compared with flashjax's closely."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, "olmoe")
    ms.add_metadata(writer, TINY, "float twin")
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        writer.add_tensor(t.name, np.ascontiguousarray(values.reshape([int(n) for n in reversed(t.shape)])))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_llama_cpp_runs_the_gguf_as_flashjax_runs_the_flash_copy(written, flash_llm, tmp_path):
    Llama = _llama_cpp()
    out, _ = written
    # Same graph: with float weights and a float32 KV cache llama.cpp's logits are flashjax's.
    twin = str(tmp_path / "twin.gguf")
    _float_twin(os.path.join(out, "model.gguf"), twin)
    exact = Llama(model_path=twin, n_ctx=64, n_threads=2, logits_all=True, verbose=False, type_k=0, type_v=0)
    for prompt in PROMPTS:
        exact.reset()
        exact.eval(prompt)
        np.testing.assert_allclose(np.asarray(exact.scores[:len(prompt)]), flash_llm.logits(prompt), atol=2e-3)
    # The Q4_0 file itself: the same greedy tokens. llama.cpp multiplies its 4-bit blocks by activations
    # rounded to 8 bits (Q8_0), which now and then flips a near-tied choice (a token, or an expert in a
    # router's top-k: the tiny model picks 2 of 8, so its routers have close calls), after which two
    # greedy continuations part for good. So each of llama.cpp's tokens is checked against flashjax's
    # argmax on llama.cpp's own prefix (a flip costs one step, not the rest), nearly all must agree, and
    # most continuations must be identical throughout. (Measured here: 47 of 48 steps, 5 of 6 prompts.)
    model = Llama(model_path=os.path.join(out, "model.gguf"), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    agree, steps, identical = 0, 0, 0
    for prompt in PROMPTS:
        ours = _llama_greedy(model, prompt)
        logits = flash_llm.logits(prompt + ours[:-1])[len(prompt) - 1:]
        agree += int((logits.argmax(-1) == np.asarray(ours)).sum())
        steps += len(ours)
        identical += ours == _flashjax_greedy(flash_llm, prompt)
    assert agree >= 0.9 * steps and identical >= len(PROMPTS) - 2, (agree, steps, identical)
    # One tokenizer: llama.cpp's and the flash copy's agree.
    text = "the cat sat on the mat, 42 times!\n"
    ids = model.tokenize(text.encode(), add_bos=False, special=True)
    assert ids == flash_llm.tokenizer.encode(text) and len(ids) < len(text.encode())
    assert flash_llm.tokenizer.decode(ids) == text


def test_flashjax_reads_the_gguf(written, flash_llm):
    import flashjax

    out, _ = written
    llm = flashjax.load(os.path.join(out, "model.gguf"), progress=False)
    with llm:
        for prompt in PROMPTS:
            np.testing.assert_allclose(llm.logits(prompt), flash_llm.logits(prompt), atol=1e-4)
        assert llm.tokenizer.encode("the cat") == flash_llm.tokenizer.encode("the cat")


def test_an_existing_output_is_kept_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()  # an empty directory is fine
    assert ms.main(["--out", str(out), "--scale", "tiny", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["out"] == str(out) and report["peak_rss_bytes"] > 0 and "routing" in report
    before = open(out / "model.gguf", "rb").read()

    assert ms.main(["--out", str(out), "--scale", "tiny"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert open(out / "model.gguf", "rb").read() == before

    assert ms.main(["--out", str(out), "--scale", "tiny", "--seed", "1", "--overwrite"]) == 0
    assert open(out / "model.gguf", "rb").read() != before
    assert sorted(os.listdir(tmp_path)) == ["m"]


def test_bad_shapes_are_refused_before_writing(tmp_path, capsys):
    assert ms.main(["--out", str(tmp_path / "m"), "--scale", "tiny", "--heads", "3"]) == 2
    assert "d_model" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_too_little_disk_space_fails_clearly(tmp_path, monkeypatch):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(ms.shutil, "disk_usage", lambda path: usage(10 << 30, 10 << 30, 1 << 20))
    with pytest.raises(ms.WriteError, match="GB free"):
        ms.write(tmp_path / "m", TINY, progress=False)
    assert not os.listdir(tmp_path)
    # The default shape: ~4.4 GB flash + ~4.0 GB GGUF.
    sizes = ms.estimated_bytes(ms.PRESETS["olmoe"])
    assert 4.2e9 < sizes["flash"] < 4.6e9 and 3.8e9 < sizes["gguf"] < 4.2e9


def test_an_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(self, i, *args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ms.Generator, "experts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ms.write(tmp_path / "m", TINY, progress=False)
    assert not os.listdir(tmp_path)


def test_the_vocabulary():
    tokens, types, merges = ms.build_vocab(TINY.vocab)
    assert len(tokens) == len(set(tokens)) == TINY.vocab and len(types) == TINY.vocab
    assert tokens[256] == ms.EOS_TEXT and types[256] == 3
    assert all(tokens[257 + i] == m.replace(" ", "") for i, m in enumerate(merges))
    full, _, full_merges = ms.build_vocab(ms.PRESETS["olmoe"].vocab)
    assert len(set(full)) == 50304 and len(full_merges) == 50304 - 257
