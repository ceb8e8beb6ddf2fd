"""Quantized weights (flashjax/quant.py): the formats' round trips, the GGUF block readers against the
gguf package's own dequantizers, the dequantizing matmul against the plain product, and quantized
models end to end (convert --quant, dense in memory, flash streaming: the same tokens)."""

from __future__ import annotations

import json
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flashjax
from conftest import drain_tokens, random_ids
from flashjax.model.matmul import weight_matmul, weight_rows
from flashjax.quant import (GROUP, QuantizedMatrix, QuantizedRows, decode_rows, merge_halves, quantize, row_bytes,
                            split_halves)
from flashjax.store import convert, open_flash_model
from flashjax.store.convert import ConvertError
from flashjax.store.manifest import encode_part
from flashjax.weights.gguf_blocks import read_blocks

KINDS = ("q8", "q4")


def _weights(rows, k, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, k)).astype(np.float32) * rng.uniform(0.01, 3, size=(rows, 1)).astype(np.float32)
    w[0, :GROUP] = 0.0  # an all-zero block (scale 0)
    w[1, GROUP:2 * GROUP] = 0.7  # a constant block
    return w


@pytest.mark.parametrize("kind", KINDS)
def test_quantize_round_trip_within_half_a_step(kind):
    """Each value comes back within half a quantization step of its block (plus float16 rounding of
    the scale and offset), and zero and constant blocks come back exactly."""
    w = _weights(64, 4 * GROUP)
    q = quantize(w, kind)
    back = q.dequantize()
    step = np.repeat(q.scales.astype(np.float32), GROUP, axis=1)
    span = np.repeat(np.abs(w).reshape(64, -1, GROUP).max(-1), GROUP, axis=1)
    assert np.all(np.abs(back - w) <= 0.5 * step + 2e-3 * span + 1e-6)
    np.testing.assert_array_equal(back[0, :GROUP], 0.0)
    np.testing.assert_allclose(back[1, GROUP:2 * GROUP], 0.7, rtol=1e-3)
    assert q.nbytes == 64 * row_bytes(kind, 4 * GROUP)


@pytest.mark.parametrize("kind", KINDS)
def test_record_bytes_round_trip_and_device_decode(kind):
    """A quantized row's bytes (a record part) decode to the same values in numpy and on the device."""
    q = quantize(_weights(10, 3 * GROUP, seed=1), kind)
    raw = q.to_bytes()
    assert raw.dtype == np.uint8 and raw.shape == (10, row_bytes(kind, 3 * GROUP))
    back = QuantizedRows.from_bytes(kind, raw, 3 * GROUP)
    np.testing.assert_array_equal(back.dequantize(), q.dequantize())
    on_device = decode_rows(jnp.asarray(raw), kind, 3 * GROUP)
    np.testing.assert_array_equal(np.asarray(on_device.dequantize()), q.dequantize())


def test_halves_split_and_merge_are_inverse():
    x = jnp.arange(2 * 3 * GROUP, dtype=jnp.float32).reshape(2, 3 * GROUP)
    low, high = split_halves(x)
    assert low.shape == (2, 3 * GROUP // 2)
    np.testing.assert_array_equal(np.asarray(low[0, :16]), np.arange(16))
    np.testing.assert_array_equal(np.asarray(high[0, :16]), np.arange(16, 32))
    np.testing.assert_array_equal(np.asarray(merge_halves(low, high)), np.asarray(x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [40, 3001])  # one block; many blocks and a partial one
@pytest.mark.parametrize("tokens", [1, 5])
def test_weight_matmul_quantized_equals_dequantized_product(kind, rows, tokens):
    """Both orientations (rows as outputs, rows contracted) equal the product with the dequantized
    matrix in float64."""
    k = 6 * GROUP
    q = quantize(_weights(rows, k, seed=rows), kind)
    w = QuantizedMatrix.from_rows(q)
    dense = q.dequantize().astype(np.float64)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, tokens, k)).astype(np.float32)
    got = np.asarray(jax.jit(weight_matmul)(jnp.asarray(x), w))
    np.testing.assert_allclose(got, x @ dense.T, rtol=1e-4, atol=1e-4 * np.abs(x @ dense.T).max())
    a = rng.standard_normal((1, tokens, rows)).astype(np.float32)
    got = np.asarray(jax.jit(weight_matmul, static_argnums=2)(jnp.asarray(a), w, False))
    np.testing.assert_allclose(got, a @ dense, rtol=1e-4, atol=1e-4 * np.abs(a @ dense).max())


