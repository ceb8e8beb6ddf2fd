"""What each process read: a wrapper around a flash runner's FFN store."""

from __future__ import annotations

import threading

import numpy as np


class ReadLedger:
    """Wraps a flash runner's FFN store: the blocks of neurons read per layer, and their bytes."""

    def __init__(self, store, n_layers: int, d_ffn: int, block: int):
        self._store, self.d_ffn, self.block = store, d_ffn, block
        self.blocks = np.zeros((n_layers, -(-d_ffn // block)), bool)
        self.bytes = self.neurons = 0
        self._lock = threading.Lock()

    def read_neurons_async(self, layer: int, ids):
        pending = self._store.read_neurons_async(layer, ids)
        ids = np.asarray(ids, np.int64)
        with self._lock:
            self.blocks[layer, np.unique(ids // self.block)] = True
            self.bytes += pending.stats.bytes
            self.neurons += pending.stats.neurons
        return pending

    read_blocks_async = read_neurons_async

    def __getattr__(self, name):
        return getattr(self._store, name)

    def ranges(self, layer: int) -> list[list[int]]:
        """Layer's neurons read, as [begin, end) runs of whole blocks."""
        have = np.flatnonzero(self.blocks[layer])
        if not len(have):
            return []
        breaks = np.flatnonzero(np.diff(have) > 1)
        starts, ends = have[np.r_[0, breaks + 1]], have[np.r_[breaks, len(have) - 1]] + 1
        return [[int(a * self.block), int(min(b * self.block, self.d_ffn))] for a, b in zip(starts, ends)]

    def summary(self) -> dict:
        return {"bytes_read": int(self.bytes), "neurons_read": int(self.neurons),
                "read_ranges": [self.ranges(l) for l in range(self.blocks.shape[0])]}


def track_reads(runner) -> ReadLedger | None:
    """Puts a `ReadLedger` between a flash runner and its store (None for the dense engine)."""
    if not hasattr(runner, "reader"):
        return None
    ledger = ReadLedger(runner.store, runner.cfg.n_layers, runner.cfg.d_ffn, runner.store.ffn_block)
    runner.store = runner.reader.store = runner.reader.prefetcher.store = ledger
    runner.read_ledger = ledger
    return ledger
