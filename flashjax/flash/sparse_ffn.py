"""The sparse FFN's host side: each layer's neuron caches, their device buffers, and the padding
that turns a step's reads into fixed-shape device arguments.

Per layer and device, a `LayerNeuronCache` (flash/neuron_cache.py) decides what is loaded, moved
and evicted; this module applies those decisions to the layer's preallocated device buffers (one
`update_cache` dispatch for all devices) and hands the runner what the layer step multiplies: the
cache (buffers and live rows per device) and the surplus records in padded scratch chunks.
Per-device arrays are stacked [S, ...] and padded to one shared bucket, so a token never meets a
new shape.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from flashjax.flash import kernels
from flashjax.flash.expert_cache import LayerExpertCache
from flashjax.flash.neuron_cache import LayerNeuronCache
from flashjax.flash.pacing import StepPacer
from flashjax.store.ffn_store import block_neurons


def update_bucket(n: int) -> int:
    """Power-of-two padding (min 16) for per-step update lengths: few shapes, no per-token compile."""
    return max(16, 1 << max(0, int(n - 1).bit_length()))


def scratch_bucket(n: int, limit: int) -> int:
    """Power-of-four padding (min 16, at most `limit`) for scratch chunks."""
    size = 16
    while size < n:
        size *= 4
    return min(size, limit)


def scratch_plan(lengths: list[int], scratch_rows: int) -> list[tuple[int, int]]:
    """The scratch chunks that stream `lengths[s]` records on device s: [(first row, padded size)],
    at most `scratch_rows` each. Each chunk is one collective step over the mesh, so every process
    must dispatch the same ones: the plan depends on every device's count alone, never on which
    devices' records this process holds."""
    return [(begin, scratch_bucket(max(min(n - begin, scratch_rows) for n in lengths), scratch_rows))
            for begin in range(0, max(lengths, default=0), scratch_rows)]


