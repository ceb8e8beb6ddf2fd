"""Neuron sparsity inside a mixture of experts' routed experts (`--sparsity predictor|gate`).

The router chooses the experts as in naive/hybrid; inside each routed expert that is streamed (no
slot in the expert cache) only the neurons the layer's predictor or gate path selects are read and
multiplied; a cached expert multiplies whole. Checked on a tiny OLMoE (test_moe_parity's, three
layers) stored one neuron per block, so the bytes read follow the selection exactly:

- calibration records every expert's raw activations, not weighed by the router;
- rules that keep every neuron, and a budget that caches every expert, equal dense;
- with no expert slot, each layer's FFN equals a numpy reference: the routed experts (numpy routing)
  weighed by the router, each masked to the predictor's own `needed_ids`;
- the bytes read are the selected neurons' records, fewer than naive reads; no token recompiles.
"""

from __future__ import annotations


import numpy as np
import pytest

from _refs import assert_same_choice, ffn_weights, preactivations, silu
from conftest import drain_tokens, random_ids
from test_flash_parity import minimum_budget, stepwise_logits
from test_moe_parity import build_moe

import flashjax
from flashjax.flash import kernels
from flashjax.flash.runner import FlashOptions
from flashjax.model.params import load_params
from flashjax.sparsity import Selection, calibrate, collect_activations
from flashjax.store import convert, open_flash_source, read_manifest

TOL = 1e-5  # float32 logits, relative to their size (as test_moe_flash)
PROMPT = 6
N_TOKENS = 14


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """(flash dir, full params, predictors): OLMoE, one neuron per block, calibrated on random tokens."""
    root = tmp_path_factory.mktemp("moe-sparsity")
    build_moe("olmoe", root / "hf", num_hidden_layers=3)
    flash = str(root / "flash")
    convert(str(root / "hf"), flash, dtype="float32", ffn_block=1, progress=False)
    pred = calibrate(flash, token_ids=[random_ids(3000, 128, seed=1).tolist()], tokens=1024, seq_len=64,
                     epochs=4, progress=False)
    return flash, load_params(open_flash_source(flash), progress=False), pred


def _load(path, budget="minimum", **options):
    budget = minimum_budget(path, **options) if budget == "minimum" else budget
    return flashjax.load(path, memory_budget=budget, scratch_rows=16, **options)


def _logits_and_stats(llm, ids):
    try:
        return stepwise_logits(llm, ids, PROMPT), llm.runner.stats()
    finally:
        llm.runner.close()


def test_calibration_records_every_experts_raw_activations(moe):
    """The activation of a neuron is defined whether or not its expert is routed: calibration sees
    |silu(gate) * up| of all n_experts * expert_ffn neurons, not the router-weighted FFN's."""
    flash, params, _ = moe
    cfg = read_manifest(flash).config
    acts = collect_activations(cfg, params, [random_ids(32, cfg.vocab_size, seed=3)], max_tokens=16, progress=False)
    for l in range(cfg.n_layers):
        gate, up = preactivations(ffn_weights(params, l), acts[l].x.astype(np.float64))
        expected = np.abs(silu(gate) * up)
        assert acts[l].a.shape == (16, cfg.d_ffn)
        np.testing.assert_allclose(acts[l].a, expected, rtol=1e-4, atol=1e-6 * expected.max())
        # Routed or not, every expert has activations: a router-weighted record would be 0 for 6 of 8.
        per_expert = expected.reshape(16, cfg.n_experts, cfg.expert_ffn).max(-1)
        assert np.all(per_expert > 0)


@pytest.mark.parametrize("options", [dict(sparsity="predictor", predictor_threshold=0.0),
                                     dict(sparsity="gate", selection="topk", top_k=256)],
                         ids=["predictor-keeps-all", "gate-keeps-all"])
