"""Per-layer expert cache bookkeeping for mixture-of-experts models (host side, numpy only).

A layer's FFN is its experts' neurons laid end to end (config.ModelConfig: expert e owns neurons
e * expert_ffn .. (e + 1) * expert_ffn - 1), and the engine's buffer for the layer is the same
fixed-capacity matrix of rows the neuron cache uses. Here the buffer is cut into slots of one whole
expert each: slot s holds rows s * expert_ffn .. (s + 1) * expert_ffn - 1. Slots fill in order and
are never emptied (only refilled), so rows 0..count-1 are always live, and a step's changes are
loads into whole slots: no moves. The step speaks the neuron cache's language (`CacheUpdate`), so
the engine's buffers, reads and scratch stream are the same for both.

Policy, for a step with the set of experts a token routes to:

1. Routed experts already in a slot are hits.
2. Missing experts (ascending id) take free slots first, then the slots of cached experts this token
   does not use, chosen by the policy: "lru" evicts the least recently used, "lfu" the least
   frequently used over the last `window` steps (ties: least recently used). An expert this token
   uses is never evicted.
3. Missing experts beyond the slots that can be freed go to `scratch_ids` (streamed for this token
   only, not cached): slower, never wrong.

Loads are the lowest missing expert ids, so loads and scratch together are ascending, as reads need.
"""

from __future__ import annotations

import collections

import numpy as np

from flashjax.flash.neuron_cache import CacheUpdate

_I32 = np.int32
_EMPTY = np.zeros(0, _I32)
_EMPTY.flags.writeable = False
EXPERT_POLICIES = ("lru", "lfu")


