"""Reading FFN neuron records from a flash model directory: the engine's I/O entry point.

    store = FFNStore("models/smollm2-flash")
    rows = store.read_neurons(3, np.array([5, 6, 7, 900]))     # [4, record_width], storage dtype
    pending = store.read_neurons_async(4, ids)                 # issue now (e.g. from a prefetch thread)
    rows = pending.result()                                    # wait later

A read is planned in whole blocks (inner chunks of `ffn_block` neurons, see store.zarr_io): the blocks
holding the wanted ids are fetched by ONE TensorStore read per array with an index array over the
block axis, so TensorStore issues the chunk reads of the whole layer together on its own threads,
and the wanted rows are picked out when they arrive. Neighbouring blocks are neighbouring byte ranges
of the shard file. Issuing returns at once, and any thread may call these methods.
"""

from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np

from flashjax.store.manifest import Manifest, StoreChecksumError, read_manifest
from flashjax.store.zarr_io import make_context, n_blocks, open_array
from flashjax.weights.errors import CheckpointError


@dataclasses.dataclass
class ReadStats:
    """What one read (or a sum of reads) cost: TensorStore read calls issued (one per array per layer
    read), contiguous byte ranges and blocks (inner chunks, each one read inside TensorStore) they
    covered, bytes of blocks read from the files, and neuron records returned."""

    calls: int = 0
    ranges: int = 0
    chunks: int = 0
    bytes: int = 0
    neurons: int = 0

    def __iadd__(self, other: "ReadStats") -> "ReadStats":
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
        return self


