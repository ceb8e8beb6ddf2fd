"""Splitting each layer's FFN neurons across devices (`--devices N`), on JAX's own sharding.

The devices form a one-axis mesh, "neurons". Device s owns a contiguous run of
whole storage blocks of every layer's neurons: it caches, reads and computes
only those, and the partial FFN outputs are summed across the mesh (a psum
inside `shard_map`). Attention, embeddings and the head are replicated: they
are small next to the FFN, and replication keeps every device's residual
stream identical, so one host-side decision (which neurons, which slots)
serves every device.

Host-side arrays for the devices are stacked `[n_shards, ...]` and placed in
ONE transfer per layer with a `NamedSharding(mesh, P("neurons"))`; with
`staging="pinned"` they go first to pinned host memory (where the platform has
it), from which the device copy is a DMA. Across hosts (`jax.distributed`) each
process fills only the shards of its own devices (`make_array_from_callback`
asks it for those alone), so it reads only its own records.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

NEURONS = "neurons"


def make_mesh(n_devices: int) -> Mesh:
    """The first `n_devices` devices of the default backend as a ("neurons",) mesh."""
    devices = jax.devices()
    if not 1 <= n_devices <= len(devices):
        raise ValueError(f"--devices {n_devices}: this JAX sees {len(devices)} {jax.default_backend()} device(s) "
                         f"({', '.join(str(d) for d in devices)}); on the CPU, set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count=N before starting Python to get N")
    left_out = sorted({d.process_index for d in devices} - {d.process_index for d in devices[:n_devices]})
    if left_out:
        # Every process takes every step (jax.distributed): each needs devices in the mesh.
        raise ValueError(f"--devices {n_devices}: the first {n_devices} of the {len(devices)} devices of the "
                         f"{jax.process_count()} processes leave out process(es) {', '.join(map(str, left_out))}; "
                         f"every process computes each step, so pass --devices {len(devices)} (the default with "
                         f"several processes)")
    return Mesh(np.array(devices[:n_devices]), (NEURONS,))


@dataclasses.dataclass(frozen=True)
class NeuronPartition:
    """Shard s owns neurons [offsets[s], offsets[s + 1]): whole blocks, as even as blocks allow."""

    d_ffn: int
    offsets: tuple[int, ...]

    @classmethod
    def make(cls, d_ffn: int, block: int, n_shards: int) -> "NeuronPartition":
        n_blocks = -(-d_ffn // block)
        if n_shards > n_blocks:
            raise ValueError(f"cannot split {d_ffn} neurons in blocks of {block} across {n_shards} devices: "
                             f"there are only {n_blocks} blocks")
        # Block counts differ by at most one between shards.
        per_shard = [n_blocks // n_shards + (s < n_blocks % n_shards) for s in range(n_shards)]
        bounds = np.minimum(np.concatenate([[0], np.cumsum(per_shard)]) * block, d_ffn)
        return cls(d_ffn, tuple(int(b) for b in bounds))

    @property
    def n_shards(self) -> int:
        return len(self.offsets) - 1

    def size(self, shard: int) -> int:
        return self.offsets[shard + 1] - self.offsets[shard]

    @property
    def max_size(self) -> int:
        return max(self.size(s) for s in range(self.n_shards))

    def split(self, ids: np.ndarray) -> list[np.ndarray]:
        """Sorted global ids -> each shard's sorted local ids."""
        cuts = np.searchsorted(ids, self.offsets)
        return [ids[cuts[s]:cuts[s + 1]] - self.offsets[s] for s in range(self.n_shards)]

    def join(self, local_ids: list[np.ndarray]) -> np.ndarray:
        """Each shard's sorted local ids -> sorted global ids (shards own ascending ranges)."""
        return np.concatenate([np.asarray(ids, np.int64) + self.offsets[s] for s, ids in enumerate(local_ids)])


class ShardPlacer:
    """Moves host arrays onto the mesh: replicated, or stacked [n_shards, ...] split by shard."""

    def __init__(self, mesh: Mesh, staging: str = "auto"):
        self.mesh = mesh
        self.replicated = NamedSharding(mesh, PartitionSpec())
        self.by_shard = NamedSharding(mesh, PartitionSpec(NEURONS))
        device = mesh.devices.flat[0]
        kinds = {m.kind for m in device.addressable_memories()}
        if staging == "auto":
            # On an accelerator a copy from pageable memory is staged by the runtime anyway; landing
            # in pinned memory first makes the device copy a plain DMA. On the CPU it is one more copy.
            staging = "pinned" if device.platform != "cpu" and "pinned_host" in kinds else "direct"
        if staging == "pinned" and "pinned_host" not in kinds:
            raise ValueError(f"{device.platform} devices have no pinned host memory (memory kinds: {sorted(kinds)})")
        if staging not in ("pinned", "direct"):
            raise ValueError(f"staging must be auto, pinned or direct, not {staging!r}")
        self.staging = staging
        self._landing = self.by_shard.with_memory_kind("pinned_host") if staging == "pinned" else self.by_shard
        self._local = {s for s, d in enumerate(mesh.devices.flat) if d.process_index == jax.process_index()}
        self._single_process = len(self._local) == mesh.devices.size
        self._one_device = mesh.devices.size == 1

    @property
    def spans_processes(self) -> bool:
        """Whether the mesh holds devices of other processes (jax.distributed)."""
        return not self._single_process

    def is_local(self, shard: int) -> bool:
        """Whether this process holds shard `shard`'s device (always, on one host)."""
        return shard in self._local

    def shards(self, *arrays: np.ndarray):
        """Stacked host arrays [n_shards, ...] -> global arrays split along the mesh, one per shard."""
        if self._one_device and self.staging == "direct":
            # The jitted call transfers its numpy arguments itself, for far less than a device_put
            # with a sharding (measured: about 0.2 ms per call, 60 calls a token).
            return arrays
        target = self._landing
        if self._single_process:
            placed = jax.device_put(list(arrays), target)  # one batched transfer
        else:
            # Each process is asked only for the slices of its own devices.
            placed = [jax.make_array_from_callback(a.shape, target, lambda index, a=a: a[index]) for a in arrays]
        return tuple(jax.device_put(placed, self.by_shard) if target is not self.by_shard else placed)

    def replicate(self, tree):
        if self._single_process:
            return jax.device_put(tree, self.replicated)
        return jax.tree.map(self._replicate_across_processes, tree)

    def _replicate_across_processes(self, x):
        """One leaf onto every device of a mesh that spans processes. An array committed to one of
        this process's devices (a token read back with `local_copy`) is copied to each of its other
        devices and the copies assembled: JAX does not move arrays between hosts by `device_put`,
        and every process holds the same value."""
        if isinstance(x, jax.Array) and x.is_fully_addressable and len(x.sharding.device_set) == 1 \
                and getattr(x, "committed", True):
            mine = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
            return jax.make_array_from_single_device_arrays(x.shape, self.replicated,
                                                            [jax.device_put(x, d) for d in mine])
        return jax.device_put(x, self.replicated)

    def zeros(self, shape: tuple[int, ...], dtype) -> jax.Array:
        """A [n_shards * rows, ...] zero buffer created in place on each device (never whole on one)."""
        return jax.jit(lambda: jax.numpy.zeros(shape, dtype), out_shardings=self.by_shard)()

    def local_copy(self, array: jax.Array) -> jax.Array:
        """A replicated array's copy on this process's first device (host code reads that one)."""
        return array if self._one_device else array.addressable_shards[0].data
