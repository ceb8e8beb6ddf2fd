"""The host RAM tier: exactly FFNStore's rows, disk reads only for blocks it lacks, its capacity and
LRU order, sizing from a budget, and reads from several threads at once."""

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import build_tiny
from flashjax.store import FFNStore, HostTierStore, convert, wrap_host_tier


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """ffn_block -> (converted OPT directory, every layer's records read by FFNStore). d_ffn = 96:
    blocks of 8 divide it, blocks of 40 leave a short last block of 16."""
    root = tmp_path_factory.mktemp("host_tier")
    build_tiny("opt", root / "src")
    out = {}
    for block in (8, 40):
        path = root / f"flash_{block}"
        convert(root / "src", path, dtype="float16", progress=False, ffn_block=block)
        store = FFNStore(path)
        out[block] = path, [store.read_layer(i) for i in range(store.n_layers)]
    return out


def _tier(models, block, blocks_per_layer=None):
    """A fresh tier over a fresh store; `blocks_per_layer=None` holds everything."""
    path, records = models[block]
    store = FFNStore(path)
    budget = "100%" if blocks_per_layer is None else blocks_per_layer * block * store.record_nbytes * store.n_layers
    return wrap_host_tier(store, budget), records


def _random_ids(rng, d_ffn):
    n = rng.choice([1, 3, 10, 40, d_ffn])
    return np.sort(rng.choice(d_ffn, size=min(n, d_ffn), replace=False))


def _check_invariants(tier):
    for cache in tier._layers:
        held = cache.block_of_slot[cache.block_of_slot >= 0]
        assert len(held) <= tier.capacity_blocks and len(np.unique(held)) == len(held)  # never twice
        assert np.array_equal(np.flatnonzero(cache.slot_of_block >= 0), np.sort(held))
        assert np.all(cache.block_of_slot[cache.slot_of_block[held]] == held)


