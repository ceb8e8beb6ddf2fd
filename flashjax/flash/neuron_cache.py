"""Per-layer neuron cache bookkeeping (host side, numpy only).

The rows themselves live in a fixed-capacity buffer owned by the engine
(``[capacity, record_width]``, usually a device array updated by a jitted
scatter). This module only decides which slots change on each token and says
so in a :class:`CacheUpdate`; it knows nothing about disks, dtypes or models.

Layout, as in "LLM in a flash" (Alizadeh et al. 2023, section 3.3): slot ``s``
of the buffer holds the row of neuron ``ids[s]`` for ``s < count``; rows
``0..count-1`` are always dense. Delete = move the last live rows into the
holes; insert = append after the last live row. Nothing is ever reallocated.

Policy (windowing, eager), for the ``t``-th call to :meth:`LayerNeuronCache.step`
(``t = 0, 1, ...``) with window ``k >= 1``:

1. A cached neuron's *last use* is the latest step whose ``needed`` set held
   it *while it was cached*. The current token's hits get last use ``t``.
2. Every cached neuron whose last use is ``<= t - k`` (i.e. not used by any of
   the last ``k`` tokens, the current one included) is deleted -- eagerly,
   whether or not room is needed. No other neuron is ever deleted: a neuron
   used by any of the last ``k`` tokens stays cached, so the current token's
   neurons are never evicted. ``k = 1`` keeps exactly the current token's
   cached neurons.
3. The needed neurons that are not cached ("missing", ascending id order) are
   appended while there is room, lowest ids first; the rest go to
   ``scratch_ids``: the engine reads them into a scratch buffer for this token
   only and they are not cached (a scratch neuron has no last use). In-window
   neurons are not evicted to make room for them.
4. ``capacity = 0`` sends every needed neuron to scratch (the paper's naive
   path).

After ``step(needed)`` every needed id is either cached or in ``scratch_ids``,
never both; every cached neuron was used within the last ``k`` steps.
"""

from __future__ import annotations

import dataclasses

import numpy as np

_I32 = np.int32
_EMPTY = np.zeros(0, _I32)
_EMPTY.flags.writeable = False  # shared by updates that move nothing
_NEVER = np.iinfo(np.int64).min  # last_used of an empty slot


@dataclasses.dataclass(frozen=True)
class CacheUpdate:
    """What one token changes in one layer's buffer; apply moves first, then loads.

    ``moves_src`` and ``moves_dst`` are disjoint (sources lie in
    ``[count, old_count)``, destinations in ``[0, count)``), so the moves are a
    simultaneous gather-then-scatter (``buf.at[dst].set(buf[src])``) with no
    ordering question. ``load_slots`` is ``arange(count - len(load_ids), count)``
    and is disjoint from ``moves_dst``, so moves and loads may also be fused into
    a single scatter: ``buf.at[concat(dst, load_slots)].set(concat(buf[src], rows))``.
    ``load_ids`` and ``scratch_ids`` are ascending, and every load id is below
    every scratch id, so ``read_ids`` (both together) is ascending too.
    Rows at slots ``>= count`` are stale and must be masked out (``ids == -1``).
    """

    moves_src: np.ndarray  # int32 [m]: slots whose rows move ...
    moves_dst: np.ndarray  # int32 [m]: ... into these slots (holes left by deletions)
    load_ids: np.ndarray  # int32 [l]: neuron ids to read from disk and write ...
    load_slots: np.ndarray  # int32 [l]: ... into these slots (appended after the live rows)
    scratch_ids: np.ndarray  # int32 [s]: needed but did not fit; read for this token only
    evicted: int  # neurons deleted this step
    hits: int  # needed neurons that were already cached
    count: int  # live rows after the update

    @property
    def read_ids(self) -> np.ndarray:
        """All neuron ids to read from disk this token (loads then scratch), ascending."""
        return np.concatenate([self.load_ids, self.scratch_ids])

    @property
    def n_moves(self) -> int:
        return int(self.moves_src.shape[0])


