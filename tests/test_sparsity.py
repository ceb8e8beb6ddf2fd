"""Sparsity predictors: collection, thresholds, training, selection, the gate path, storage."""

import ast
import json
import os
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from _refs import (FlashRecorder, assert_same_choice, ffn_weights, gate_function, masked_ffn, preactivations, sigmoid,
                   silu)
from conftest import build_tiny, drain_tokens, random_ids

import flashjax

from flashjax.model.params import load_params
from flashjax.sparsity import (GateSelector, Predictors, PredictorsError, Selection, activation_thresholds,
                               calibrate, collect_activations, dropped_share, gate_keep_ids, gate_threshold,
                               generate_calibration_ids, load_predictors, require_predictors, save_predictors, select,
                               token_sequences)
from flashjax.sparsity.storage import PREDICTORS_DIR
from flashjax.store import convert, open_flash_source

def _calib_ids(n=3000, seed=1):
    return [random_ids(n, 128, seed=seed).tolist()]


@pytest.fixture(scope="module", params=["llama_gqa", "opt", "qwen3", "gemma3", "phi3"])
def tiny(request, tmp_path_factory):
    """(name, flash dir, full params, predictors calibrated on random tokens)."""
    root = tmp_path_factory.mktemp("sparsity-" + request.param)
    build_tiny(request.param, root / "hf")
    flash = str(root / "flash")
    convert(str(root / "hf"), flash, dtype="float32", progress=False)
    params = load_params(open_flash_source(flash), progress=False)
    pred = calibrate(flash, token_ids=_calib_ids(), tokens=2048, seq_len=64, progress=False)
    return request.param, flash, params, pred


def test_calibrate_stores_and_reports(tiny):
    name, flash, _, pred = tiny
    cfg = pred.config
    assert pred.kind == "lowrank" and len(pred.layers) == len(pred.lookahead) == cfg.n_layers
    assert pred.target_sparsity == (0.5 if cfg.is_glu else None)
    for key in ("predictor", "lookahead") + (("gate",) if cfg.is_glu else ()):
        assert len(pred.metrics[key]) == cfg.n_layers
        for m in pred.metrics[key]:
            assert 0.0 <= m["precision"] <= 1.0 and 0.0 <= m["recall"] <= 1.0
    assert "layer" in pred.summary() and "recall" in pred.summary()
    assert os.path.isfile(os.path.join(flash, PREDICTORS_DIR, "meta.json"))


def test_predictor_recall_on_held_out_activations(tiny):
    name, flash, params, pred = tiny
    cfg = pred.config
    metrics = pred.metrics["predictor"]
    for m in metrics:
        if cfg.is_glu:
            # Gated FFNs at 50% sparsity: |act(gate)*up| is not linear in h; better than chance at the
            # default threshold (by a few points over the layers: these are random tiny models, and
            # Qwen3's comes out at about 5), and high recall once it over-selects.
            assert m["recall"] > m["selected"]
            assert next(c for c in m["curve"] if c["threshold"] == 0.2)["recall"] >= 0.9
        else:
            assert m["recall"] >= 0.9 and m["precision"] >= 0.8
    if cfg.is_glu:
        assert np.mean([m["recall"] - m["selected"] for m in metrics]) > 0.03

    # The run-time path on tokens calibration never saw: needed_ids against the true active set.
    seqs = token_sequences([random_ids(64 * 4, 128, seed=9).tolist()], 64)
    acts = collect_activations(cfg, params, seqs, max_tokens=200, progress=False)
    sel = Selection(threshold=0.2) if cfg.is_glu else Selection()
    for l in range(cfg.n_layers):
        hit = total = 0
        for h, a in zip(acts[l].x, acts[l].a):
            ids = pred.needed_ids(l, h, sel)
            assert np.all(np.diff(ids) > 0) and (len(ids) == 0 or 0 <= ids[0] <= ids[-1] < cfg.d_ffn)
            active = np.flatnonzero(a > pred.thresholds[l])
            hit += np.isin(active, ids).sum()
            total += len(active)
        assert hit / total >= 0.85


