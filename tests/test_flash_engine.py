"""The flash engine: FFN neurons read from disk equal the dense engine, within the memory budget."""

import pytest

from conftest import build_tiny, calibrated_copy, drain_tokens, random_ids

import flashjax
from flashjax.flash.budget import BudgetTooSmallError, parse_budget
from flashjax.sampling import SamplingParams
from flashjax.store import convert


@pytest.fixture(scope="module", params=["llama_gqa", "opt"])
def tiny_flash(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("flash-" + request.param)
    build_tiny(request.param, root / "hf")
    convert(str(root / "hf"), str(root / "flash"), dtype="float32", progress=False)
    return request.param, str(root / "flash")


# Budgets as (share of the full neuron caches on top of the minimum); None: unlimited.
@pytest.mark.parametrize("sparsity,cache_share", [("naive", None), ("hybrid", 0.5), ("oracle", None),
                                                  ("oracle", 0.3), ("oracle", 0.0)])
def test_flash_tokens_equal_dense(tiny_flash, sparsity, cache_share):
    name, path = tiny_flash
    dense = flashjax.load(path, progress=False)
    prompt = random_ids(6, dense.config.vocab_size, seed=5)
    expected, _ = drain_tokens(dense, prompt)
    budget = None
    if cache_share is not None:  # 0.0: the smallest budget that works, no cache at all, everything streams
        cfg = dense.config
        budget = _minimum_budget(path) + int(cache_share * cfg.n_layers * cfg.d_ffn * _row_bytes(path))
    llm = flashjax.load(path, sparsity=sparsity, memory_budget=budget, window=2, scratch_rows=16)
    ours, stats = drain_tokens(llm, prompt)
    assert ours == expected
    assert stats["weights_bytes"] <= stats["memory_budget_bytes"]
    for key in ("io_ms", "memory_management_ms", "compute_ms", "bytes_read_per_token", "neurons_read_per_token",
                "evicted_per_token", "cache_hit_rate"):
        assert key in stats
    if sparsity == "naive":
        assert stats["bytes_read_per_token"] >= stats["ffn_bytes"]  # whole blocks: the last may be padded


def _row_bytes(path):
    from flashjax.store import read_manifest
    return read_manifest(path).layout.record_width * 4  # float32 compute


def _minimum_budget(path):
    with pytest.raises(BudgetTooSmallError, match=r"the minimum is [\d.]+ MB \((\d+) bytes") as info:
        flashjax.load(path, sparsity="oracle", memory_budget=1, scratch_rows=16)
    import re
    return int(re.search(r"\((\d+) bytes", str(info.value)).group(1))


def test_no_recompile_per_token_in_the_sparse_path(tiny_flash):
    name, path = tiny_flash
    budget = _minimum_budget(path) + 20 * llm_rows(path)
    llm = flashjax.load(path, sparsity="oracle", memory_budget=budget, window=3, scratch_rows=16)
    prompt = random_ids(6, llm.config.vocab_size, seed=8)
    drain_tokens(llm, prompt, n=4)
    warm = llm.runner.compile_count()
    drain_tokens(llm, random_ids(7, llm.config.vocab_size, seed=9), n=30)
    assert llm.runner.compile_count() == warm
    drain_tokens(llm, prompt, n=3, sampling=SamplingParams(temperature=0.9, top_k=5, seed=3))
    warm_sampling = llm.runner.compile_count()  # the head's sampling variants, once
    drain_tokens(llm, prompt, n=30, sampling=SamplingParams(temperature=1.2, top_p=0.8, seed=4))
    assert llm.runner.compile_count() == warm_sampling


def llm_rows(path):
    from flashjax.store import read_manifest
    return read_manifest(path).config.n_layers * _row_bytes(path)


def test_budget_parsing():
    assert parse_budget("300MB", 10) == 300_000_000
    assert parse_budget("2GiB", 10) == 2 * 2**30
    assert parse_budget("50%", 1000) == 500
    assert parse_budget(1234, 10) == 1234
    with pytest.raises(ValueError, match="cannot read memory budget"):
        parse_budget("lots", 10)


def test_sparse_modes_need_a_converted_model(tmp_path):
    directory = tmp_path / "hf"
    build_tiny("llama_gqa", directory)
    with pytest.raises(ValueError, match="flashjax convert"):
        flashjax.load(str(directory), sparsity="naive")


@pytest.mark.slow
def test_default_model_oracle_equals_dense(default_gguf, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("smol") / "flash")
    convert(str(default_gguf), out, progress=False)
    dense = flashjax.load(out, progress=False)
    prompt = dense.tokenizer.encode("The history of the printing press begins")
    expected, _ = drain_tokens(dense, prompt, n=24)
    for sparsity, budget in (("oracle", "50%"), ("naive", None)):
        llm = flashjax.load(out, sparsity=sparsity, memory_budget=budget, verbose=True)
        ours, stats = drain_tokens(llm, prompt, n=24)
        assert ours == expected, sparsity
        assert stats["weights_bytes"] <= stats["memory_budget_bytes"]


def test_predictor_mode_needs_calibration(tiny_flash):
    from flashjax.sparsity import PredictorsError

    name, path = tiny_flash
    with pytest.raises(PredictorsError, match="flashjax calibrate"):
        flashjax.load(path, sparsity="predictor")


def test_predictor_selecting_everything_equals_dense(tiny_flash, tmp_path_factory):
    name, path = tiny_flash
    calibrated = calibrated_copy(path, tmp_path_factory)
    dense = flashjax.load(calibrated, progress=False)
    prompt = random_ids(6, dense.config.vocab_size, seed=11)
    expected, _ = drain_tokens(dense, prompt)
    # A threshold below every sigmoid score selects every neuron: the sparse FFN is the dense one.
    llm = flashjax.load(calibrated, sparsity="predictor", predictor_threshold=-1.0, window=2)
    ours, stats = drain_tokens(llm, prompt)
    assert ours == expected
    assert stats["needed_neurons_per_token"] == dense.config.n_layers * dense.config.d_ffn
    assert stats["lookahead_coverage"] is not None
    # A high threshold selects fewer neurons than that, and a budget defaults to the predictors.
    default = flashjax.load(calibrated, memory_budget="1GB", predictor_threshold=0.9)
    assert default.runner.options.sparsity == "predictor"
    _, s = drain_tokens(default, prompt)
    assert s["needed_neurons_per_token"] < dense.config.n_layers * dense.config.d_ffn


def test_gate_path_with_nothing_dropped_equals_dense(tiny_flash, tmp_path_factory):
    name, path = tiny_flash
    if name == "opt":
        pytest.skip("the gate path is for SwiGLU models")
    calibrated = calibrated_copy(path, tmp_path_factory, kind="gate", target_sparsity=0.0)
    dense = flashjax.load(calibrated, progress=False)
    prompt = random_ids(6, dense.config.vocab_size, seed=12)
    expected, _ = drain_tokens(dense, prompt)
    llm = flashjax.load(calibrated, sparsity="gate")
    ours, stats = drain_tokens(llm, prompt)
    assert ours == expected


def test_tight_budget_holds_weights_in_the_storage_dtype(tmp_path):
    """A budget that cannot hold every neuron in float32 keeps the cached rows, then the resident
    weights, in float16 (as stored) and converts them as they are multiplied: the values are the
    stored ones either way, so the tokens equal the dense run of the same converted model."""
    build_tiny("llama_gqa", tmp_path / "hf")
    path = str(tmp_path / "flash")
    convert(str(tmp_path / "hf"), path, dtype="float16", progress=False)
    dense = flashjax.load(path)
    prompt = random_ids(6, dense.config.vocab_size, seed=31)
    expected, _ = drain_tokens(dense, prompt)
    wide = flashjax.load(path, sparsity="hybrid", memory_budget="1GB", scratch_rows=16)
    assert (wide.runner.stats()["resident_dtype"], wide.runner.stats()["cache_dtype"]) == ("float32", "float32")
    narrow_plan = flashjax.load(path, sparsity="hybrid", memory_budget="1GB", scratch_rows=16,
                                resident_dtype="storage", cache_dtype="storage").runner.plan
    # Room for every neuron only when both are held as stored.
    budget = narrow_plan.resident_bytes + narrow_plan.scratch_bytes + narrow_plan.io_buffer_bytes + narrow_plan.cache_bytes
    llm = flashjax.load(path, sparsity="hybrid", memory_budget=budget, scratch_rows=16)
    ours, stats = drain_tokens(llm, prompt)
    assert (stats["resident_dtype"], stats["cache_dtype"]) == ("as stored", "float16")
    assert stats["cache_rows_per_layer"] == dense.config.d_ffn
    assert stats["weights_bytes"] <= budget
    assert ours == expected
    # Fixed choices are honoured; the float32 cache then holds fewer rows in the same budget.
    fixed = flashjax.load(path, sparsity="hybrid", memory_budget=budget, scratch_rows=16, resident_dtype="storage",
                          cache_dtype="compute")
    assert fixed.runner.plan.cache_rows_per_layer < dense.config.d_ffn
    assert drain_tokens(fixed, prompt)[0] == expected
    with pytest.raises(ValueError, match="cache_dtype"):
        flashjax.load(path, sparsity="hybrid", cache_dtype="int4")
