"""Per-token figures of the flash engine, as a typed record, and their summary over a generation."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class TokenStats:
    """What one step of the flash engine did and where its time went."""

    io_wait_ms: float = 0.0  # the compute thread waiting for disk (or host-tier) reads
    # The paper's "memory management": cache bookkeeping, placing read rows into the caches and
    # scratch (host work on small integer arrays and row copies), not matrix arithmetic.
    memory_management_ms: float = 0.0
    select_ms: float = 0.0  # per-layer neuron selection (predictor, gate path) on the host
    total_ms: float = 0.0  # the step's period: see FlashRunner.decode
    compute_ms: float = 0.0  # total less the two above: the device's work and its dispatch
    bytes_read: int = 0
    neurons_read: int = 0
    read_ops: int = 0
    host_hits: int = 0  # neurons served by the host-RAM tier instead of the disk
    evicted: int = 0
    hits: int = 0  # needed neurons already cached
    needed: int = 0
    ahead_read: int = 0  # neurons read early from the previous layer's input (lookahead)
    ahead_used: int = 0  # ... of which the layer then needed
    missing: int = 0  # neurons the layer had to have read (lookahead or not)
    # Mixtures of experts: experts the routers chose, and the guesses of layer l+1's router applied
    # to layer l's input (how many, and how many the layer then used).
    experts_routed: int = 0
    experts_guessed: int = 0
    experts_guessed_right: int = 0
    experts_routed_guessed_layers: int = 0  # experts routed in layers that had a guess
    # With a neuron rule inside the experts (predictor, gate): the routed experts' neurons, and how
    # many of them the rule selected (the sparsity inside the experts).
    expert_neurons_routed: int = 0
    expert_neurons_selected: int = 0

    def count_read(self, read) -> None:
        """Adds a finished read's disk counters (and, with a host tier, the neurons it served)."""
        self.bytes_read += read.stats.bytes
        self.neurons_read += read.stats.neurons
        self.read_ops += read.stats.ranges
        self.host_hits += getattr(read, "host_hits", 0)


def summarize(tokens: list[TokenStats]) -> dict:
    """Means per token over a generation's decode steps, and the ratios derived from them."""
    n = len(tokens) or 1
    mean = lambda field: sum(getattr(t, field) for t in tokens) / n
    total = lambda field: sum(getattr(t, field) for t in tokens)
    needed, ahead_read = total("needed"), total("ahead_read")
    return {
        "io_ms": mean("io_wait_ms"), "memory_management_ms": mean("memory_management_ms"),
        "compute_ms": mean("compute_ms"), "step_ms": mean("total_ms"), "select_ms": mean("select_ms"),
        # Per-token time of the engine's own work; the oracle's full computation is excluded.
        "decode_ms_per_token": mean("total_ms") if tokens else None,
        "tokens_per_s": 1e3 / mean("total_ms") if tokens and mean("total_ms") else None,
        "bytes_read_per_token": mean("bytes_read"), "neurons_read_per_token": mean("neurons_read"),
        "read_ops_per_token": mean("read_ops"), "evicted_per_token": mean("evicted"),
        "cache_hit_rate": total("hits") / needed if needed else None,
        "needed_neurons_per_token": needed / n,
        # Lookahead: of the neurons a layer had to read, the share already read from the previous
        # layer's input; and how much of what was read ahead was then used.
        "lookahead_coverage": total("ahead_used") / max(1, total("missing")) if ahead_read else None,
        "lookahead_precision": total("ahead_used") / max(1, ahead_read) if ahead_read else None,
        "host_hits_per_token": mean("host_hits"),
        # The next layer's experts guessed early: precision (of the guessed, used) and recall (of the
        # used, guessed; over layers 1.., which have a guess).
        "expert_guess_precision": total("experts_guessed_right") / total("experts_guessed")
        if total("experts_guessed") else None,
        "expert_guess_recall": total("experts_guessed_right") / total("experts_routed_guessed_layers")
        if total("experts_routed_guessed_layers") else None,
        "experts_routed_per_token": mean("experts_routed"),
    }