class LayerNeuronCache:
    """One layer's windowed neuron cache; see the module docstring for the policy."""

    def __init__(self, capacity: int, n_neurons: int, window: int):
        if n_neurons < 0 or n_neurons > np.iinfo(_I32).max:
            raise ValueError(f"n_neurons must be in [0, 2**31), got {n_neurons}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.capacity = int(capacity)
        self.n_neurons = int(n_neurons)
        self.window = int(window)
        # Fixed-size arrays, written in place for the cache's lifetime.
        self._ids = np.full(self.capacity, -1, _I32)  # neuron id per slot
        self._last_used = np.full(self.capacity, _NEVER, np.int64)  # step of last use per slot
        self._slot_of = np.full(self.n_neurons, -1, _I32)  # slot per neuron id
        self._count = 0
        self._t = 0  # index of the next step
        # Read-only views, created once so callers see a stable object that tracks the state.
        self._ids_ro = self._ids.view()
        self._ids_ro.flags.writeable = False
        self._slot_of_ro = self._slot_of.view()
        self._slot_of_ro.flags.writeable = False
        self._last_used_ro = self._last_used.view()
        self._last_used_ro.flags.writeable = False

    # -- state ---------------------------------------------------------------

    @property
    def ids(self) -> np.ndarray:
        """Read-only int32 [capacity]: neuron id held by each slot, -1 at and beyond ``count``."""
        return self._ids_ro

    @property
    def slot_of(self) -> np.ndarray:
        """Read-only int32 [n_neurons]: slot holding each neuron, -1 if not cached."""
        return self._slot_of_ro

    @property
    def last_used(self) -> np.ndarray:
        """Read-only int64 [capacity]: step of each slot's last use (meaningless beyond ``count``)."""
        return self._last_used_ro

    @property
    def count(self) -> int:
        return self._count

    @property
    def steps(self) -> int:
        """Number of steps taken so far (the index the next step will have)."""
        return self._t

    def reset(self) -> None:
        """Empties the cache (the engine's buffer needs no change: every row becomes stale)."""
        self._slot_of[self._ids[: self._count]] = -1
        self._ids[: self._count] = -1
        self._last_used[: self._count] = _NEVER
        self._count = 0
        self._t = 0

    # -- the step --------------------------------------------------------------

    def step(self, needed: np.ndarray) -> CacheUpdate:
        """Advances one token; ``needed`` = ascending unique neuron ids this token uses."""
        needed = self._check_needed(needed)
        t, old_count = self._t, self._count
        ids, last_used, slot_of = self._ids, self._last_used, self._slot_of

        # 1. Hits: refresh their last use.
        slots = slot_of[needed]
        cached = slots >= 0
        hit_slots = slots[cached]
        last_used[hit_slots] = t
        hits = int(hit_slots.shape[0])

        # 2. Eager windowing: delete every cached neuron not used in the last `window` steps.
        stale = last_used[:old_count] <= t - self.window  # [old_count] bool
        holes = np.flatnonzero(stale).astype(_I32)  # ascending
        n_evicted = int(holes.shape[0])
        new_count = old_count - n_evicted
        if n_evicted:
            slot_of[ids[holes]] = -1
            # Holes in the tail [new_count, old_count) just vanish; live rows in the tail fill
            # the holes below new_count. Both sides have the same size by counting.
            dst = holes[: np.searchsorted(holes, new_count)]
            src = (new_count + np.flatnonzero(~stale[new_count:])).astype(_I32)
            ids[dst] = ids[src]
            last_used[dst] = last_used[src]
            slot_of[ids[dst]] = dst
            ids[new_count:old_count] = -1
            last_used[new_count:old_count] = _NEVER
        else:
            dst = src = _EMPTY

        # 3. Append the missing needed neurons while there is room; the rest go to scratch.
        missing = needed[~cached]
        n_load = min(int(missing.shape[0]), self.capacity - new_count)
        load_ids, scratch_ids = missing[:n_load], missing[n_load:]
        load_slots = np.arange(new_count, new_count + n_load, dtype=_I32)
        ids[new_count : new_count + n_load] = load_ids
        last_used[new_count : new_count + n_load] = t
        slot_of[load_ids] = load_slots
        self._count = new_count + n_load
        self._t = t + 1
        return CacheUpdate(
            moves_src=src,
            moves_dst=dst,
            load_ids=load_ids,
            load_slots=load_slots,
            scratch_ids=scratch_ids,
            evicted=n_evicted,
            hits=hits,
            count=self._count,
        )

    def _check_needed(self, needed) -> np.ndarray:
        needed = np.asarray(needed)
        if needed.ndim != 1:
            raise ValueError(f"needed must be 1-D, got shape {needed.shape}")
        if needed.shape[0] == 0:
            return _EMPTY
        if not np.issubdtype(needed.dtype, np.integer):
            raise TypeError(f"needed must hold integer neuron ids, got dtype {needed.dtype}")
        if needed[0] < 0 or needed[-1] >= self.n_neurons:
            raise ValueError(f"needed ids must lie in [0, {self.n_neurons}), got {needed[0]}..{needed[-1]}")
        if needed.shape[0] > 1 and not np.all(needed[1:] > needed[:-1]):
            raise ValueError("needed must be sorted ascending without duplicates")
        # A fresh array: load_ids/scratch_ids are views into it and must not alias the caller's.
        return needed.astype(_I32, copy=True)

    # -- helpers -------------------------------------------------------------

    @staticmethod
    def apply_moves(rows: np.ndarray, update: CacheUpdate, load_rows: np.ndarray | None = None) -> None:
        """Applies ``update`` to a host matrix ``rows`` [capacity, width] in place.

        Moves first (a simultaneous gather then scatter; sources and destinations
        are disjoint by construction), then loads: ``load_rows[i]`` (the row of
        neuron ``update.load_ids[i]``) goes to slot ``update.load_slots[i]``.
        With ``load_rows=None`` only the moves are applied (the caller writes the
        loaded rows itself).
        """
        if update.moves_src.shape[0]:
            rows[update.moves_dst] = rows[update.moves_src]
        if load_rows is not None:
            n = update.load_ids.shape[0]
            if load_rows.shape[0] != n:
                raise ValueError(f"load_rows has {load_rows.shape[0]} rows, update loads {n}")
            if n:
                rows[update.load_slots] = load_rows

    def check_invariants(self) -> None:
        """Raises AssertionError naming the first broken invariant."""

        def fail(msg):
            raise AssertionError(f"LayerNeuronCache invariant broken: {msg}")

        c, ids = self._count, self._ids
        if not 0 <= c <= self.capacity:
            fail(f"count {c} outside [0, {self.capacity}]")
        live = ids[:c]
        if c and (live.min() < 0 or live.max() >= self.n_neurons):
            fail(f"ids[:count] outside [0, {self.n_neurons}): {live.min()}..{live.max()}")
        if np.unique(live).shape[0] != c:
            fail("ids[:count] has duplicates")
        if np.any(ids[c:] != -1):
            fail("ids[count:] is not all -1")
        if np.any(self._slot_of[live] != np.arange(c)):
            fail("slot_of[ids[s]] != s for some live slot s")
        if int(np.count_nonzero(self._slot_of >= 0)) != c:
            fail("slot_of marks neurons as cached that no live slot holds")
        lu = self._last_used[:c]
        last_step = self._t - 1
        if c and (lu.max() > last_step or lu.min() <= last_step - self.window):
            fail(f"a cached neuron's last use {lu.min()}..{lu.max()} is outside the window "
                 f"({last_step - self.window}, {last_step}]")

    def __repr__(self) -> str:
        return (f"LayerNeuronCache(capacity={self.capacity}, n_neurons={self.n_neurons}, "
                f"window={self.window}, count={self._count}, steps={self._t})")