def test_rules_that_keep_every_neuron_equal_dense(moe, options):
    """No expert slot (every routed expert streamed through the rule's mask), a rule keeping all."""
    flash, _, _ = moe
    dense = flashjax.load(flash, progress=False)
    ids = [int(i) for i in random_ids(N_TOKENS, dense.config.vocab_size, seed=5)]
    expected = stepwise_logits(dense, ids, PROMPT)
    ours, stats = _logits_and_stats(_load(flash, **options), ids)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL * np.abs(expected).max())
    cfg = dense.config
    assert stats["cache_rows_per_layer"] == 0
    assert stats["expert_neurons_selected_share"] == 1.0
    assert stats["expert_neurons_routed_per_token"] == cfg.n_layers * cfg.experts_per_token * cfg.expert_ffn


@pytest.mark.parametrize("options", [dict(sparsity="predictor", predictor_threshold=0.5), dict(sparsity="gate")],
                         ids=["predictor", "gate"])
def test_every_expert_cached_equals_dense(moe, options):
    """Without a budget every expert has a slot: cached experts multiply whole, so a rule that drops
    neurons (a sparse predictor threshold, the gate path at its calibrated 50%) changes nothing."""
    flash, _, _ = moe
    dense = flashjax.load(flash, progress=False)
    ids = [int(i) for i in random_ids(N_TOKENS, dense.config.vocab_size, seed=6)]
    expected = stepwise_logits(dense, ids, PROMPT)
    ours, stats = _logits_and_stats(_load(flash, budget=None, **options), ids)
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL * np.abs(expected).max())
    assert stats["cache_rows_per_layer"] == dense.config.d_ffn
    assert stats["expert_neurons_selected_share"] < 1.0  # the rule did drop neurons; the cache made up for it


class RoutedRecorder:
    """Per decode step and layer: the FFN input h, the engine's neuron mask and its FFN output (the
    routing step and every FFN step of the layer, wrapped while the context is open)."""

    def __init__(self, llm):
        self.llm, self.steps, self._layer, self._decoding = llm, [], -1, False

    def __enter__(self):
        route, ffn = kernels.attention_route_step, kernels.ffn_step
        self._saved = (route, ffn)

        def recording_route(*args, **kwargs):
            out = route(*args, **kwargs)
            if self._decoding:
                self._layer += 1
                self.steps[-1][self._layer] = dict(h=np.asarray(out[1], np.float64).reshape(-1),
                                                   mask=np.asarray(out[5]), out=0.0)
            return out

        def recording_ffn(cfg, mesh, part_slices, post_ffn_norm, partial, h, b_down, cached, scratch, weights=None):
            y, (x, out) = ffn(cfg, mesh, part_slices, post_ffn_norm, partial, h, b_down, cached, scratch, weights)
            if self._decoding:
                so_far = 0.0 if partial[1] is None else np.asarray(partial[1], np.float64)
                self.steps[-1][self._layer]["out"] += np.asarray(out, np.float64).reshape(-1) - np.reshape(so_far, -1)
            return y, (x, out)

        kernels.attention_route_step, kernels.ffn_step = recording_route, recording_ffn
        runner = self.llm.runner
        decode = runner.decode

        def recording_decode(*args, **kwargs):
            self.steps.append({})
            self._layer, self._decoding = -1, True
            try:
                return decode(*args, **kwargs)
            finally:
                self._decoding = False

        runner.decode = recording_decode
        return self

    def __exit__(self, *exc):
        kernels.attention_route_step, kernels.ffn_step = self._saved
        del self.llm.runner.decode


def numpy_routing(cfg, router, h) -> np.ndarray:
    """Expert weights [E]: softmax of the router's logits, the top k kept (renormalized where the
    config says so), the rest 0."""
    logits = np.asarray(router, np.float64) @ h
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:cfg.experts_per_token]
    weights = np.zeros(cfg.n_experts)
    weights[top] = probs[top] / (probs[top].sum() if cfg.router_renormalize else 1.0)
    return weights