def plan_blocks(ids: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """For sorted unique `ids`: the blocks holding them, and each id's row in those blocks' records
    laid end to end."""
    of_id = ids // block
    first = np.ones(len(ids), bool)
    first[1:] = of_id[1:] != of_id[:-1]
    blocks = of_id[first]
    rows = (np.cumsum(first) - 1) * block + ids % block
    return blocks, rows


def check_neuron_ids(ids, layer: int, d_ffn: int, n_layers: int) -> np.ndarray:
    """`ids` as int64, after checking they are sorted, unique and in range, and `layer` exists."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) and (ids[0] < 0 or ids[-1] >= d_ffn or np.any(ids[1:] <= ids[:-1])):
        raise ValueError(f"neuron ids must be sorted, unique and in [0, {d_ffn}); got {ids[:8]}...")
    if not 0 <= layer < n_layers:
        raise IndexError(f"layer {layer} out of range (the model has {n_layers})")
    return ids


def block_neurons(blocks: np.ndarray, block: int, d_ffn: int) -> np.ndarray:
    """Every neuron id of the sorted `blocks` (the last block of a layer may be short)."""
    ids = (np.asarray(blocks)[:, None] * block + np.arange(block)).reshape(-1)
    return ids[ids < d_ffn]


class PendingRead:
    """Reads of one layer in flight. `result()` waits for them and returns the records asked for."""

    def __init__(self, store: "FFNStore", layer: int, ids: np.ndarray, rows: np.ndarray, futures: list,
                 stats: ReadStats):
        self._store, self.layer, self.ids, self._rows, self._futures = store, layer, ids, rows, futures
        self.stats = stats

    def done(self) -> bool:
        return all(f.done() for f, _ in self._futures)

    def result(self) -> np.ndarray:
        """[len(ids), record_width] in the storage dtype; row k is neuron ids[k]'s record."""
        store, n = self._store, len(self.ids)
        # The ids are the first n rows of the blocks read (a whole layer, or runs of whole blocks):
        # the blocks laid end to end are the answer, no gather needed.
        whole = n == 0 or self._rows[-1] == n - 1
        out = None
        for future, cols in self._futures:
            try:
                data = future.result()
            except Exception as e:  # TensorStore reports I/O and decoding problems as ValueError
                raise CheckpointError(f"{store.model_dir}: layer {self.layer}: reading "
                                      f"{n} neurons{store.experts_of(self.ids)} failed: {e}") from None
            data = data.reshape(-1, data.shape[-1])
            if whole and len(self._futures) == 1:
                return data[:n]
            if out is None:
                out = np.empty((n, store.record_width), store.dtype)
            out[:, cols] = data[:n] if whole else data[self._rows]
        return out if out is not None else np.empty((0, store.record_width), store.dtype)


class FFNStore:
    """Every layer's FFN records of a flash model directory, opened for reading with TensorStore.

    `concurrency` bounds the file reads in flight; TensorStore keeps no cache of its own. Counters of
    all reads accumulate in `stats` (a ReadStats; `take_stats()` returns and resets it).
    """

    def __init__(self, model_dir, manifest: Manifest | None = None, concurrency: int = 32):
        self.model_dir = os.path.abspath(os.fspath(model_dir))
        self.manifest = manifest or read_manifest(self.model_dir)
        self.layout = self.manifest.layout
        cfg = self.manifest.config
        self.n_layers, self.d_ffn = cfg.n_layers, cfg.d_ffn
        self.record_width, self.ffn_block = self.layout.record_width, self.layout.ffn_block
        self.dtype = self.manifest.np_dtype
        self.record_nbytes = self.record_width * self.dtype.itemsize
        self.stats = ReadStats()
        self._lock = threading.Lock()
        self._context = make_context(concurrency)
        # Cheap checks (files present, sizes right) so a truncated shard is reported by layer, not
        # as a TensorStore decoding error mid-generation; `verify()` does the full checksums.
        for layer, entry in enumerate(self.manifest.layers):
            entry.checksum.check(self.model_dir, f"layer {layer}", full=False)
        # Per layer: [(array, record columns it fills)]; one entry when the records are bundled.
        self._arrays = []
        for layer, entry in enumerate(self.manifest.layers):
            parts = []
            for name, rel in entry.arrays.items():
                cols = slice(0, self.record_width) if name == "bundle" else self.layout.part_slice(name)
                try:
                    array = open_array(os.path.join(self.model_dir, rel), self._context)
                except ValueError as e:
                    raise CheckpointError(f"{self.model_dir}: layer {layer}: cannot open {rel}: {e}") from None
                want = (n_blocks(self.d_ffn, self.ffn_block), self.ffn_block, cols.stop - cols.start)
                if tuple(array.shape) != want or array.dtype.numpy_dtype != self.dtype:
                    raise CheckpointError(f"{self.model_dir}: layer {layer}: {rel} is {array.dtype} "
                                          f"{tuple(array.shape)}, the manifest says {self.dtype} {want}")
                parts.append((array, cols))
            self._arrays.append(parts)

    def experts_of(self, ids: np.ndarray) -> str:
        """" (experts 3, 7)" for a mixture of experts' neuron ids, "" for a dense FFN: for messages."""
        cfg = self.manifest.config
        return f" (experts {', '.join(map(str, np.unique(ids // cfg.expert_ffn)))})" if cfg.is_moe and len(ids) else ""

    # -- reading ---------------------------------------------------------------------------------

    def read_neurons_async(self, layer: int, ids) -> PendingRead:
        """Issues the reads of neurons `ids` (sorted, unique) of `layer` and returns at once."""
        ids = check_neuron_ids(ids, layer, self.d_ffn, self.n_layers)
        blocks, rows = plan_blocks(ids, self.ffn_block)
        arrays = self._arrays[layer] if len(blocks) else []
        ranges = int(np.count_nonzero(np.diff(blocks) > 1)) + 1 if len(blocks) else 0
        # One contiguous run (a whole layer, say) reads as a slice: no index array to walk.
        select = slice(int(blocks[0]), int(blocks[-1]) + 1) if ranges == 1 else blocks
        futures = [(array[select].read(), cols) for array, cols in arrays]
        stats = ReadStats(calls=len(arrays), ranges=ranges * len(arrays), chunks=len(blocks) * len(arrays),
                          bytes=len(blocks) * self.ffn_block * self.record_nbytes, neurons=len(ids))
        with self._lock:
            self.stats += stats
        return PendingRead(self, layer, ids, rows, futures, stats)

    read_blocks_async = read_neurons_async

    def read_neurons(self, layer: int, ids) -> np.ndarray:
        """Records [len(ids), record_width] of neurons `ids` (sorted, unique) of `layer`, storage dtype."""
        return self.read_neurons_async(layer, ids).result()

    def read_layer(self, layer: int) -> np.ndarray:
        """All records of `layer` [d_ffn, record_width] (the "naive" read of the whole FFN)."""
        return self.read_neurons(layer, np.arange(self.d_ffn))

    def take_stats(self) -> ReadStats:
        """The counters accumulated since the last call, and zeroes them."""
        with self._lock:
            stats, self.stats = self.stats, ReadStats()
        return stats

    # -- maintenance -----------------------------------------------------------------------------

    def evict_page_cache(self) -> None:
        """Drops the model's files from the OS page cache (posix_fadvise DONTNEED), so the next reads
        come from the disk: for honest cold-read measurements."""
        evict_page_cache(self.model_dir)

    def verify(self) -> None:
        """Recomputes every layer's checksum; raises StoreChecksumError naming the layer and file."""
        verify_files(self.model_dir, self.manifest)


def evict_page_cache(model_dir: str) -> None:
    """posix_fadvise(DONTNEED) over every file under `model_dir`."""
    for dirpath, _, names in os.walk(model_dir):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fdatasync(fd)  # dirty pages (a model just written) are not dropped otherwise
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def verify_files(model_dir: str, manifest: Manifest) -> None:
    """Checks every layer's files and the resident checkpoint against the manifest's checksums. A
    mixture of experts' damaged layer is reported with the experts whose records changed."""
    for layer, entry in enumerate(manifest.layers):
        try:
            entry.checksum.check(model_dir, f"layer {layer}")
        except StoreChecksumError as e:
            if entry.expert_sha256 is None:
                raise
            bad = damaged_experts(model_dir, manifest, layer)
            which = f"experts {', '.join(map(str, bad))}" if bad else "no expert's records (the file's index or padding)"
            raise StoreChecksumError(f"{e}; layer {layer}: damaged: {which}") from None
    manifest.resident_files.check(model_dir, "resident parameters")


def damaged_experts(model_dir: str, manifest: Manifest, layer: int) -> list[int]:
    """The experts of `layer` whose records no longer match their digests (read back through
    TensorStore; a layer that cannot be read at all counts every expert as damaged)."""
    from flashjax.store.convert import expert_digests

    cfg, entry = manifest.config, manifest.layers[layer]
    try:
        records = _read_layer_unchecked(model_dir, manifest, layer)
    except (CheckpointError, ValueError):
        return list(range(cfg.n_experts))
    return [e for e, (got, want) in enumerate(zip(expert_digests(records, cfg.expert_ffn), entry.expert_sha256))
            if got != want]


def _read_layer_unchecked(model_dir: str, manifest: Manifest, layer: int) -> np.ndarray:
    """Every record of `layer` [d_ffn, record_width], read without the checksum checks."""
    layout, d_ffn = manifest.layout, manifest.config.d_ffn
    out = np.empty((d_ffn, layout.record_width), manifest.np_dtype)
    context = make_context(8)
    for name, rel in manifest.layers[layer].arrays.items():
        cols = slice(0, layout.record_width) if name == "bundle" else layout.part_slice(name)
        data = open_array(os.path.join(model_dir, rel), context).read().result()
        out[:, cols] = data.reshape(-1, data.shape[-1])[:d_ffn]
    return out


__all__ = ["FFNStore", "PendingRead", "ReadStats", "StoreChecksumError", "block_neurons", "check_neuron_ids",
           "evict_page_cache", "plan_blocks",
           "verify_files"]