def test_weight_rows_dequantizes_the_rows_taken():
    q = quantize(_weights(50, 2 * GROUP), "q4")
    ids = jnp.asarray([[3, 49, 0]])
    np.testing.assert_array_equal(np.asarray(weight_rows(QuantizedMatrix.from_rows(q), ids)),
                                  q.dequantize()[np.asarray(ids)])


# -- GGUF blocks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name,kind", [("Q8_0", "q8"), ("Q5_0", "q8"), ("Q4_0", "q4"), ("Q4_1", "q4")])
def test_gguf_blocks_copy_exactly(type_name, kind):
    """Blocks written by the gguf package read back as flashjax rows with exactly gguf's values."""
    qtype = gguf.GGMLQuantizationType[type_name]
    w = _weights(16, 4 * GROUP, seed=3)
    data = gguf.quants.quantize(w, qtype)
    rows = read_blocks(type_name, data, w.shape[1])
    assert rows.kind == kind
    np.testing.assert_array_equal(rows.dequantize(), gguf.quants.dequantize(data, qtype).reshape(w.shape))


def test_gguf_q4_k_keeps_its_codes():
    """Q4_K (random super-blocks: gguf has no Q4_K quantizer) -> q4 with the same codes; only the
    sub-block scales and offsets are rounded to float16, so the error is that rounding's."""
    rng = np.random.default_rng(5)
    rows, sb = 8, 2
    blocks = rng.integers(0, 256, size=(rows, sb, 144), dtype=np.uint8)
    blocks[:, :, 0:2] = np.float16(0.013).reshape(1).view(np.uint8)
    blocks[:, :, 2:4] = np.float16(0.004).reshape(1).view(np.uint8)
    data = blocks.reshape(rows, sb * 144)
    reference = gguf.quants.dequantize(data, gguf.GGMLQuantizationType.Q4_K).reshape(rows, sb * 256)
    got = read_blocks("Q4_K", data, sb * 256).dequantize()
    assert np.max(np.abs(got - reference)) <= 1e-3 * np.max(np.abs(reference))


def test_unmapped_gguf_types_are_left_to_the_caller():
    assert read_blocks("Q6_K", np.zeros((2, 210), np.uint8), 256) is None


# -- quantized models end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama64(tmp_path_factory):
    """A tiny Llama whose rows split into blocks of 32 (d_model 64), saved with transformers."""
    import torch
    import transformers

    from conftest import sharpen_for_parity

    root = tmp_path_factory.mktemp("quant-tiny")
    torch.manual_seed(11)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    model = transformers.LlamaForCausalLM(cfg).eval()
    sharpen_for_parity(model)
    model.save_pretrained(root / "hf")
    return root


@pytest.fixture(scope="module", params=KINDS)
def quantized_tiny(request, tiny_llama64):
    out = tiny_llama64 / f"flash-{request.param}"
    if not out.exists():  # pytest may set a parametrized module fixture up again when tests interleave
        convert(str(tiny_llama64 / "hf"), str(out), quant=request.param, progress=False)
    return request.param, str(out)


