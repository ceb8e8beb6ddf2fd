"""The flash engine's neuron reader: every read the runner needs, issued as early as it is known.

Two ways in. When a token's neuron sets are known before it starts (naive, hybrid, oracle, the
prefill), `submit` hands every layer's ids to the prefetch thread at once and `next_layer` takes
each layer's records in order. When a layer's set is chosen from its own input (predictor, gate),
`expect` starts layer l+1's predicted reads while layer l computes (lookahead), and `take` returns
layer l's records: those the lookahead already holds, the rest read now. Only bytes move here; no
model code runs.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from flashjax.flash.prefetch import Prefetcher
from flashjax.flash.stats import TokenStats


@dataclasses.dataclass
class Lookahead:
    """Reads started for `layer` from the previous layer's input."""

    layer: int
    read_ids: np.ndarray  # the neurons being read (whole blocks of the predicted ones the caches lack)
    pending: object  # the store's async read of read_ids
    predicted: np.ndarray  # the neuron ids the lookahead predicted (the layer uses them too)


class NeuronReader:
    def __init__(self, store, prefetch_depth: int):
        self.store = store
        self.prefetcher = Prefetcher(store, prefetch_depth)
        self.lookahead: Lookahead | None = None

    # ---- whole-token plans --------------------------------------------------------------------

    def submit(self, read_ids_per_layer: list[np.ndarray]) -> None:
        for layer, ids in enumerate(read_ids_per_layer):
            self.prefetcher.submit(layer, ids)

    def next_layer(self, stats: TokenStats) -> np.ndarray:
        """The records of the oldest submitted layer, waiting for them if needed."""
        _, rows, read, waited = self.prefetcher.get()
        stats.io_wait_ms += waited * 1e3
        stats.count_read(read)
        return rows

    # ---- per-layer choices with lookahead -----------------------------------------------------

    def predicted_for(self, layer: int) -> np.ndarray | None:
        """What the lookahead predicted for `layer`, if it ran for this layer."""
        return self.lookahead.predicted if self.lookahead is not None and self.lookahead.layer == layer else None

    def expect(self, layer: int, read_ids: np.ndarray, predicted: np.ndarray) -> None:
        """Starts reading `read_ids` of `layer` now; `take(layer, ...)` will use them."""
        self.lookahead = Lookahead(layer, read_ids, self.store.read_neurons_async(layer, read_ids), predicted)

    def take(self, layer: int, read_ids: np.ndarray, stats: TokenStats) -> np.ndarray:
        """Records of `read_ids` for `layer`: those the lookahead already fetched, the rest read now."""
        t0 = time.perf_counter()
        ahead, self.lookahead = (self.lookahead if self.predicted_for(layer) is not None else None), None
        have = np.zeros(0, np.int64) if ahead is None else ahead.read_ids
        if ahead is not None:
            have_rows = ahead.pending.result()
            stats.count_read(ahead.pending)
            stats.ahead_read += len(have)
        fetched = np.isin(read_ids, have)
        stats.ahead_used += int(fetched.sum())
        stats.missing += len(read_ids)
        rest = read_ids[~fetched]
        rows = np.empty((len(read_ids), self.store.record_width), self.store.dtype)
        if len(rest):
            pending = self.store.read_neurons_async(layer, rest)
            rows[~fetched] = pending.result()
            stats.count_read(pending)
        if fetched.any():
            rows[fetched] = have_rows[np.searchsorted(have, read_ids[fetched])]
        stats.io_wait_ms += (time.perf_counter() - t0) * 1e3
        return rows

    def close(self) -> None:
        self.prefetcher.close()