@pytest.mark.parametrize("block", [8, 40])
@pytest.mark.parametrize("blocks_per_layer", [1, 2, 3, None])
def test_rows_are_exactly_the_stores(models, block, blocks_per_layer):
    tier, records = _tier(models, block, blocks_per_layer)
    rng = np.random.default_rng(block * 10 + (blocks_per_layer or 0))
    for _ in range(80):
        layer, ids = rng.integers(tier.n_layers), _random_ids(rng, tier.d_ffn)
        pending = tier.read_neurons_async(layer, ids)
        rows = pending.result()
        assert rows.shape == (len(ids), tier.record_width) and rows.dtype == tier.dtype
        np.testing.assert_array_equal(rows, records[layer][ids])
        blocks = len(np.unique(ids // block))
        assert pending.host_hits + pending.stats.neurons >= len(ids)
        assert pending.stats.bytes <= blocks * block * tier.record_nbytes
        _check_invariants(tier)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_rows_are_exactly_the_stores_any_ids(models, data):
    block = data.draw(st.sampled_from([8, 40]))
    tier, records = _tier(models, block, data.draw(st.sampled_from([1, 2, None])))
    for _ in range(data.draw(st.integers(1, 4))):
        layer = data.draw(st.integers(0, tier.n_layers - 1))
        ids = np.array(sorted(data.draw(st.sets(st.integers(0, tier.d_ffn - 1), max_size=tier.d_ffn))), np.int64)
        np.testing.assert_array_equal(tier.read_neurons(layer, ids), records[layer][ids])
    _check_invariants(tier)


def test_repeated_reads_come_from_host_ram(models):
    tier, records = _tier(models, 8)
    ids = np.array([1, 5, 17, 40, 41, 95])
    first = tier.read_neurons_async(1, ids)
    np.testing.assert_array_equal(first.result(), records[1][ids])
    assert first.host_hits == 0 and first.stats.bytes == 4 * 8 * tier.record_nbytes and first.stats.neurons == 32
    again = tier.read_neurons_async(1, ids)
    np.testing.assert_array_equal(again.result(), records[1][ids])
    assert again.stats.bytes == 0 and again.stats.calls == 0 and again.host_hits == len(ids)
    # Another id of a block already held is served from host RAM too; a new block is read alone.
    mixed = tier.read_neurons_async(1, np.array([2, 60]))
    np.testing.assert_array_equal(mixed.result(), records[1][[2, 60]])
    assert mixed.host_hits == 1 and mixed.stats.bytes == 8 * tier.record_nbytes
    assert tier.take_stats().bytes == 5 * 8 * tier.record_nbytes and tier.stats.bytes == 0
    assert tier.tier_stats()["host_hits"] == len(ids) + 1 and tier.tier_stats()["disk_neurons"] == 40


def test_capacity_and_lru_order(models):
    tier, records = _tier(models, 8, blocks_per_layer=3)
    assert tier.capacity_blocks == 3 and tier.nbytes == tier.n_layers * 3 * 8 * tier.record_nbytes

    def read(*blocks):
        ids = np.array(blocks) * 8 + 3
        pending = tier.read_neurons_async(0, ids)
        np.testing.assert_array_equal(pending.result(), records[0][ids])
        _check_invariants(tier)
        return pending.stats.chunks

    assert [read(0), read(1), read(2)] == [1, 1, 1]
    assert read(0) == 0  # a hit makes block 0 the most recent
    assert read(3) == 1 and list(tier.held_blocks(0)) == [0, 2, 3]  # 1 was the least recent
    assert read(1) == 1 and list(tier.held_blocks(0)) == [0, 1, 3]
    assert read(0, 1, 3) == 0
    assert list(tier.held_blocks(1)) == []  # the other layer's blocks are its own
    # A read of more blocks than fit answers all of them and keeps only as many as fit.
    np.testing.assert_array_equal(tier.read_layer(0), records[0])
    assert len(tier.held_blocks(0)) == 3
    stats = tier.tier_stats()
    assert stats["blocks_held"] == 3 and stats["capacity_blocks"] == 3 * tier.n_layers and stats["evicted_blocks"] == 5
    tier.clear()
    assert tier.tier_stats()["blocks_held"] == 0 and read(0) == 1


@pytest.mark.parametrize("block", [8, 40])
def test_whole_model_holds_everything_after_one_pass(models, block):
    tier, records = _tier(models, block)
    assert tier.capacity_blocks == tier.blocks_per_layer == -(-tier.d_ffn // block)
    for layer in range(tier.n_layers):
        np.testing.assert_array_equal(tier.read_layer(layer), records[layer])
    tier.take_stats()
    rng = np.random.default_rng(1)
    for _ in range(30):
        layer, ids = rng.integers(tier.n_layers), _random_ids(rng, tier.d_ffn)
        pending = tier.read_neurons_async(layer, ids)
        np.testing.assert_array_equal(pending.result(), records[layer][ids])
        assert pending.stats.bytes == 0 and pending.host_hits == len(ids)
    assert tier.take_stats().bytes == 0
    assert tier.tier_stats()["blocks_held"] == tier.n_layers * tier.blocks_per_layer


def test_sizing_from_a_budget(models):
    path, _ = models[8]
    store = FFNStore(path)
    assert wrap_host_tier(store, None) is store
    block_bytes = 8 * store.record_nbytes
    minimum = store.n_layers * block_bytes
    with pytest.raises(ValueError, match=f"{minimum} bytes"):
        wrap_host_tier(store, minimum - 1)
    with pytest.raises(ValueError, match=f"{minimum} bytes"):
        HostTierStore(store, 0)
    assert wrap_host_tier(store, minimum).capacity_blocks == 1
    assert wrap_host_tier(store, minimum * 5 + block_bytes).capacity_blocks == 5  # whole blocks, evenly
    disk = store.n_layers * store.d_ffn * store.record_nbytes
    assert wrap_host_tier(store, "50%").capacity_blocks == 6
    assert wrap_host_tier(store, "25%").capacity_blocks == 3
    for big in ("2GB", "512MiB", "100%", "400%", 10 * disk):
        tier = wrap_host_tier(store, big)
        assert tier.capacity_blocks == 12 and tier.nbytes == disk  # never more than the whole model
    with pytest.raises(ValueError, match="cannot read"):
        wrap_host_tier(store, "lots")


def test_short_last_block_sizing(models):
    # d_ffn = 96 in blocks of 40: a whole layer is 96 records, held in 3 blocks (120 rows).
    path, _ = models[40]
    store = FFNStore(path)
    assert wrap_host_tier(store, "100%").nbytes == store.n_layers * 120 * store.record_nbytes
    assert wrap_host_tier(store, "99%").capacity_blocks == 2


def test_reads_from_several_threads(models):
    tier, records = _tier(models, 8, blocks_per_layer=2)  # small: threads evict each other's blocks
    errors = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        try:
            for _ in range(60):
                reads = [(layer := int(rng.integers(tier.n_layers)), ids := _random_ids(rng, tier.d_ffn),
                          tier.read_neurons_async(layer, ids)) for _ in range(rng.integers(1, 4))]
                for layer, ids, pending in reads:  # several in flight before any is waited on
                    np.testing.assert_array_equal(pending.result(), records[layer][ids])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    _check_invariants(tier)


def test_same_blocks_read_twice_at_once_are_kept_once(models):
    tier, records = _tier(models, 8, blocks_per_layer=4)
    ids = np.array([3, 11, 20])
    first, second = tier.read_neurons_async(0, ids), tier.read_neurons_async(0, ids)  # both miss
    assert first.stats.chunks == second.stats.chunks == 3
    for pending in (second, first):
        np.testing.assert_array_equal(pending.result(), records[0][ids])
        np.testing.assert_array_equal(pending.result(), records[0][ids])  # result() may be asked again
    _check_invariants(tier)
    assert list(tier.held_blocks(0)) == [0, 1, 2]


def test_empty_ids_and_the_store_interface(models):
    tier, records = _tier(models, 8, blocks_per_layer=2)
    store = tier._store
    for name in ("layout", "record_width", "ffn_block", "dtype", "record_nbytes", "d_ffn", "n_layers",
                 "model_dir", "manifest"):
        assert getattr(tier, name) == getattr(store, name), name
    pending = tier.read_neurons_async(1, np.array([], np.int64))
    assert pending.done() and pending.host_hits == 0 and pending.stats.bytes == 0
    rows = pending.result()
    assert rows.shape == (0, tier.record_width) and rows.dtype == tier.dtype
    assert tier.read_neurons(0, []).shape == (0, tier.record_width)
    for bad in ([3, 2], [1, 1], [-1], [tier.d_ffn]):
        with pytest.raises(ValueError, match="sorted, unique"):
            tier.read_neurons(0, np.array(bad))
    with pytest.raises(IndexError):
        tier.read_neurons(tier.n_layers, np.array([0]))
    tier.read_neurons_async(1, np.array([0, 50]))  # never waited on: nothing kept, nothing held up
    np.testing.assert_array_equal(tier.read_neurons(1, np.array([0, 50])), records[1][[0, 50]])
    tier.evict_page_cache()
    np.testing.assert_array_equal(tier.read_neurons(1, np.array([0, 50])), records[1][[0, 50]])  # still held
    tier.verify()
    assert tier.read_blocks_async(0, np.array([7])).result().shape == (1, tier.record_width)
