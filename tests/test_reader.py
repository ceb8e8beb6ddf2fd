"""The neuron reader against the store: the rows it hands out equal a direct read, the lookahead's
rows are reused, and nothing is read twice."""

import numpy as np
import pytest

from conftest import build_tiny

from flashjax.flash.reader import NeuronReader
from flashjax.flash.stats import TokenStats
from flashjax.store import convert, open_flash_model


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    build_tiny("llama_gqa", root / "hf")
    # One neuron per block, so read counts are neuron counts.
    convert(str(root / "hf"), str(root / "flash"), dtype="float32", progress=False, ffn_block=1)
    return open_flash_model(str(root / "flash")).ffn_store()


def _direct(store, layer, ids):
    return store.read_neurons_async(layer, ids).result()


def test_submitted_layers_come_back_in_order_and_equal_a_direct_read(store):
    reader = NeuronReader(store, prefetch_depth=2)
    plans = [np.array([0, 3, 7, 40]), np.array([1, 2, 95])]
    stats = TokenStats()
    try:
        reader.submit(plans)
        for layer, ids in enumerate(plans):
            np.testing.assert_array_equal(reader.next_layer(stats), _direct(store, layer, ids))
    finally:
        reader.close()
    assert stats.neurons_read == sum(len(ids) for ids in plans)


def test_lookahead_rows_are_reused_and_nothing_is_read_twice(store):
    reader = NeuronReader(store, prefetch_depth=2)
    stats = TokenStats()
    try:
        reader.expect(1, np.array([4, 5, 6, 10]), predicted=np.array([4, 10]))
        assert reader.predicted_for(1).tolist() == [4, 10] and reader.predicted_for(0) is None
        wanted = np.array([2, 5, 10, 11])
        rows = reader.take(1, wanted, stats)
    finally:
        reader.close()
    np.testing.assert_array_equal(rows, _direct(store, 1, wanted))
    # The lookahead read 4 neurons, of which 5 and 10 were wanted; only 2 and 11 were read again.
    assert (stats.ahead_read, stats.ahead_used, stats.missing) == (4, 2, 4)
    assert stats.neurons_read == 4 + 2
    assert reader.lookahead is None  # taken: a later layer never sees stale rows


def test_a_lookahead_for_another_layer_is_not_used(store):
    reader = NeuronReader(store, prefetch_depth=1)
    stats = TokenStats()
    try:
        reader.expect(1, np.array([1, 2]), predicted=np.array([1]))
        rows = reader.take(0, np.array([1, 2]), stats)
    finally:
        reader.close()
    np.testing.assert_array_equal(rows, _direct(store, 0, np.array([1, 2])))
    assert stats.ahead_used == 0 and stats.neurons_read == 2