def whole_blocks(ids: np.ndarray, block: int, n: int) -> np.ndarray:
    """Every neuron id in the blocks that hold `ids` (sorted)."""
    return ids if block == 1 or len(ids) == 0 else block_neurons(np.unique(ids // block), block, n)



class SparseFFN:
    """Every layer's neuron caches (host bookkeeping) and cache buffers (on the devices)."""

    def __init__(self, cfg, mesh, placer, partition, part_slices, plan, cache_dtype, window: int,
                 expert_policy: str = "lfu"):
        self.cfg, self.mesh, self.placer, self.partition, self.part_slices = cfg, mesh, placer, partition, part_slices
        self.n_devices = partition.n_shards
        self.capacity, self.scratch_rows = plan.cache_rows_per_layer, plan.scratch_rows
        self.pace = StepPacer(placer.spans_processes)  # every FFN step goes through it (flash/pacing.py)
        # caches[l][s]: layer l's cache on device s, over that device's own (local) neuron ids. A
        # mixture of experts caches whole experts (flash/expert_cache.py), one device only.
        if cfg.is_moe:
            make = lambda s: LayerExpertCache(self.capacity, partition.size(s), cfg.expert_ffn, expert_policy)
        else:
            make = lambda s: LayerNeuronCache(self.capacity, partition.size(s), window)
        self.caches = [[make(s) for s in range(self.n_devices)] for _ in range(cfg.n_layers)]
        self.buffers = [{part.name: placer.zeros((self.n_devices * self.capacity, part.stop - part.start), cache_dtype)
                         for part in part_slices} for _ in range(cfg.n_layers)]

    def reset(self) -> None:
        for layer in self.caches:
            for cache in layer:
                cache.reset()

    def step_caches(self, l: int, needed: np.ndarray, stream_only: np.ndarray | None = None) -> list:
        """Each device's cache of layer l takes its share of `needed` (global ids): [CacheUpdate].

        `stream_only` (a mixture of experts' neuron rule inside its routed experts: bool [F]): of the
        needed neurons streamed through scratch (no slot for their expert), only those it selects are
        read. What the cache loads stays whole: it holds whole experts, and a cached expert is
        multiplied whole (its rows are in memory anyway)."""
        updates = [cache.step(ids) for cache, ids in zip(self.caches[l], self.partition.split(needed))]
        if stream_only is None:
            return updates
        selected = self.partition.split(np.flatnonzero(stream_only))
        return [dataclasses.replace(u, scratch_ids=u.scratch_ids[np.isin(u.scratch_ids, keep)])
                for u, keep in zip(updates, selected)]

    def local_ids(self, per_device: list[np.ndarray]) -> np.ndarray:
        """Each device's local ids -> the global ids this process reads, ascending. Across hosts a
        process reads only its own devices' records."""
        return self.partition.join([ids if self.placer.is_local(s) else ids[:0] for s, ids in enumerate(per_device)])

    def read_ids(self, updates: list) -> np.ndarray:
        """Global ids to read for these updates: device 0's loads then scratch, device 1's, ..."""
        return self.local_ids([u.read_ids for u in updates])

    def uncached(self, l: int, ids: np.ndarray) -> np.ndarray:
        """The global `ids` that layer l's caches do not hold."""
        local = self.partition.split(ids)
        return self.partition.join([part[cache.slot_of[part] < 0] for cache, part in zip(self.caches[l], local)])

    def update(self, l, updates, rows, read_ids, stats, routed=None):
        """Layer l's caches take their updates; returns (cached, surplus) for the FFN.

        `updates`: each device's CacheUpdate, or None (prefill: everything read is surplus, the
        caches are left alone); `rows` holds the records of `read_ids`, devices in order. One update
        dispatch for all devices: per-device arrays are stacked [S, ...] and padded to a shared
        bucket. `cached` is (buffers, live rows per device), or None when no row is live-able (no
        cache, or prefill); `surplus` is each device's records that were read but not cached.
        """
        t0 = time.perf_counter()
        n_dev, cap, width = self.n_devices, self.capacity, rows.shape[1]
        per_device = np.searchsorted(read_ids, self.partition.offsets)
        surplus = [rows[per_device[s]:per_device[s + 1]] for s in range(n_dev)]
        cached = None
        if updates is not None:
            n_load = [len(u.load_ids) if self.placer.is_local(s) else 0 for s, u in enumerate(updates)]
            size = max(max(update_bucket(len(u.moves_src)), update_bucket(len(u.load_ids))) for u in updates)
            if cap and any(len(u.moves_src) or len(u.load_ids) for u in updates):
                src = np.zeros((n_dev, size), np.int32)
                dst, slots = np.full((n_dev, size), cap, np.int32), np.full((n_dev, size), cap, np.int32)
                loaded = np.zeros((n_dev, size, width), rows.dtype)
                for s, u in enumerate(updates):
                    src[s, :len(u.moves_src)], dst[s, :len(u.moves_dst)] = u.moves_src, u.moves_dst
                    slots[s, :len(u.load_slots)] = u.load_slots
                    loaded[s, :n_load[s]] = surplus[s][:n_load[s]]
                self.buffers[l] = kernels.update_cache(self.mesh, self.part_slices, self.buffers[l],
                                                       *self.placer.shards(src, dst, slots, loaded))
            surplus = [r[n:] for r, n in zip(surplus, n_load)]
            if cap:
                counts, = self.placer.shards(np.array([u.count for u in updates], np.int32))
                cached = (self.buffers[l], counts)
                if self.cfg.is_moe:  # the slots of the `routed` experts that are cached: only those multiply
                    cached += self.placer.shards(*self.routed_slots(l, routed))
            for u in updates:
                stats.evicted += u.evicted
                stats.hits += u.hits
        stats.memory_management_ms += (time.perf_counter() - t0) * 1e3
        return cached, surplus

    def routed_slots(self, l: int, routed) -> tuple[np.ndarray, np.ndarray]:
        """(slots [k], experts [k]) of layer l's cached experts among `routed`, padded with slot -1:
        what the FFN step multiplies from the cache (one device: mixtures of experts run on one)."""
        k = self.cfg.experts_per_token
        slots, experts = np.full(k, -1, np.int32), np.zeros(k, np.int32)
        if routed is not None and len(routed):
            held = self.caches[l][0].slot_of_expert[routed]
            mine = held >= 0
            slots[:mine.sum()], experts[:mine.sum()] = held[mine], routed[mine]
        return slots, experts

    def stream_lengths(self, updates: list | None, needed: np.ndarray | None = None) -> list[int]:
        """Each device's count of records streamed through scratch this step, on every process alike:
        a process holds only its own devices' records, but every process must dispatch the same
        chunks (each is a collective across the mesh), so their number and sizes come from these.
        `updates`: each device's CacheUpdate; None (prefill): every device streams its share of
        `needed`."""
        if updates is None:
            return [len(ids) for ids in self.partition.split(needed)]
        return [len(u.scratch_ids) for u in updates]

    def scratch_chunks(self, surplus: list[np.ndarray], lengths: list[int],
                       surplus_ids: list[np.ndarray] | None = None) -> list:
        """Each device's surplus records in chunks of at most `scratch_rows`, placed on the mesh:
        [(records [S, size, R], valid rows [S])]. `lengths` are each device's surplus counts on
        every process (`stream_lengths`); `surplus` holds only this process's devices' records
        (others empty). A chunk is padded to a power-of-four length, so a step with little surplus
        does not pay for a full chunk. A mixture of experts passes the surplus rows' neuron ids too,
        and each chunk carries its rows' experts [S, size]."""
        n_dev, s_rows, chunks = self.n_devices, self.scratch_rows, []
        for begin, size in scratch_plan(lengths, s_rows):
            parts = [r[begin:begin + s_rows] for r in surplus]
            if n_dev == 1 and len(parts[0]) == size:
                padded = parts[0][None]  # a full chunk on one device: the read's own rows, no copy
            else:
                padded = np.zeros((n_dev, size, surplus[0].shape[1]), surplus[0].dtype)
                for s, part in enumerate(parts):
                    padded[s, :len(part)] = part
            arrays = [padded, np.array([len(c) for c in parts], np.int32)]
            if surplus_ids is not None:
                experts = np.zeros((n_dev, size), np.int32)
                for s, ids in enumerate(surplus_ids):
                    piece = ids[begin:begin + s_rows]
                    experts[s, :len(piece)] = piece // self.cfg.expert_ffn
                arrays.append(experts)
            chunks.append(tuple(self.placer.shards(*arrays)))
        return chunks

    def remaining_chunks(self, x, partial, h, post_ffn_norm, chunks, expert_weights=None):
        """The residual stream with the FFN over scratch chunks past the first (a surplus larger than
        `scratch_rows`) added to `partial` (stream before the FFN, FFN output so far)."""
        for chunk in chunks[1:]:
            x, partial = self.pace(kernels.ffn_step, self.cfg, self.mesh, self.part_slices, post_ffn_norm, partial, h,
                                   None, None, chunk, expert_weights)
        return x

