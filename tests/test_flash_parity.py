"""Flash engine == dense engine on every tiny architecture, compared by logits, not only tokens.

A tiny random model often repeats one token, so equal greedy tokens prove little: each decode step's
full logits from the flash engine (naive, hybrid under a budget that makes it cache, evict and
stream, oracle selecting every neuron) must equal the dense engine's to 1e-5 in float32. This is
what catches an FFN term that one path forgets (issue 10: `b_gate` on Llama with mlp_bias).
"""

import re

import jax
import numpy as np
import pytest

from conftest import TINY, build_tiny, random_ids

import flashjax
from flashjax.flash.budget import BudgetTooSmallError
from flashjax.sampling import SamplingParams
from flashjax.store import convert, read_manifest

TOL = 1e-5
N_TOKENS = 20
PROMPT = 5


@pytest.fixture(scope="module", params=sorted(TINY))
def tiny_flash32(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity-" + request.param)
    build_tiny(request.param, root / "hf")
    convert(str(root / "hf"), str(root / "flash"), dtype="float32", progress=False)
    return request.param, str(root / "flash")


def stepwise_logits(llm, ids, prompt: int = PROMPT) -> np.ndarray:
    """Logits [len(ids) - prompt + 1, V]: after prefilling ids[:prompt], then after each decode step."""
    runner, sampling, key = llm.runner, SamplingParams(), jax.random.PRNGKey(0)
    runner.start(64)
    _, logits = runner.prefill(ids[:prompt], sampling, key)
    out = [np.asarray(logits[0])]
    for pos in range(prompt, len(ids)):
        _, logits = runner.decode(np.array([ids[pos]], np.int32), pos, sampling, key)
        out.append(np.asarray(logits[0]))
    return np.stack(out)


def minimum_budget(path, **options) -> int:
    """The smallest budget of a mode (hybrid unless `options` say otherwise): resident weights (the
    predictors or gate rows included), scratch and read buffers, nothing cached."""
    options = {"sparsity": "hybrid", **options}
    with pytest.raises(BudgetTooSmallError, match=r"the minimum is") as info:
        flashjax.load(path, memory_budget=1, scratch_rows=16, **options)
    return int(re.search(r"\((\d+) bytes", str(info.value)).group(1))


def budget_for_share(path, share: float) -> int:
    """A budget holding `share` of every layer's neurons in the cache on top of the minimum."""
    manifest = read_manifest(path)
    cfg = manifest.config
    return minimum_budget(path) + int(share * cfg.n_layers * cfg.d_ffn * manifest.layout.record_width * 4)


@pytest.mark.parametrize("sparsity,share", [("naive", None), ("hybrid", 0.4), ("oracle", None), ("oracle", 0.3)])
def test_flash_logits_equal_dense(tiny_flash32, sparsity, share):
    name, path = tiny_flash32
    dense = flashjax.load(path, progress=False)
    ids = random_ids(N_TOKENS, dense.config.vocab_size, seed=21)
    expected = stepwise_logits(dense, ids)
    budget = None if share is None else budget_for_share(path, share)
    # The oracle keeps |activation| > -1: every neuron, so its result must equal dense exactly.
    extra = {"threshold": -1.0} if sparsity == "oracle" else {}
    llm = flashjax.load(path, sparsity=sparsity, memory_budget=budget, window=2, scratch_rows=16, **extra)
    try:
        ours = stepwise_logits(llm, ids)
        stats = llm.runner.stats()
    finally:
        llm.runner.close()
    np.testing.assert_allclose(ours, expected, rtol=0, atol=TOL, err_msg=f"{name} {sparsity} budget={budget}")
    if budget is not None:
        # The budget really made the engine stream: not every neuron fit in the cache.
        assert stats["bytes_read_per_token"] > 0


def test_parity_catches_a_missing_ffn_term(tmp_path):
    """The comparison above is sharp enough to see a dropped gate bias (the issue-10 defect)."""
    from flashjax.model import layers

    build_tiny("llama3_rope", tmp_path / "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "flash"), dtype="float32", progress=False)
    path = str(tmp_path / "flash")
    dense = flashjax.load(path, progress=False)
    ids = random_ids(N_TOKENS, dense.config.vocab_size, seed=21)
    expected = stepwise_logits(dense, ids)
    llm = flashjax.load(path, sparsity="naive", scratch_rows=16)
    original = layers.ffn_over_neurons

    def without_gate_bias(cfg, h, neurons, **kw):
        return original(cfg, h, {k: v for k, v in neurons.items() if k != "b_gate"}, **kw)

    try:
        from flashjax.flash import kernels
        kernels.ffn_over_neurons = without_gate_bias
        jax.clear_caches()
        ours = stepwise_logits(llm, ids)
    finally:
        kernels.ffn_over_neurons = original
        jax.clear_caches()
        llm.runner.close()
    assert np.abs(ours - expected).max() > 100 * TOL
