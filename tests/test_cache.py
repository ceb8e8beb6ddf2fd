"""The per-layer neuron cache: invariants under random sequences, the windowing policy, row contents."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flashjax.flash.neuron_cache import CacheUpdate, LayerNeuronCache

WIDTH = 3


def source_rows(n_neurons: int) -> np.ndarray:
    """Row n is filled with n, so a buffer's contents say which neuron each slot holds."""
    return np.repeat(np.arange(n_neurons, dtype=np.int64)[:, None], WIDTH, axis=1)


class ReferenceCache:
    """The documented policy, written plainly with sets and dicts."""

    def __init__(self, capacity, window):
        self.capacity, self.window, self.t = capacity, window, 0
        self.last = {}  # cached neuron -> last use

    def step(self, needed):
        t = self.t
        hits = [n for n in needed if n in self.last]
        for n in hits:
            self.last[n] = t
        evicted = [n for n, lu in self.last.items() if lu <= t - self.window]
        for n in evicted:
            del self.last[n]
        missing = [n for n in needed if n not in self.last]
        room = self.capacity - len(self.last)
        for n in missing[:room]:
            self.last[n] = t
        self.t += 1
        return len(hits), sorted(evicted), missing[:room], missing[room:]


@st.composite
def scenarios(draw):
    n_neurons = draw(st.integers(1, 40))
    capacity = draw(st.sampled_from([0, 1, 2, 5, n_neurons // 2, max(n_neurons - 1, 0), n_neurons, n_neurons + 7]))
    window = draw(st.sampled_from([1, 2, 3, 5, 1000]))
    max_size = draw(st.sampled_from([1, max(1, n_neurons // 10), max(1, n_neurons // 3), n_neurons]))
    steps = draw(st.lists(st.sets(st.integers(0, n_neurons - 1), max_size=max_size).map(sorted),
                          min_size=1, max_size=25))
    return n_neurons, capacity, window, steps


def check_update(cache: LayerNeuronCache, up: CacheUpdate, needed: np.ndarray, old_ids: np.ndarray):
    old_count = len(old_ids)
    for name in ("moves_src", "moves_dst", "load_ids", "load_slots", "scratch_ids"):
        arr = getattr(up, name)
        assert arr.dtype == np.int32 and arr.ndim == 1, name
    assert up.moves_src.shape == up.moves_dst.shape
    assert up.load_ids.shape == up.load_slots.shape
    new_count = up.count - len(up.load_ids)
    assert cache.count == up.count == old_count - up.evicted + len(up.load_ids)
    # Moves: sources are live tail rows, destinations are holes below the new count; disjoint.
    assert np.all((up.moves_src >= new_count) & (up.moves_src < old_count))
    assert np.all((up.moves_dst >= 0) & (up.moves_dst < new_count))
    assert len(np.unique(up.moves_src)) == len(up.moves_src)
    assert len(np.unique(up.moves_dst)) == len(up.moves_dst)
    assert len(up.moves_src) <= up.evicted
    # Loads are appended contiguously after the surviving rows.
    np.testing.assert_array_equal(up.load_slots, np.arange(new_count, up.count))
    # Every needed id is cached or scratch, never both; scratch only when full.
    cached_now = cache.slot_of[needed] >= 0
    in_scratch = np.isin(needed, up.scratch_ids)
    assert np.all(cached_now ^ in_scratch)
    assert np.all(np.isin(up.scratch_ids, needed)) and np.all(np.isin(up.load_ids, needed))
    if len(up.scratch_ids):
        assert cache.count == cache.capacity
    assert up.hits + len(up.load_ids) + len(up.scratch_ids) == len(needed)
    read = up.read_ids
    assert np.all(np.diff(read) > 0)
    np.testing.assert_array_equal(read, needed[~np.isin(needed, old_ids)])


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_random_sequences_keep_invariants_and_rows(scenario):
    n_neurons, capacity, window, steps = scenario
    cache = LayerNeuronCache(capacity, n_neurons, window)
    ref = ReferenceCache(capacity, window)
    src = source_rows(n_neurons)
    rows = np.full((capacity, WIDTH), -7, np.int64)
    last_use = {}  # neuron -> last step it was needed (cached or not)
    cache.check_invariants()
    for t, needed_list in enumerate(steps):
        needed = np.asarray(needed_list, np.int64)
        old_ids = cache.ids[: cache.count].copy()
        before = set(old_ids.tolist())
        up = cache.step(needed)
        cache.check_invariants()
        check_update(cache, up, needed.astype(np.int32), old_ids)

        # Exactly the documented policy.
        hits, evicted, loaded, scratch = ref.step(needed_list)
        assert up.hits == hits
        assert up.evicted == len(evicted)
        assert up.load_ids.tolist() == loaded
        assert up.scratch_ids.tolist() == scratch
        after = set(cache.ids[: cache.count].tolist())
        assert after == set(ref.last)
        assert sorted(before - after) == evicted

        # Nothing used (while cached) in the last `window` steps was evicted.
        for n in before - after:
            assert last_use.get(n, -10**9) <= t - window, (n, last_use.get(n), t)
        for n in needed_list:
            last_use[n] = t
        for n in after:
            assert t - last_use[n] < window

        # Row contents follow the ids.
        LayerNeuronCache.apply_moves(rows, up, src[up.load_ids])
        live = cache.ids[: cache.count]
        np.testing.assert_array_equal(rows[: cache.count], src[live])


def test_window_keeps_then_evicts_eagerly():
    cache = LayerNeuronCache(capacity=10, n_neurons=20, window=3)
    up0 = cache.step(np.array([4, 7]))
    assert up0.load_ids.tolist() == [4, 7] and up0.hits == 0
    cache.step(np.array([1]))
    up2 = cache.step(np.array([4, 9]))  # 4 was used at t=0, still inside the window of 3
    assert up2.hits == 1 and up2.load_ids.tolist() == [9] and up2.evicted == 0
    assert cache.slot_of[7] >= 0  # used at t=0, window covers t=0..2
    up3 = cache.step(np.array([9]))  # room is plenty: 7 goes anyway (eager), 1 and 4 stay
    assert up3.evicted == 1 and cache.slot_of[7] == -1
    assert set(cache.ids[: cache.count].tolist()) == {1, 4, 9}
    cache.check_invariants()


def test_window_one_keeps_only_the_current_token():
    cache = LayerNeuronCache(capacity=8, n_neurons=8, window=1)
    cache.step(np.array([0, 1, 2]))
    up = cache.step(np.array([2, 3]))
    assert up.hits == 1 and up.evicted == 2 and up.load_ids.tolist() == [3]
    assert sorted(cache.ids[: cache.count].tolist()) == [2, 3]
    cache.check_invariants()


def test_full_window_spills_to_scratch_and_never_evicts_needed():
    cache = LayerNeuronCache(capacity=3, n_neurons=10, window=2)
    cache.step(np.array([0, 1]))
    up = cache.step(np.array([1, 5, 6, 7]))  # 0 is in the window: only one free slot
    assert up.hits == 1 and up.evicted == 0
    assert up.load_ids.tolist() == [5] and up.scratch_ids.tolist() == [6, 7]
    up = cache.step(np.array([1, 6]))  # 0 leaves the window (eagerly), making room for 6; 5 stays
    assert up.evicted == 1 and up.hits == 1 and up.load_ids.tolist() == [6] and len(up.scratch_ids) == 0
    assert up.moves_src.tolist() == [2] and up.moves_dst.tolist() == [0]  # 5 fills 0's hole
    assert cache.ids.tolist() == [5, 1, 6]
    cache.check_invariants()


def test_capacity_zero_is_the_naive_path():
    cache = LayerNeuronCache(capacity=0, n_neurons=5, window=4)
    for _ in range(3):
        up = cache.step(np.array([0, 2, 4]))
        assert up.scratch_ids.tolist() == [0, 2, 4] and up.hits == 0 and len(up.load_ids) == 0
        assert cache.count == 0
    cache.check_invariants()


def test_everything_fits_second_step_loads_nothing():
    cache = LayerNeuronCache(capacity=64, n_neurons=50, window=1)
    needed = np.arange(0, 50, 3)
    first = cache.step(needed)
    assert len(first.load_ids) == len(needed)
    for _ in range(3):
        up = cache.step(needed)
        assert up.hits == len(needed) and len(up.load_ids) == 0 and len(up.scratch_ids) == 0
        assert up.evicted == 0 and up.n_moves == 0


def test_no_reallocation():
    cache = LayerNeuronCache(capacity=16, n_neurons=100, window=2)
    ids, slot_of, last_used = cache.ids, cache.slot_of, cache.last_used
    bases = (ids.base, slot_of.base, last_used.base)
    rng = np.random.default_rng(0)
    for _ in range(50):
        cache.step(np.unique(rng.integers(0, 100, 12)))
        assert cache.ids is ids and cache.slot_of is slot_of and cache.last_used is last_used
        assert (cache.ids.base, cache.slot_of.base, cache.last_used.base) == tuple(bases)
    with pytest.raises(ValueError):
        ids[0] = 3  # read-only to callers


def test_moves_as_one_fused_scatter_in_jax():
    """The engine's path: moves and loads fused into one scatter, as the CacheUpdate docstring allows."""
    n, cap = 30, 12
    cache = LayerNeuronCache(cap, n, window=2)
    src = source_rows(n).astype(np.float32)
    buf = jnp.zeros((cap, WIDTH), jnp.float32)
    rng = np.random.default_rng(1)
    for _ in range(20):
        up = cache.step(np.unique(rng.integers(0, n, 7)))
        slots = np.concatenate([up.moves_dst, up.load_slots])
        vals = jnp.concatenate([buf[up.moves_src], jnp.asarray(src[up.load_ids])])
        buf = buf.at[slots].set(vals)
        np.testing.assert_array_equal(np.asarray(buf)[: cache.count], src[cache.ids[: cache.count]])


def test_reset_and_bad_input():
    cache = LayerNeuronCache(capacity=4, n_neurons=10, window=3)
    cache.step(np.array([1, 2, 3]))
    cache.reset()
    assert cache.count == 0 and cache.steps == 0 and np.all(cache.slot_of == -1)
    cache.check_invariants()
    for bad, exc in [([3, 1], ValueError), ([1, 1], ValueError), ([10], ValueError), ([-1], ValueError),
                     ([[1]], ValueError), ([0.5], TypeError)]:
        with pytest.raises(exc):
            cache.step(np.array(bad))
    assert cache.step(np.array([], np.int64)).hits == 0
    with pytest.raises(ValueError):
        LayerNeuronCache(capacity=2, n_neurons=4, window=0)
    with pytest.raises(ValueError):
        LayerNeuronCache(capacity=-1, n_neurons=4, window=1)


def test_check_invariants_catches_corruption():
    cache = LayerNeuronCache(capacity=4, n_neurons=10, window=3)
    cache.step(np.array([1, 2, 3]))
    cache._ids[1] = 1  # duplicate
    with pytest.raises(AssertionError, match="duplicates"):
        cache.check_invariants()
