"""A second tier of neuron cache in host RAM, between the device's neuron cache and the disk.

    store = wrap_host_tier(FFNStore("models/opt-flash"), "8GB")    # or "50%", bytes, None (no tier)
    rows = store.read_neurons(3, ids)                              # the same reads as FFNStore's

On a GPU or TPU the scarce fast memory is the device's: the engine's neuron cache there holds
few rows, and every neuron it evicts and needs again costs a disk read. Host RAM is bigger than
device memory (though smaller than the model) and far faster than the disk, so this tier keeps
what the device cache lets go, and the disk is read only for what neither holds.

It caches whole blocks of `ffn_block` neurons, the unit the store reads anyway: a read copies the
blocks it finds out of host RAM, reads the missing ones from the disk in one store read, and keeps
them, evicting the least recently used blocks of that layer. Each layer's blocks live in one array
allocated up front, so the tier's memory is fixed at construction.

Any thread may read; each layer has its own lock. The disk read is issued at once so that a
prefetch thread overlaps it. The blocks found in host RAM are copied out as soon as that read is
issued, while it is in flight, rather than in `result()`: a read of the same layer from another
thread could evict them in between, and pinning them instead would leak for reads never waited
on (the engine drops unused lookahead reads). The blocks read from the disk are kept in `result()`.
"""

from __future__ import annotations

import threading

import numpy as np

from flashjax.flash.budget import BudgetTooSmallError, parse_budget
from flashjax.store.ffn_store import FFNStore, ReadStats, block_neurons, check_neuron_ids, plan_blocks
from flashjax.store.zarr_io import n_blocks


def wrap_host_tier(store: FFNStore, host_cache) -> "FFNStore | HostTierStore":
    """`store` behind a host RAM tier of `host_cache`: bytes, "2GB", "512MiB", or "100%" (a share of
    the FFN records on disk); None leaves the store as it is."""
    if host_cache is None:
        return store
    disk_bytes = store.n_layers * store.d_ffn * store.record_nbytes
    return HostTierStore(store, parse_budget(host_cache, disk_bytes))