def test_lookahead_and_topk_selection(tiny):
    name, flash, params, pred = tiny
    cfg = pred.config
    h = np.random.RandomState(0).randn(1, 1, cfg.d_model).astype(np.float32)
    ahead = pred.lookahead_ids(1, h)
    assert ahead.dtype == np.int64 and np.all(np.diff(ahead) > 0)
    for over in (1.0, 1.5):
        ids = pred.needed_ids(0, h, Selection(mode="topk", over_select=over))
        assert len(ids) == int(min(cfg.d_ffn, np.ceil(pred.active_counts[0] * over)))
    assert len(pred.needed_ids(0, jnp.asarray(h), Selection(mode="topk", top_k=7))) == 7
    assert len(pred.needed_ids(0, h, Selection(threshold=0.0))) == cfg.d_ffn  # everything selected
    for m in pred.metrics["lookahead"]:
        assert 0.0 <= m["covered"] <= 1.0


def test_select_threshold_and_topk():
    scores = np.array([[[0.9, 0.1, 0.6, 0.2]], [[0.1, 0.7, 0.3, 0.2]]], np.float32)  # [B=2, T=1, F=4]
    assert select(scores, threshold=0.5).tolist() == [0, 1, 2]  # union over tokens
    assert select(scores[0], top_k=1).tolist() == [0]
    assert select(scores[0], top_k=1, over_select=2.0).tolist() == [0, 2]
    assert select(jnp.asarray(scores), top_k=1).tolist() == [0, 1]


def test_thresholds_drop_target_share(tiny):
    name, flash, params, pred = tiny
    cfg = pred.config
    seqs = token_sequences(_calib_ids(), 64)
    acts = collect_activations(cfg, params, seqs, max_tokens=1024, progress=False)
    for target in ([0.3, 0.5, 0.7] if cfg.is_glu else [None, 0.9]):
        thr = activation_thresholds(cfg, acts, target)
        for l in range(cfg.n_layers):
            share = dropped_share(acts[l].a, thr[l])
            if target is None:
                assert thr[l] == 0.0  # ReLU: active = positive
            elif cfg.is_glu:
                assert abs(share - target) < 1e-3
            else:
                assert share >= target - 1e-3  # a ReLU layer may already be sparser than the target
    # Consistency of what was collected: the activations are the FFN of the collected inputs,
    # and layer l's previous input is layer l-1's input.
    l = cfg.n_layers - 1
    ffn = {k: np.asarray(v) for k, v in params["layers"][l]["ffn"].items()}
    x = np.asarray(acts[l].x, np.float32)
    up = x @ ffn["w_up"].T + ffn.get("b_up", 0.0)
    if cfg.is_glu:
        gate = x @ ffn["w_gate"].T + ffn.get("b_gate", 0.0)
        expected = np.abs(gate_function(cfg)(gate) * up)
    else:
        expected = np.maximum(up, 0.0)
    np.testing.assert_allclose(acts[l].a, expected, rtol=1e-4, atol=1e-5)
    assert np.shares_memory(acts[l].x_prev, acts[l - 1].x)
    np.testing.assert_array_equal(acts[l].x_prev, acts[l - 1].x)
    assert len(acts.sequence) == acts.n_tokens and acts.position.min() >= 1


def test_save_load_round_trip_exact(tiny):
    name, flash, params, pred = tiny
    loaded = load_predictors(flash)
    assert loaded.kind == pred.kind and loaded.ranks == pred.ranks and loaded.config == pred.config
    assert loaded.target_sparsity == pred.target_sparsity and loaded.selection == pred.selection
    np.testing.assert_array_equal(loaded.thresholds, pred.thresholds)
    np.testing.assert_array_equal(loaded.active_counts, pred.active_counts)
    if pred.gate_thresholds is not None:
        np.testing.assert_array_equal(loaded.gate_thresholds, pred.gate_thresholds)
    for a, b in zip(loaded.layers + loaded.lookahead, pred.layers + pred.lookahead):
        for k in ("a", "b", "bias"):
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    assert json.loads(json.dumps(pred.metrics)) == loaded.metrics
    h = np.random.RandomState(3).randn(2, 3, pred.config.d_model).astype(np.float32)
    np.testing.assert_array_equal(loaded.needed_ids(0, h), pred.needed_ids(0, h))