def test_records_on_disk_equal_the_records_written(quantized_tiny, tiny_llama64):
    """A neuron record read back from the store is, byte for byte, the record the converter encodes
    from the source weights."""
    from flashjax.weights.source import open_checkpoint

    kind, path = quantized_tiny
    model = open_flash_model(path)
    layout, store = model.manifest.layout, model.ffn_store()
    assert layout.part_kind("up") == kind and model.manifest.dtype == kind
    tensors = {p: a for p, a in open_checkpoint(str(tiny_llama64 / "hf")).iter_tensors() if p.startswith("layers.1.ffn")}
    ids = np.array([0, 5, 6, 159])
    got = store.read_neurons(1, ids)
    for name, piece in (("gate", tensors["layers.1.ffn.w_gate"]), ("up", tensors["layers.1.ffn.w_up"]),
                        ("down", tensors["layers.1.ffn.w_down"].T)):
        want = encode_part(layout, name, piece, np.uint8)[ids]
        np.testing.assert_array_equal(got[:, layout.part_slice(name)], want, err_msg=name)


def test_quantized_dense_is_close_to_float_and_flash_equals_dense(quantized_tiny, tiny_llama64):
    """Dense in memory holds the quantized weights (a fraction of the float32 bytes) and its logits
    stay close to float32's (correlated); the flash engine streaming the same records under a budget that caches
    some neurons and streams the rest gives the dense engine's greedy tokens exactly."""
    kind, path = quantized_tiny
    prompt = random_ids(7, 128, seed=4)
    with flashjax.load(str(tiny_llama64 / "hf")) as exact:
        want = exact.logits(prompt)
    with flashjax.load(path) as dense:
        assert dense.weight_bytes < exact.weight_bytes / (3 if kind == "q8" else 5)
        got = dense.logits(prompt)
        # Random tiny models have small logits; the correlation says how much of them survives.
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > {"q8": 0.999, "q4": 0.98}[kind]
        tokens, _ = drain_tokens(dense, prompt, 16)
    # A tiny model's fixed costs (a whole layer's read buffer, scratch rows) are most of it: the
    # budget is in bytes, with room for half of the neurons of each layer.
    model = open_flash_model(path)
    record = model.manifest.layout.record_width
    half = model.resident_nbytes("stored") + (16 + 160) * record + 80 * 2 * record
    for sparsity, budget in (("naive", None), ("hybrid", half), ("hybrid", None)):
        with flashjax.load(path, sparsity=sparsity, memory_budget=budget, prefetch_depth=1, scratch_rows=16) as flash:
            got_tokens, stats = drain_tokens(flash, prompt, 16)
            assert got_tokens == tokens, (sparsity, budget)
            if budget is not None:
                assert stats["cache_rows_per_layer"] == 80 and stats["bytes_read_per_token"] > 0


def test_budget_share_is_of_the_weights_as_stored(quantized_tiny):
    kind, path = quantized_tiny
    model = open_flash_model(path)
    with flashjax.load(path, sparsity="hybrid", memory_budget="95%", prefetch_depth=1, scratch_rows=16) as flash:
        assert flash.runner.stats()["memory_budget_bytes"] == int(0.95 * model.stored_weight_bytes())


def test_quantize_refuses_rows_that_do_not_split_into_blocks(tiny_model, tmp_path):
    """The shared tiny models have d_model 48: --quant names the reason and writes nothing."""
    name, hf_dir = tiny_model[0], tiny_model[1]
    with pytest.raises(ConvertError, match="multiple of 32"):
        convert(str(hf_dir), str(tmp_path / "out"), quant="q4", progress=False)
    assert not (tmp_path / "out").exists()


def test_default_model_q4_keeps_the_gguf_codes(tmp_path):
    """The default model (a Q4_1 GGUF) converted with --quant q4 through the command line: its 4-bit
    tensors are copied code for code (zero error against the GGUF's own values), the embedding
    (Q8_0) is kept at 8 bits, and only the down projection, regrouped per neuron, changes (reported);
    the model then generates, dense and streamed, the same tokens."""
    out = tmp_path / "smollm2-q4"
    done = subprocess.run([sys.executable, "-m", "flashjax", "convert", "smollm2", str(out), "--quant", "q4", "--json"],
                          capture_output=True, text=True, check=True)
    report = {r["tensor"]: r for r in json.loads(done.stdout.strip().splitlines()[-1])["quantization"]}
    for tensor in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "ffn.w_gate", "ffn.w_up"):
        assert report[tensor]["from"] == "Q4_1" and report[tensor]["stored"] == "q4"
        assert report[tensor]["max_error"] == 0.0, tensor
    assert report["embed.embedding"]["stored"] == "q8" and report["embed.embedding"]["max_error"] == 0.0
    assert 0 < report["ffn.w_down"]["max_error"] < 0.1
    assert "relative RMS error" in done.stderr
    prompt = [1, 504, 3458, 282, 260, 8175, 6219]
    with flashjax.load(str(out)) as dense:
        tokens, _ = drain_tokens(dense, prompt, 12)
    with flashjax.load(str(out), sparsity="hybrid", memory_budget="75%") as flash:
        got, stats = drain_tokens(flash, prompt, 12)
    assert got == tokens and stats["bytes_read_per_token"] > 0