class HostTierStore:
    """An FFNStore with each layer's most recently read blocks kept in host RAM.

    `budget_bytes` is spread evenly over the layers in whole blocks; a layer whose share covers all
    its records holds the whole layer (its last block padded, when `ffn_block` does not divide
    d_ffn). Reads answer exactly what FFNStore's would; their `stats` count the disk reads only.
    """

    def __init__(self, store: FFNStore, budget_bytes: int):
        self._store = store
        self.layout, self.manifest, self.model_dir = store.layout, store.manifest, store.model_dir
        self.n_layers, self.d_ffn, self.dtype = store.n_layers, store.d_ffn, store.dtype
        self.record_width, self.ffn_block, self.record_nbytes = store.record_width, store.ffn_block, store.record_nbytes
        self.blocks_per_layer = n_blocks(self.d_ffn, self.ffn_block)
        block_bytes = self.ffn_block * self.record_nbytes
        layer_bytes = self.d_ffn * self.record_nbytes
        minimum = self.n_layers * min(block_bytes, layer_bytes)
        if budget_bytes < minimum:
            raise BudgetTooSmallError(
                f"host cache of {budget_bytes / 1e6:.1f} MB is too small: the minimum is {minimum / 1e6:.1f} MB "
                f"({minimum} bytes: one block of {self.ffn_block} neurons for each of {self.n_layers} layers)")
        share = budget_bytes // self.n_layers
        self.capacity_blocks = (self.blocks_per_layer if share >= layer_bytes
                                else min(self.blocks_per_layer, share // block_bytes))
        self._layers = [_LayerBlocks(self.capacity_blocks, self.blocks_per_layer, self.ffn_block,
                                     self.record_width, self.dtype) for _ in range(self.n_layers)]
        self._counts_lock = threading.Lock()
        self._host_hits = self._disk_neurons = self._evicted_blocks = 0

    @property
    def nbytes(self) -> int:
        """Host RAM the tier holds (all layers' block arrays)."""
        return sum(layer.records.nbytes for layer in self._layers)

    # -- reading ---------------------------------------------------------------------------------

    def read_neurons_async(self, layer: int, ids) -> "HostTierRead":
        """Issues the disk read of the blocks of `ids` (sorted, unique) not in host RAM, copies out
        those that are, and returns at once."""
        ids = check_neuron_ids(ids, layer, self.d_ffn, self.n_layers)
        blocks, rows = plan_blocks(ids, self.ffn_block)
        rank, offset = rows // self.ffn_block, ids % self.ffn_block  # each id's block among `blocks`
        cache = self._layers[layer]
        with cache.lock:
            slots = cache.slot_of_block[blocks]
            missing = blocks[slots < 0]
            # Whole missing blocks in one store read; only the layer's last block can be short.
            read_ids = block_neurons(missing, self.ffn_block, self.d_ffn)
            disk = self._store.read_neurons_async(layer, read_ids) if len(missing) else None
            out, hit = None, slots[rank] >= 0
            if hit.any():
                cache.touch(slots[slots >= 0])
                out = np.empty((len(ids), self.record_width), self.dtype)
                flat = cache.records.reshape(-1, self.record_width)
                where = slots[rank[hit]] * self.ffn_block + offset[hit]
                if hit.all():
                    np.take(flat, where, axis=0, out=out, mode="clip")  # valid ids: unbuffered
                else:
                    out[hit] = flat[where]
        host_hits = int(np.count_nonzero(hit))
        with self._counts_lock:
            self._host_hits += host_hits
            self._disk_neurons += len(read_ids)
        # Row of each missed id in the disk read's answer (blocks of `missing` laid end to end).
        miss_rows = np.searchsorted(missing, blocks[rank[~hit]]) * self.ffn_block + offset[~hit]
        return HostTierRead(self, layer, ids, out, ~hit, miss_rows, missing, disk, host_hits)

    read_blocks_async = read_neurons_async

    def read_neurons(self, layer: int, ids) -> np.ndarray:
        """Records [len(ids), record_width] of neurons `ids` (sorted, unique) of `layer`, storage dtype."""
        return self.read_neurons_async(layer, ids).result()

    def read_layer(self, layer: int) -> np.ndarray:
        """All records of `layer` [d_ffn, record_width]."""
        return self.read_neurons(layer, np.arange(self.d_ffn))

    def _keep(self, layer: int, missing: np.ndarray, data: np.ndarray) -> None:
        """Puts the blocks `missing` just read (`data`, laid end to end) into host RAM."""
        cache, width = self._layers[layer], self.record_width
        with cache.lock:
            # Another read of this layer may have kept some of them meanwhile: never twice.
            new = np.flatnonzero(cache.slot_of_block[missing] < 0)
            new = new[:cache.capacity]  # a read of more blocks than fit keeps what fits
            if not len(new):
                return
            slots, evicted = cache.make_room(missing[new])
            whole = len(data) // self.ffn_block
            full = new < whole
            blocks = data[:whole * self.ffn_block].reshape(whole, self.ffn_block, width)
            if full.all() and len(new) == whole:
                cache.records[slots] = blocks
            else:
                cache.records[slots[full]] = blocks[new[full]]
            if not full.all():  # the layer's short last block
                cache.records[slots[~full][0], :len(data) - whole * self.ffn_block] = data[whole * self.ffn_block:]
        if evicted:
            with self._counts_lock:
                self._evicted_blocks += evicted

    # -- counters and maintenance ----------------------------------------------------------------

    @property
    def stats(self) -> ReadStats:
        """The disk reads' counters (the wrapped store's): what host RAM served is not in them."""
        return self._store.stats

    def take_stats(self) -> ReadStats:
        return self._store.take_stats()

    def tier_stats(self) -> dict:
        """Totals since construction: neurons served from host RAM, neurons read from the disk (whole
        blocks), blocks evicted, and blocks held now against the capacity."""
        held = sum(len(self.held_blocks(layer)) for layer in range(self.n_layers))
        with self._counts_lock:
            return {"host_hits": self._host_hits, "disk_neurons": self._disk_neurons,
                    "evicted_blocks": self._evicted_blocks, "blocks_held": held,
                    "capacity_blocks": self.capacity_blocks * self.n_layers, "nbytes": self.nbytes}

    def held_blocks(self, layer: int) -> np.ndarray:
        """The blocks of `layer` in host RAM now, sorted."""
        cache = self._layers[layer]
        with cache.lock:
            return np.sort(cache.block_of_slot[cache.block_of_slot >= 0])

    def clear(self) -> None:
        """Forgets every block (the memory stays allocated)."""
        for cache in self._layers:
            with cache.lock:
                cache.forget()

    def evict_page_cache(self) -> None:
        """Drops the model's files from the OS page cache. The host tier is the engine's own cache,
        like the device's, and is kept: `clear()` empties it."""
        self._store.evict_page_cache()

    def verify(self) -> None:
        self._store.verify()

    def __getattr__(self, name):
        # Anything else an FFNStore offers (only reached for names not set above).
        if name.startswith("__") or name == "_store":
            raise AttributeError(name)
        return getattr(self._store, name)


class HostTierRead:
    """A read in flight: the rows host RAM served are already copied; `result()` waits for the disk
    read, keeps its blocks in host RAM and returns the records asked for. `stats` counts the disk
    read only; `host_hits` is the number of neurons host RAM served."""

    def __init__(self, tier: HostTierStore, layer: int, ids: np.ndarray, out, missed: np.ndarray,
                 miss_rows: np.ndarray, missing: np.ndarray, disk, host_hits: int):
        self._tier, self.layer, self.ids = tier, layer, ids
        self._out, self._missed, self._miss_rows, self._missing, self._disk = out, missed, miss_rows, missing, disk
        self.stats = disk.stats if disk is not None else ReadStats()
        self.host_hits = host_hits
        self._answer = None
        self._lock = threading.Lock()

    def done(self) -> bool:
        return self._disk is None or self._disk.done()

    def result(self) -> np.ndarray:
        """[len(ids), record_width] in the storage dtype; row k is neuron ids[k]'s record."""
        with self._lock:
            if self._answer is None:
                self._answer = self._assemble()
            return self._answer

    def _assemble(self) -> np.ndarray:
        tier = self._tier
        if self._disk is None:
            return self._out if self._out is not None else np.empty((0, tier.record_width), tier.dtype)
        data = self._disk.result()
        tier._keep(self.layer, self._missing, data)
        if self._out is None:
            # Nothing from host RAM: whole blocks asked for are the disk's answer as it is.
            return data if len(data) == len(self.ids) else data[self._miss_rows]
        self._out[self._missed] = data[self._miss_rows]
        return self._out


class _LayerBlocks:
    """One layer's blocks in host RAM: `records[slot]` holds block `block_of_slot[slot]`, and
    `slot_of_block` maps back (-1: not held). `last_used` orders the slots for LRU eviction."""

    def __init__(self, capacity: int, blocks: int, block: int, width: int, dtype):
        self.capacity = capacity
        self.records = np.zeros((capacity, block, width), dtype)
        self.slot_of_block = np.full(blocks, -1, np.int64)
        self.block_of_slot = np.full(capacity, -1, np.int64)
        self.last_used = np.full(capacity, -1, np.int64)  # -1: empty, taken first
        self.clock = 0
        self.lock = threading.Lock()

    def touch(self, slots: np.ndarray) -> None:
        self.clock += 1
        self.last_used[slots] = self.clock

    def make_room(self, blocks: np.ndarray) -> tuple[np.ndarray, int]:
        """Slots for `blocks` (at most `capacity`, none held), taken from the least recently used;
        returns them and how many held blocks were evicted."""
        k = len(blocks)
        slots = (np.arange(self.capacity) if k == self.capacity
                 else np.argpartition(self.last_used, k - 1)[:k])
        old = self.block_of_slot[slots]
        old = old[old >= 0]
        self.slot_of_block[old] = -1
        self.block_of_slot[slots] = blocks
        self.slot_of_block[blocks] = slots
        self.touch(slots)
        return slots, len(old)

    def forget(self) -> None:
        self.slot_of_block[:] = -1
        self.block_of_slot[:] = -1
        self.last_used[:] = -1


__all__ = ["HostTierRead", "HostTierStore", "wrap_host_tier"]
