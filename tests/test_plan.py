"""The memory plan and the dtype choice, tested without devices (pure functions of sizes)."""

import numpy as np
import pytest

from flashjax.config import ModelConfig
from flashjax.flash.budget import BudgetTooSmallError, choose_dtypes, plan_memory

CFG = ModelConfig(architecture="llama", vocab_size=100, d_model=64, n_layers=4, n_heads=4, n_kv_heads=4,
                  head_dim=16, d_ffn=256, max_position=128)
WIDTH = 3 * 64  # gate + up + down per neuron
RESIDENT = {"float32": 1_000_000, "stored": 500_000}


def _planner(budget):
    def plan_for(resident, cache_dtype):
        return plan_memory(CFG, budget, RESIDENT["float32" if resident == np.float32 else resident], WIDTH,
                           storage_itemsize=2, compute_itemsize=4, scratch_rows=32, prefetch_depth=2,
                           max_cache_rows=CFG.d_ffn, cache_itemsize=np.dtype(cache_dtype).itemsize)
    return plan_for


def _full_bytes(resident, cache_dtype):
    """The memory that holds every neuron's row (an unlimited plan's total)."""
    return _planner(None)(resident, cache_dtype).total_bytes


def test_auto_keeps_the_compute_dtype_while_every_row_fits():
    budget = _full_bytes(np.float32, np.float32)
    resident, cache, plan = choose_dtypes("auto", "auto", np.float32, np.float16, CFG.d_ffn, _planner(budget))
    assert (resident, cache) == (np.float32, np.float32) and plan.cache_rows_per_layer == CFG.d_ffn


def test_auto_narrows_the_cache_then_the_resident_weights():
    # Every row fits only as stored (float16): the cache narrows, resident weights stay float32.
    budget = _full_bytes(np.float32, np.float16)
    resident, cache, plan = choose_dtypes("auto", "auto", np.float32, np.float16, CFG.d_ffn, _planner(budget))
    assert (resident, cache) == (np.float32, np.float16) and plan.cache_rows_per_layer == CFG.d_ffn
    # Less: float32 resident weights no longer fit beside every row; stored ones do.
    resident, cache, plan = choose_dtypes("auto", "auto", np.float32, np.float16, CFG.d_ffn,
                                          _planner(budget - 400_000))
    assert (resident, cache) == ("stored", np.float16) and plan.cache_rows_per_layer == CFG.d_ffn
    # Less still: nothing holds every row, so the pairing with the most rows wins (both narrow).
    small = _full_bytes("stored", np.float16) - CFG.n_layers * 100 * WIDTH * 2
    resident, cache, plan = choose_dtypes("auto", "auto", np.float32, np.float16, CFG.d_ffn, _planner(small))
    assert (resident, cache) == ("stored", np.float16) and plan.cache_rows_per_layer == CFG.d_ffn - 100


def test_fixed_choices_are_taken_as_given():
    budget = _full_bytes(np.float32, np.float32)
    resident, cache, _ = choose_dtypes("storage", "compute", np.float32, np.float16, CFG.d_ffn, _planner(budget))
    assert (resident, cache) == ("stored", np.float32)


def test_a_budget_under_every_minimum_names_the_minimum():
    with pytest.raises(BudgetTooSmallError, match="the minimum is"):
        choose_dtypes("auto", "auto", np.float32, np.float16, CFG.d_ffn, _planner(1000))