class LayerExpertCache:
    """One layer's cache of whole experts; same interface as `LayerNeuronCache`."""

    def __init__(self, capacity: int, n_neurons: int, expert_ffn: int, policy: str = "lfu", window: int = 64):
        if expert_ffn < 1 or n_neurons % expert_ffn:
            raise ValueError(f"{n_neurons} neurons are not experts of {expert_ffn}")
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        if policy not in EXPERT_POLICIES:
            raise ValueError(f"expert cache policy must be one of {', '.join(EXPERT_POLICIES)}, not {policy!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.expert_ffn, self.n_neurons, self.policy, self.window = expert_ffn, n_neurons, policy, window
        self.n_experts = n_neurons // expert_ffn
        self.n_slots = min(capacity // expert_ffn, self.n_experts)
        self.capacity = int(capacity)
        self._expert_in = np.full(self.n_slots, -1, _I32)  # expert held by each slot
        self._slot_of_expert = np.full(self.n_experts, -1, _I32)
        self._last_used = np.full(self.n_slots, -1, np.int64)
        self._filled = 0
        self._t = 0
        # Uses per expert over the last `window` steps (lfu): counts, and the steps' expert sets.
        self._uses = np.zeros(self.n_experts, np.int64)
        self._history: collections.deque = collections.deque()
        self._ids = np.full(self.capacity, -1, _I32)
        self._slot_of = np.full(self.n_neurons, -1, _I32)

    # -- state (as LayerNeuronCache) ---------------------------------------------------------------

    @property
    def ids(self) -> np.ndarray:
        """int32 [capacity]: neuron id held by each row, -1 at and beyond ``count`` (read-only view)."""
        return _read_only(self._ids)

    @property
    def slot_of(self) -> np.ndarray:
        """int32 [n_neurons]: the row holding each neuron, -1 if not cached (read-only view)."""
        return _read_only(self._slot_of)

    @property
    def count(self) -> int:
        return self._filled * self.expert_ffn

    @property
    def slot_of_expert(self) -> np.ndarray:
        """int32 [n_experts]: the slot holding each expert, -1 if not cached (read-only view)."""
        return _read_only(self._slot_of_expert)

    @property
    def experts(self) -> np.ndarray:
        """The experts cached, by slot."""
        return self._expert_in[:self._filled].copy()

    def reset(self) -> None:
        self._expert_in[:] = -1
        self._slot_of_expert[:] = -1
        self._last_used[:] = -1
        self._filled, self._t = 0, 0
        self._uses[:] = 0
        self._history.clear()
        self._ids[:] = -1
        self._slot_of[:] = -1

    # -- the step ------------------------------------------------------------------------------------

    def step(self, needed: np.ndarray) -> CacheUpdate:
        """Advances one token; ``needed`` = ascending unique neuron ids this token uses (whole experts,
        or some neurons of them: an expert is cached whole either way)."""
        needed = np.asarray(needed, np.int64)
        if needed.ndim != 1 or (len(needed) and (needed[0] < 0 or needed[-1] >= self.n_neurons)):
            raise ValueError(f"needed must be 1-D neuron ids in [0, {self.n_neurons})")
        if len(needed) > 1 and not np.all(needed[1:] > needed[:-1]):
            raise ValueError("needed must be sorted ascending without duplicates")
        f, t = self.expert_ffn, self._t
        routed = np.unique(needed // f)
        self._count_uses(routed)
        slots = self._slot_of_expert[routed]
        cached = slots >= 0
        self._last_used[slots[cached]] = t
        hits = int(np.count_nonzero(self._slot_of[needed] >= 0))
        missing = routed[~cached]

        # Slots to fill: free ones first, then victims among the cached experts this token does not use.
        free = np.arange(self._filled, self.n_slots, dtype=_I32)
        in_use = np.zeros(self._filled, bool)
        in_use[slots[cached]] = True
        candidates = np.flatnonzero(~in_use).astype(_I32)
        n_load = min(len(missing), len(free) + len(candidates))
        victims = self._victims(candidates, n_load - min(n_load, len(free)))
        targets = np.concatenate([free[:n_load], victims])
        loaded, streamed = missing[:n_load], missing[n_load:]

        evicted = self._expert_in[victims]
        self._slot_of_expert[evicted] = -1
        for e in evicted:
            self._slot_of[e * f:(e + 1) * f] = -1
        self._expert_in[targets] = loaded
        self._slot_of_expert[loaded] = targets
        self._last_used[targets] = t
        self._filled = max(self._filled, int(targets.max()) + 1 if len(targets) else 0)
        load_ids = _expert_neurons(loaded, f)
        load_slots = _expert_neurons(targets, f)
        self._ids[load_slots] = load_ids
        self._slot_of[load_ids] = load_slots
        self._t = t + 1
        streamed_neurons = needed[np.isin(needed // f, streamed)].astype(_I32)
        return CacheUpdate(moves_src=_EMPTY, moves_dst=_EMPTY, load_ids=load_ids, load_slots=load_slots,
                           scratch_ids=streamed_neurons, evicted=len(evicted) * f, hits=hits, count=self.count)

    def _count_uses(self, routed: np.ndarray) -> None:
        self._uses[routed] += 1
        self._history.append(routed)
        if len(self._history) > self.window:
            self._uses[self._history.popleft()] -= 1

    def _victims(self, candidates: np.ndarray, n: int) -> np.ndarray:
        """`n` slots of `candidates` to evict, by the policy."""
        if n <= 0:
            return _EMPTY
        last = self._last_used[candidates]
        if self.policy == "lru":
            order = np.argsort(last, kind="stable")
        else:  # fewest uses over the window first, then least recently used
            order = np.lexsort((last, self._uses[self._expert_in[candidates]]))
        return np.sort(candidates[order[:n]]).astype(_I32)

    def check_invariants(self) -> None:
        """Raises AssertionError naming the first broken invariant."""

        def fail(msg):
            raise AssertionError(f"LayerExpertCache invariant broken: {msg}")

        f, filled = self.expert_ffn, self._filled
        held = self._expert_in[:filled]
        if not 0 <= filled <= self.n_slots:
            fail(f"{filled} slots filled of {self.n_slots}")
        if np.any(held < 0) or np.any(self._expert_in[filled:] != -1):
            fail("slots below the fill mark must hold an expert, and none above it")
        if len(np.unique(held)) != filled:
            fail("an expert is in two slots")
        if np.any(self._slot_of_expert[held] != np.arange(filled)):
            fail("slot_of_expert disagrees with the slots")
        if int(np.count_nonzero(self._slot_of_expert >= 0)) != filled:
            fail("slot_of_expert marks experts no slot holds")
        want_ids = _expert_neurons(held, f)
        if np.any(self._ids[:filled * f] != want_ids) or np.any(self._ids[filled * f:] != -1):
            fail("row ids are not the slots' experts' neurons")
        if int(np.count_nonzero(self._slot_of >= 0)) != filled * f or (
                filled and np.any(self._slot_of[want_ids] != np.arange(filled * f))):
            fail("slot_of disagrees with the row ids")
        if np.any(self._uses < 0) or len(self._history) > self.window:
            fail("use counts over the window are broken")

    def __repr__(self) -> str:
        return (f"LayerExpertCache({self.n_slots} slots of {self.expert_ffn} rows, {self.n_experts} experts, "
                f"policy={self.policy}, filled={self._filled}, steps={self._t})")


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def _expert_neurons(experts: np.ndarray, expert_ffn: int) -> np.ndarray:
    """The neuron (or row) ids of experts (or slots), in their order: e * F .. (e + 1) * F - 1 each."""
    experts = np.asarray(experts, np.int64)
    return (experts[:, None] * expert_ffn + np.arange(expert_ffn)).reshape(-1).astype(_I32)
