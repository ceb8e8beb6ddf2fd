"""Mixture-of-experts models in the flash engine: experts streamed from disk, cached whole.

The expert cache keeps its invariants under random routing (property tests, as the neuron cache's);
the flash engine equals the dense engine, step by step in float32 logits, for each architecture at
budgets from "every expert fits" down to the minimum (no slot at all: every routed expert streamed);
a damaged expert is reported by layer and expert.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flashjax
from flashjax.flash.expert_cache import LayerExpertCache
from flashjax.store import convert, read_manifest
from flashjax.store.manifest import StoreChecksumError
from test_flash_parity import minimum_budget, stepwise_logits
from test_moe_parity import EXPERT_FFN, MOE_TINY, N_EXPERTS, build_moe

# float32, relative to the logits' size (the experts are summed in another order: cached slots, then
# streamed chunks); a routing mistake moves logits by O(1).
TOL = 1e-5
PROMPT = 6
N_TOKENS = 22

# ---- the expert cache ------------------------------------------------------------------------------


@st.composite
def routings(draw):
    n_experts = draw(st.integers(2, 10))
    expert_ffn = draw(st.sampled_from([1, 3, 4]))
    k = draw(st.integers(1, n_experts))
    # A capacity that is not a whole number of experts too: the spare rows stay unused.
    capacity = draw(st.integers(0, n_experts * expert_ffn + 2))
    policy = draw(st.sampled_from(["lru", "lfu"]))
    window = draw(st.integers(1, 6))
    steps = draw(st.lists(st.sets(st.integers(0, n_experts - 1), min_size=1, max_size=k), min_size=1, max_size=25))
    return n_experts, expert_ffn, capacity, policy, window, [sorted(s) for s in steps]


@settings(max_examples=150, deadline=None)
@given(routings())
def test_expert_cache_keeps_its_invariants(scenario):
    n_experts, f, capacity, policy, window, steps = scenario
    cache = LayerExpertCache(capacity, n_experts * f, f, policy, window)
    rows = np.full((capacity, 2), -1, np.int64)  # a host copy of the buffer: row r holds neuron rows[r]
    last_use = {}
    for t, experts in enumerate(steps):
        needed = (np.asarray(experts)[:, None] * f + np.arange(f)).reshape(-1)
        before = set(cache.experts.tolist())
        up = cache.step(needed)
        cache.check_invariants()
        after = set(cache.experts.tolist())
        # No moves: experts are loaded into whole slots, in place.
        assert up.n_moves == 0 and len(up.load_ids) == len(up.load_slots)
        # Every needed neuron is cached or streamed, never both; reads are ascending, loads first.
        cached_now = cache.slot_of[needed] >= 0
        assert np.all(cached_now ^ np.isin(needed, up.scratch_ids))
        assert np.all(np.diff(up.read_ids) > 0)
        assert up.hits == sum(e in before for e in experts) * f
        # A routed expert is never evicted; streaming happens only when every slot holds a routed one.
        assert not (set(experts) & before) - after
        if len(up.scratch_ids):
            assert len(after) == cache.n_slots and after <= set(experts)
        evicted = before - after
        assert up.evicted == len(evicted) * f
        if policy == "lru":  # the evicted were used no later than any unrouted survivor
            for e in evicted:
                assert all(last_use[e] <= last_use[s] for s in after - set(experts))
        for e in experts:
            last_use[e] = t
        # Row contents follow the ids (the update applied as the engine's scatter applies it).
        rows[up.load_slots, 0] = up.load_ids
        np.testing.assert_array_equal(rows[:cache.count, 0], cache.ids[:cache.count])


def test_lru_and_lfu_evict_differently():
    f = 2
    needed = lambda *experts: (np.asarray(experts)[:, None] * f + np.arange(f)).reshape(-1)
    lru, lfu = (LayerExpertCache(2 * f, 4 * f, f, policy, window=8) for policy in ("lru", "lfu"))
    for cache in (lru, lfu):
        for experts in [(0,), (0,), (0,), (1,), (2,)]:  # expert 0 is hot but least recent when 2 arrives
            cache.step(needed(*experts))
    assert set(lru.experts) == {1, 2}  # LRU dropped 0
    assert set(lfu.experts) == {0, 2}  # LFU kept the hot one


def test_expert_cache_with_no_slot_streams_everything():
    cache = LayerExpertCache(EXPERT_FFN - 1, N_EXPERTS * EXPERT_FFN, EXPERT_FFN)
    up = cache.step(np.arange(EXPERT_FFN, 3 * EXPERT_FFN))
    assert cache.n_slots == 0 and cache.count == 0 and len(up.scratch_ids) == 2 * EXPERT_FFN


# ---- tiny models, flash against dense -------------------------------------------------------------

def build_tiny_moe(name: str, directory) -> None:
    """test_moe_parity's tiny model (peaked attention, a decisive router) with a third layer, so the
    next-layer guess runs between two layers that have one."""
    build_moe(name, directory, num_hidden_layers=3)


@pytest.fixture(scope="module", params=sorted(MOE_TINY))
def tiny_moe_flash(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-" + request.param)
    build_tiny_moe(request.param, root / "hf")
    convert(str(root / "hf"), str(root / "flash"), dtype="float32", progress=False)
    return request.param, str(root / "flash")


def budget_for_experts(path, slots: int) -> int:
    """A budget whose caches hold `slots` experts per layer on top of the minimum (float32 rows, or
    quantized records as stored)."""
    manifest = read_manifest(path)
    cfg, quantized = manifest.config, manifest.dtype in ("q8", "q4")
    row = manifest.layout.record_width * (manifest.np_dtype.itemsize if quantized else 4)
    return minimum_budget(path) + slots * cfg.n_layers * cfg.expert_ffn * row


@pytest.mark.parametrize("sparsity,slots", [("naive", None), ("hybrid", "all"), ("hybrid", 5), ("hybrid", 1),
                                            ("hybrid", 0)])
def test_flash_experts_equal_dense(tiny_moe_flash, sparsity, slots):
    name, path = tiny_moe_flash
    dense = flashjax.load(path, progress=False)
    ids = [int(i) for i in np.random.RandomState(5).randint(0, dense.config.vocab_size, N_TOKENS)]
    expected = stepwise_logits(dense, ids, PROMPT)
    budget = None if slots in (None, "all") else budget_for_experts(path, slots)
    llm = flashjax.load(path, sparsity=sparsity, memory_budget=budget, scratch_rows=16)
    try:
        ours = stepwise_logits(llm, ids, PROMPT)
        stats = llm.runner.stats()
    finally:
        llm.runner.close()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL * np.abs(expected).max(),
                               err_msg=f"{name} {sparsity} {slots}")
    cfg = dense.config
    assert llm.runner.plan.cache_rows_per_layer == (
        0 if sparsity == "naive" else cfg.d_ffn if slots == "all" else slots * cfg.expert_ffn)
    assert stats["experts_routed_per_token"] == cfg.n_layers * cfg.experts_per_token
    # The next layer's router, applied early, guesses some of its experts (not all: it is a guess).
    assert 0 < stats["expert_guess_precision"] <= 1 and 0 < stats["expert_guess_recall"] <= 1
    record = read_manifest(path).layout.record_width * 4
    routed_bytes = cfg.n_layers * cfg.experts_per_token * cfg.expert_ffn * record
    if slots == "all":
        assert stats["cache_hit_rate"] > 0.3 and stats["bytes_read_per_token"] < routed_bytes
    if slots == 0 or sparsity == "naive":
        # Every routed expert read every token, plus the wrong guesses, nothing else.
        assert stats["cache_hit_rate"] == 0
        assert routed_bytes <= stats["bytes_read_per_token"] <= 2 * routed_bytes


def test_routing_differs_across_tokens(tiny_moe_flash):
    """The tiny models route different tokens to different experts, so a routing mistake shows."""
    name, path = tiny_moe_flash
    llm = flashjax.load(path, sparsity="naive", scratch_rows=16)
    seen = set()
    original = llm.runner._expert_neurons
    llm.runner._expert_neurons = lambda experts: (seen.add(tuple(experts)), original(experts))[1]
    try:
        list(llm.generate_ids(list(range(3, 3 + PROMPT)), max_tokens=8, stop_at_eos=False))
    finally:
        llm.runner.close()
    assert len(seen) >= 4, f"{name}: routing chose only {seen}"


def test_quantized_experts_stream_as_dense(tmp_path):
    """q8 and q4 records: the same quantized weights on both paths, so the tokens must be equal."""
    build_tiny_moe("olmoe", tmp_path / "hf")
    prompt = [5, 9, 31, 7, 64, 2]
    for quant in ("q8", "q4"):
        out = str(tmp_path / quant)
        convert(str(tmp_path / "hf"), out, quant=quant, progress=False)
        dense = list(flashjax.load(out).generate_ids(prompt, max_tokens=12, stop_at_eos=False))
        flash = flashjax.load(out, sparsity="hybrid", memory_budget=budget_for_experts(out, 3), scratch_rows=16)
        try:
            assert list(flash.generate_ids(prompt, max_tokens=12, stop_at_eos=False)) == dense, quant
        finally:
            flash.runner.close()


def test_damaged_expert_is_named(tmp_path):
    build_tiny_moe("mixtral", tmp_path / "hf")
    out = tmp_path / "flash"
    convert(str(tmp_path / "hf"), str(out), dtype="float32", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["layers"][1]["expert_sha256"]) == N_EXPERTS
    # Flip bytes inside expert 5 of layer 1: its records are rows 5*F.. of the layer's one array.
    shard = [os.path.join(d, f) for d, _, fs in os.walk(out / "ffn" / "layer_001") for f in fs if f != "zarr.json"]
    assert len(shard) == 1
    record = read_manifest(str(out)).layout.record_width * 4
    with open(shard[0], "r+b") as f:
        f.seek(5 * EXPERT_FFN * record + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(StoreChecksumError, match=r"layer 1: damaged: experts 5$"):
        flashjax.load(str(out), sparsity="hybrid")


def test_sparsity_modes_that_need_neuron_choices_are_refused(tiny_moe_flash):
    _, path = tiny_moe_flash
    with pytest.raises(ValueError, match="not available for mixture-of-experts"):
        flashjax.load(path, sparsity="oracle")