def test_predictors_and_gate_path_run_on_quantized_records(quantized_tiny):
    """Calibration reads a quantized model (dequantized), and the predictor and gate paths then run on
    its records; the gate rows stay quantized in memory, and a gate threshold of zero keeps every
    neuron, so the gate path then equals dense."""
    from flashjax.sparsity import calibrate

    kind, path = quantized_tiny
    calibrate(path, token_ids=[random_ids(3000, 128, seed=1).tolist()], tokens=1024, seq_len=64, progress=False)
    prompt = random_ids(6, 128, seed=2)
    with flashjax.load(path) as dense:
        tokens, _ = drain_tokens(dense, prompt, 8)
    with flashjax.load(path, sparsity="predictor", predictor_threshold=0.5) as flash:
        got, stats = drain_tokens(flash, prompt, 8)
        assert len(got) == 8 and 0 < stats["needed_neurons_per_token"] < 2 * 160
    with flashjax.load(path, sparsity="gate") as flash:
        gate = flash.runner.selector.gate
        assert all(isinstance(w, QuantizedMatrix) and w.kind == kind for w in gate.w_gate)
        gate.thresholds = np.zeros_like(gate.thresholds)
        flash.runner.rules = flash.runner._device_rules()
        got, _ = drain_tokens(flash, prompt, 8)
    assert got == tokens


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "phi3"])
def test_new_architectures_quantized_flash_equals_dense(name, tmp_path):
    """Qwen3, Gemma 3 and Phi-3 (conftest's tiny configs at d_model 64, so rows split into blocks of 32):
    q8 dense stays close to float32, and the flash engine streaming q4 records under a budget gives the
    q4 dense engine's greedy tokens exactly."""
    import conftest

    base = conftest.TINY[name]
    extra = dict(base[2], hidden_size=64, intermediate_size=160)
    if name == "phi3":  # head_dim 16, half of it rotated: 4 rotary pairs
        extra["rope_parameters"] = dict(extra["rope_parameters"], short_factor=[1.0, 1.2, 1.7, 2.5],
                                        long_factor=[1.5, 2.5, 4.0, 7.0])
    else:
        extra["head_dim"] = 16
    conftest.TINY["_q_" + name] = (base[0], base[1], extra)
    try:
        conftest.build_tiny("_q_" + name, tmp_path / "hf")
    finally:
        del conftest.TINY["_q_" + name]
    prompt = random_ids(7, 128, seed=5)
    with flashjax.load(str(tmp_path / "hf")) as exact:
        want = exact.logits(prompt)
    for kind in KINDS:
        convert(str(tmp_path / "hf"), str(tmp_path / kind), quant=kind, progress=False)
    with flashjax.load(str(tmp_path / "q8")) as dense:
        # Random tiny models have small logits; the correlation says how much of them survives.
        assert np.corrcoef(dense.logits(prompt).ravel(), want.ravel())[0, 1] > 0.995
    with flashjax.load(str(tmp_path / "q4")) as dense:
        tokens, _ = drain_tokens(dense, prompt, 16)
    with flashjax.load(str(tmp_path / "q4"), sparsity="hybrid", memory_budget="90%", prefetch_depth=1,
                       scratch_rows=16) as flash:
        got, stats = drain_tokens(flash, prompt, 16)
    assert got == tokens and stats["bytes_read_per_token"] > 0