@pytest.mark.parametrize("threshold", [FlashOptions().predictor_threshold, 0.5])
def test_streamed_experts_equal_numpy_masked_to_the_predictors_choice(moe, threshold):
    """No expert slot: each layer's FFN is the routed experts weighed by the router, each expert's
    neurons masked to what the predictor selects (its own `needed_ids`, recomputed here from h), at
    the default threshold and a sparser one. At 0.5 the mask drops routed neurons, and the output
    differs from the unmasked routed FFN (at the default, this tiny model's predictor keeps nearly
    every neuron)."""
    flash, params, pred = moe
    cfg = pred.config
    llm = _load(flash, sparsity="predictor", predictor_threshold=threshold)
    try:
        with RoutedRecorder(llm) as recorder:
            drain_tokens(llm, random_ids(PROMPT, cfg.vocab_size, seed=7), n=6)
    finally:
        llm.runner.close()
    assert len(recorder.steps) == 5 and all(len(step) == cfg.n_layers for step in recorder.steps)
    dropped, gap = 0, 0.0
    for step in recorder.steps:
        for l, rec in step.items():
            h, w = rec["h"], ffn_weights(params, l)
            ids = pred.needed_ids(l, h.astype(np.float32), Selection(threshold=threshold))
            scores = np.asarray(pred.scores(l, h.astype(np.float32)), np.float64).reshape(-1)
            expected_mask = np.zeros(cfg.d_ffn, bool)
            expected_mask[ids] = True
            assert_same_choice(np.flatnonzero(rec["mask"]), expected_mask, scores, threshold, 1e-5, f"layer {l}")
            gate, up = preactivations(w, h)
            scale = np.repeat(numpy_routing(cfg, w["router"], h), cfg.expert_ffn)
            act = silu(gate) * up * scale
            reference = np.where(expected_mask, act, 0.0) @ w["w_down"].T
            size = float(np.abs(reference).max())
            np.testing.assert_allclose(rec["out"], reference, rtol=0, atol=1e-4 * size, err_msg=f"layer {l}")
            dropped += int(np.count_nonzero((scale > 0) & ~expected_mask))
            gap = max(gap, float(np.abs(rec["out"] - act @ w["w_down"].T).max()) / size)
    if threshold == 0.5:
        assert dropped > 0 and gap > 1e-6  # the mask removed routed neurons, and that shows in the output


def test_bytes_read_are_the_selected_neurons(moe):
    """No expert slot: naive reads every routed expert whole (and the next layer's guessed experts);
    the predictor reads only its selected neurons of the routed experts (one neuron per block), no
    early guess, so fewer bytes. And no decode token compiles anything new."""
    flash, _, pred = moe
    cfg = pred.config
    prompt = random_ids(PROMPT, cfg.vocab_size, seed=8)
    naive = flashjax.load(flash, sparsity="naive", scratch_rows=16)
    llm = _load(flash, sparsity="predictor", predictor_threshold=0.5)
    try:
        _, naive_stats = drain_tokens(naive, prompt, n=8)
        drain_tokens(llm, prompt, n=4)
        warm = llm.runner.compile_count()
        drain_tokens(llm, prompt, n=8)
        assert llm.runner.compile_count() == warm
        stats = llm.runner.stats()
    finally:
        naive.runner.close()
        llm.runner.close()
    record = read_manifest(flash).layout.record_width * 4
    routed_bytes = cfg.n_layers * cfg.experts_per_token * cfg.expert_ffn * record
    assert naive_stats["bytes_read_per_token"] >= routed_bytes
    assert 0 < stats["expert_neurons_selected_share"] < 1
    assert stats["bytes_read_per_token"] == pytest.approx(stats["expert_neurons_selected_per_token"] * record)
    assert stats["bytes_read_per_token"] < routed_bytes <= naive_stats["bytes_read_per_token"]