def _copy_model(flash, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(flash, out)
    return str(out)


def test_damaged_or_missing_predictors(tiny, tmp_path):
    name, flash, params, pred = tiny
    model = _copy_model(flash, tmp_path)
    root = os.path.join(model, PREDICTORS_DIR)

    # A half-written set left in its temporary directory is not loaded.
    shutil.move(root, os.path.join(model, ".predictors.tmp-abc"))
    assert load_predictors(model) is None
    shutil.move(os.path.join(model, ".predictors.tmp-abc"), root)
    assert load_predictors(model) is not None

    # A file of the arrays truncated, then modified: clear errors telling to re-run calibrate.
    files = sorted(p for p in pathlib.Path(root, "arrays").rglob("*") if p.is_file() and p.stat().st_size > 64)
    target = max(files, key=lambda p: p.stat().st_size)
    data = target.read_bytes()
    target.write_bytes(data[:len(data) // 2])
    with pytest.raises(PredictorsError, match="calibrate"):
        load_predictors(model)
    target.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(PredictorsError, match="checksum"):
        load_predictors(model)
    target.write_bytes(data)
    assert load_predictors(model) is not None

    # meta.json missing: incomplete.
    os.remove(os.path.join(root, "meta.json"))
    with pytest.raises(PredictorsError, match="incomplete"):
        load_predictors(model)
    shutil.rmtree(root)
    assert load_predictors(model) is None
    with pytest.raises(PredictorsError, match="flashjax calibrate"):
        require_predictors(model)


def test_save_replaces_atomically_and_rejects_other_models(tiny, tmp_path):
    name, flash, params, pred = tiny
    model = _copy_model(flash, tmp_path)
    save_predictors(model, pred)
    assert [p for p in os.listdir(model) if p.startswith(".predictors")] == []
    other = Predictors(config=pred.config.__class__(**{**pred.config.__dict__, "vocab_size": 7}), kind="gate",
                       thresholds=pred.thresholds, active_counts=pred.active_counts)
    with pytest.raises(PredictorsError, match="another model"):
        save_predictors(model, other)
    assert load_predictors(model).kind == "lowrank"


def test_gate_path(tiny, tmp_path):
    name, flash, params, pred = tiny
    cfg = pred.config
    if not cfg.is_glu:
        with pytest.raises(ValueError, match="SwiGLU"):
            calibrate(flash, token_ids=_calib_ids(), tokens=256, seq_len=64, kind="gate", progress=False, save=False)
        return
    ffn = {k: np.asarray(v) for k, v in params["layers"][0]["ffn"].items()}
    act = gate_function(cfg)

    # Calibrated thresholds drop the target share of |act(gate)| on the calibration inputs.
    acts = collect_activations(cfg, params, token_sequences(_calib_ids(), 64), max_tokens=512, progress=False)
    thr = gate_threshold(acts[0].x, ffn["w_gate"], 0.5, cfg.ffn_activation)
    g = np.asarray(acts[0].x, np.float32) @ ffn["w_gate"].T
    assert abs(np.mean(np.abs(act(g)) <= thr) - 0.5) < 1e-3
    assert gate_threshold(acts[0].x, ffn["w_gate"], None, cfg.ffn_activation) == 0.0

    # At that threshold, on FFN inputs calibration never saw, gate_keep_ids keeps exactly the neurons
    # whose |act(gate)| (numpy, from the raw weights) clears it for any of the tokens: a strict,
    # non-empty subset.
    held_out = collect_activations(cfg, params, token_sequences([random_ids(128, 128, seed=9).tolist()], 64),
                                   max_tokens=32, progress=False)
    w = ffn_weights(params, 0)
    for pair in np.asarray(held_out[0].x, np.float32).reshape(-1, 2, cfg.d_model)[:8]:
        ids = gate_keep_ids(ffn["w_gate"], pair[None], thr, cfg.ffn_activation)
        gate, _ = preactivations(w, pair)
        magnitude = np.abs(act(gate)).max(axis=0)  # [F]: the union over the two tokens
        assert_same_choice(ids, magnitude > thr, magnitude, thr, 1e-5, "gate_keep_ids")
        assert 0 < len(ids) < cfg.d_ffn

    # The stored gate thresholds through the Predictors and GateSelector APIs agree.
    h = np.asarray(held_out[1].x[:2], np.float32)[None]
    selector = GateSelector.from_model(flash, pred.gate_thresholds)
    np.testing.assert_array_equal(selector.needed_ids(1, h), pred.gate_ids(1, h, selector.w_gate[1]))
    assert 0 < len(selector.needed_ids(1, h)) < cfg.d_ffn
    assert selector.nbytes == cfg.n_layers * cfg.d_ffn * cfg.d_model * 4

    # kind="gate": thresholds only, no training; stored and loaded like the trained kind.
    model = _copy_model(flash, tmp_path)
    gate = calibrate(model, token_ids=_calib_ids(), tokens=512, seq_len=64, kind="gate", progress=False)
    loaded = load_predictors(model)
    assert loaded.kind == "gate" and loaded.layers is None
    np.testing.assert_array_equal(loaded.gate_thresholds, gate.gate_thresholds)
    with pytest.raises(PredictorsError, match="gate_ids"):
        loaded.needed_ids(0, h)


# -- the engine's FFN over the chosen neurons, against numpy -----------------------------------------
#
# Each test decodes a few tokens with the flash engine at window 1 (the FFN then runs over exactly the
# neurons chosen for the token) and checks, for every decode step and layer, against numpy written
# here from the raw weights: which neurons were chosen, that they are a strict non-empty subset, and
# that the engine's FFN output equals the numpy FFN masked to exactly those neurons.


def _decode_recorded(flash, n=8, seed=21, **options):
    """(prompt + generated ids, the FlashRecorder, stats) of n greedy tokens decoded at window 1."""
    llm = flashjax.load(flash, window=1, **options)
    prompt = random_ids(6, llm.config.vocab_size, seed=seed)
    try:
        with FlashRecorder(llm) as recorder:
            tokens, stats = drain_tokens(llm, prompt, n)
    finally:
        llm.runner.close()
    assert len(recorder.steps) == n - 1 and all(len(s["out"]) == llm.config.n_layers for s in recorder.steps)
    return list(prompt) + tokens, recorder, stats


def _assert_ffn_over(params, recorder, act=silu):
    """Every decode step and layer: the neurons the engine was given (recorder.used) are a strict,
    non-empty subset, and its FFN output equals the numpy FFN masked to them, to 1e-4 of the output's
    scale (the tiny models' FFN outputs are small). Returns the largest difference between the
    engine's output and the unmasked (dense) FFN, in the same unit, so a caller can check whether the
    masking mattered."""
    dense_gap = 0.0
    for step in recorder.steps:
        for l, out in step["out"].items():
            w, h, used = ffn_weights(params, l), step["h"][l], recorder.used(step, l)
            assert 0 < len(used) < w["w_up"].shape[0], (step["pos"], l, len(used))
            reference = masked_ffn(w, h, used, act)
            scale = float(np.max(np.abs(reference)))
            np.testing.assert_allclose(out, reference, rtol=0, atol=1e-4 * scale,
                                       err_msg=f"pos {step['pos']} layer {l}")
            dense_gap = max(dense_gap, float(np.max(np.abs(out - masked_ffn(w, h, act=act)))) / scale)
    return dense_gap


def test_gate_path_ffn_equals_numpy_masked_to_the_kept_neurons(tiny):
    """The gate path in the engine at the calibrated thresholds (target 50%): each layer keeps the
    neurons whose |act(h W_gate^T + b_gate)| clears the layer's threshold (SiLU, or GELU for Gemma's
    GeGLU), and the FFN is the numpy FFN over those only, which differs from the dense FFN."""
    name, flash, params, pred = tiny
    if not pred.config.is_glu:
        with pytest.raises(ValueError, match="SwiGLU"):
            flashjax.load(flash, sparsity="gate")
        return
    act = gate_function(pred.config)
    _, recorder, _ = _decode_recorded(flash, sparsity="gate")
    for step in recorder.steps:
        for l, ids in step["needed"].items():
            gate, _ = preactivations(ffn_weights(params, l), step["h"][l])
            magnitude = np.abs(act(gate))
            thr = float(pred.gate_thresholds[l])
            assert_same_choice(ids, magnitude > thr, magnitude, thr, 1e-5, f"gate pos {step['pos']} layer {l}")
    assert _assert_ffn_over(params, recorder, act) > 0.05


@pytest.mark.parametrize("lookahead", [False, True])
def test_predictor_ffn_equals_numpy_masked_to_the_selected_neurons(tiny, lookahead):
    """The low-rank predictors in the engine at a real threshold (0.5): each layer reads the neurons
    whose sigmoid(h a b + bias) > 0.5 (numpy, from the predictor's arrays), plus, with lookahead,
    those predicted for it from the layer before; the FFN is the numpy FFN over exactly those."""
    name, flash, params, pred = tiny
    thr = 0.5
    _, recorder, _ = _decode_recorded(flash, sparsity="predictor", predictor_threshold=thr, lookahead=lookahead)
    n_ahead = 0
    for step in recorder.steps:
        for l, ids in step["needed"].items():
            p = {k: np.asarray(v, np.float64) for k, v in pred.layers[l].items()}
            scores = sigmoid(step["h"][l] @ p["a"] @ p["b"] + p["bias"])
            assert_same_choice(ids, scores > thr, scores, thr, 1e-5, f"predictor pos {step['pos']} layer {l}")
        for l, ids in step["ahead"].items():
            p = {k: np.asarray(v, np.float64) for k, v in pred.lookahead[l].items()}
            scores = sigmoid(step["h"][l - 1] @ p["a"] @ p["b"] + p["bias"])
            assert_same_choice(ids, scores > thr, scores, thr, 1e-5, f"lookahead pos {step['pos']} layer {l}")
            n_ahead += 1
    assert n_ahead == (len(recorder.steps) * (pred.config.n_layers - 1) if lookahead else 0)
    # A ReLU predictor misses some active neurons, a SwiGLU one drops small but nonzero ones: either
    # way the FFN over the selection is not the dense FFN.
    assert _assert_ffn_over(params, recorder, gate_function(pred.config) if pred.config.is_glu else silu) > 1e-3


@pytest.mark.parametrize("sparsity,selection", [("predictor", "threshold"), ("predictor", "topk"),
                                                ("gate", "threshold"), ("gate", "topk")])
def test_device_selection_equals_the_host_selection(tiny, sparsity, selection):
    """The engine chooses each layer's neurons inside its jitted layer step; the ids must be those the
    host-side selection gives for the same FFN input: `select` over numpy scores (the predictor's
    sigmoid, or |act(gate)|) and the selector's own `needed` (the path the step replaced)."""
    name, flash, params, pred = tiny
    if sparsity == "gate" and not pred.config.is_glu:
        return  # no gate path on a ReLU model (tested to fail clearly above)
    top_k = 5 if selection == "topk" else None
    _, recorder, _ = _decode_recorded(flash, sparsity=sparsity, selection=selection, top_k=top_k,
                                      predictor_threshold=0.5, lookahead=False)
    selector = recorder.llm.runner.selector
    compared = 0
    for step in recorder.steps:
        for l, ids in step["needed"].items():
            h = step["h"][l]
            if sparsity == "predictor":
                p = {k: np.asarray(v, np.float64) for k, v in pred.layers[l].items()}
                logits = h @ p["a"] @ p["b"] + p["bias"]
                # top-k ranks the logits: the sigmoid would squash the best scores into near-ties
                scores = logits if top_k is not None else sigmoid(logits)
            else:
                gate, _ = preactivations(ffn_weights(params, l), h)
                scores = np.abs(gate_function(pred.config)(gate))
            host = select(scores[None], threshold=0.5 if sparsity == "predictor" else float(pred.gate_thresholds[l]),
                          top_k=top_k)
            if top_k is not None:
                assert len(ids) == top_k
                kth = np.sort(scores)[-top_k]
                assert_same_choice(ids, scores >= kth, scores, kth, 1e-5, f"{sparsity} top-k layer {l}")
            np.testing.assert_array_equal(ids, selector.needed(l, h[None, None]), err_msg=f"layer {l}")
            assert np.setxor1d(ids, host).size <= 2, (l, ids, host)  # float32 vs float64 at the bound
            compared += 1
    assert compared == len(recorder.steps) * pred.config.n_layers


def test_oracle_selects_exactly_the_active_neurons(tiny):
    """The oracle (calibrated thresholds: 0 for ReLU) against numpy on each layer's FFN input from a
    dense forward of the same tokens: for OPT, exactly the neurons whose up projection + bias is
    positive; for gated FFNs, those whose |act(gate) * up| clears the layer's calibrated threshold. The
    engine's FFN is then the numpy FFN over exactly those (for ReLU: the dense FFN)."""
    name, flash, params, pred = tiny
    cfg = pred.config
    # The reference runs the whole sequence at once; LongRoPE (Phi-3) would rotate it with its long
    # factors past the tiny model's pretraining length (16) while the decode steps before it used the
    # short ones: stay within it there.
    n = 12 if cfg.rope_scaling is None or cfg.rope_scaling[0] != "longrope" else cfg.rope_scaling[3] - 6
    seq, recorder, _ = _decode_recorded(flash, n=n, sparsity="oracle", threshold="calibrated")
    acts = collect_activations(cfg, params, [np.asarray(seq[:-1], np.int32)], max_tokens=len(seq), progress=False)
    row_of = {int(p): i for i, p in enumerate(acts.position)}
    for step in recorder.steps:
        assert seq[step["pos"]] == step["token"]
        for l, ids in step["needed"].items():
            x = np.asarray(acts[l].x[row_of[step["pos"]]], np.float32)
            gate, up = preactivations(ffn_weights(params, l), x)
            if cfg.is_glu:
                values, bound = np.abs(gate_function(cfg)(gate) * up), float(pred.thresholds[l])
            else:
                assert pred.thresholds[l] == 0.0  # ReLU: active means positive
                values, bound = up, 0.0
            assert_same_choice(ids, values > bound, values, bound, 1e-5, f"oracle pos {step['pos']} layer {l}")
    gap = _assert_ffn_over(params, recorder, gate_function(cfg) if cfg.is_glu else silu)
    if cfg.is_glu:
        assert gap > 0.05
    else:
        assert gap < 1e-5  # relu: the neurons left out contribute exactly nothing


def test_windowing_strictly_reduces_reads_on_opt(tmp_path):
    """OPT, oracle, the same tokens: a window of 4 keeps recent neurons cached, so fewer records and
    fewer bytes are read per token than with a window of 1 (one neuron per block, so bytes count
    neurons). ReLU makes the extra cached neurons contribute nothing: the tokens are the same."""
    build_tiny("opt", tmp_path / "hf")
    flash = str(tmp_path / "flash")
    convert(str(tmp_path / "hf"), flash, dtype="float32", ffn_block=1, progress=False)
    prompt = random_ids(6, 128, seed=7)
    runs = {}
    for window in (1, 4):
        llm = flashjax.load(flash, sparsity="oracle", window=window)
        try:
            runs[window] = drain_tokens(llm, prompt, n=16)
        finally:
            llm.runner.close()
    (t1, s1), (t4, s4) = runs[1], runs[4]
    assert t1 == t4
    assert s1["needed_neurons_per_token"] == s4["needed_neurons_per_token"] > 0
    assert 0 < s4["neurons_read_per_token"] < s1["neurons_read_per_token"] <= s1["needed_neurons_per_token"]
    assert 0 < s4["bytes_read_per_token"] < s1["bytes_read_per_token"]
    assert s4["cache_hit_rate"] > s1["cache_hit_rate"]


def test_self_generated_calibration_tokens(tiny):
    name, flash, params, pred = tiny
    cfg = pred.config
    rows = generate_calibration_ids(cfg, params, None, n_tokens=300, max_new=24, progress=False)
    assert sum(len(r) for r in rows) >= 300
    assert all(0 <= t < cfg.vocab_size for r in rows for t in r)
    again = generate_calibration_ids(cfg, params, None, n_tokens=300, max_new=24, progress=False)
    assert rows == again  # seeded


def test_token_sequences_spread_over_the_stream():
    seqs = token_sequences([list(range(1000)), list(range(1000, 2000))], 100, max_sequences=5)
    assert seqs.shape == (5, 100)
    assert seqs[0, 0] < 400 and seqs[-1, 0] >= 1600  # sampled throughout, not only the start
    assert token_sequences([[1, 2, 3]], 100).shape == (1, 3)
    with pytest.raises(ValueError, match="empty"):
        token_sequences([[]], 10)


def _repository_text() -> str:
    """English prose and technical text the repository ships: the README, the docs and the package's
    docstrings (so a test on real text needs nothing outside the checkout)."""
    root = pathlib.Path(__file__).resolve().parents[1]
    parts = [(root / "README.md").read_text(encoding="utf-8")]
    parts += [p.read_text(encoding="utf-8") for p in sorted((root / "docs").glob("*.md"))]
    for path in sorted((root / "flashjax").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
        parts += [doc for doc in map(ast.get_docstring, nodes) if doc]
    return "\n\n".join(parts)


@pytest.mark.slow
def test_default_model_gate_calibration(tmp_path):
    """The real default model, on text the repository ships, gate kind (no training: quick)."""
    text = _repository_text()
    assert len(text) > 50_000
    flash = str(tmp_path / "smol")
    convert("smollm2", flash, progress=False)
    pred = calibrate(flash, texts=[text], tokens=1024, kind="gate", progress=False)
    assert pred.target_sparsity == 0.5 and len(pred.gate_thresholds) == 30
    for m in pred.metrics["gate"]:
        assert abs(m["selected"] - 0.5) < 0.1 and m["mass_recall"] > 0.7
