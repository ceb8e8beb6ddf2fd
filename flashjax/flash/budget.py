"""The memory budget: parse it, and plan what it holds (resident weights, neuron caches, I/O buffers).

Everything the engine keeps for weights counts at the bytes it really occupies:
the resident parameters (in the compute dtype or as stored), each layer's neuron
cache (capacity rows, likewise), the scratch rows that stream the surplus and the
read buffers in flight (as stored). A share such as "50%" is of the model's weights
as stored (the converted model's bytes), the paper's definition. The KV cache and activations
are not weights and are not counted.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from flashjax.config import ModelConfig

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class BudgetTooSmallError(ValueError):
    """The memory budget cannot hold even the smallest working plan; `minimum_bytes` is the smallest
    budget that does (None where it is not known)."""

    def __init__(self, message: str, minimum_bytes: int | None = None):
        super().__init__(message)
        self.minimum_bytes = minimum_bytes


def parse_budget(text: str | int | float, dense_bytes: int) -> int:
    """"300MB", "2GiB", "50%" (of what the dense engine holds), or a number of bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    s = str(text).strip().lower().replace(" ", "")
    if s.endswith("%"):
        return int(float(s[:-1]) / 100 * dense_bytes)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)([a-z]*)", s)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(f"cannot read memory budget {text!r}: use bytes like 300MB or 2GiB, or a share like 50%")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def dense_weight_bytes(cfg: ModelConfig, compute_dtype) -> int:
    """What the dense engine holds for this model: every parameter in the compute dtype."""
    return cfg.param_count() * np.dtype(compute_dtype).itemsize


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    budget_bytes: int
    resident_bytes: int
    cache_rows_per_layer: int
    row_bytes: int  # one cached neuron, all its parts, in the cache's dtype
    scratch_rows: int
    io_buffer_bytes: int
    n_layers: int
    d_ffn: int
    scratch_row_bytes: int  # one streamed neuron as stored (the FFN converts it as it multiplies)

    @property
    def cache_bytes(self) -> int:
        return self.cache_rows_per_layer * self.row_bytes * self.n_layers

    @property
    def scratch_bytes(self) -> int:
        return self.scratch_rows * self.scratch_row_bytes

    @property
    def total_bytes(self) -> int:
        return self.resident_bytes + self.cache_bytes + self.scratch_bytes + self.io_buffer_bytes

    def describe(self) -> str:
        mb = lambda b: f"{b / 1e6:.1f} MB"
        return (f"memory plan: budget {mb(self.budget_bytes)}; resident weights {mb(self.resident_bytes)}; "
                f"neuron caches {self.n_layers} x {self.cache_rows_per_layer}/{self.d_ffn} rows "
                f"({mb(self.cache_bytes)}); scratch {self.scratch_rows} rows ({mb(self.scratch_bytes)}); "
                f"read buffers {mb(self.io_buffer_bytes)}; total {mb(self.total_bytes)}")


def plan_memory(cfg: ModelConfig, budget_bytes: int | None, resident_bytes: int, record_width: int,
                storage_itemsize: int, compute_itemsize: int, scratch_rows: int, prefetch_depth: int,
                max_cache_rows: int | None = None, cache_itemsize: int | None = None) -> MemoryPlan:
    """Sizes each layer's cache from what the budget leaves; `budget_bytes=None` means unlimited.
    Cached rows take `cache_itemsize` bytes per value (default: the compute dtype's).

    A mixture of experts caches whole experts (each layer's rows a multiple of `expert_ffn`) and
    reads at most its routed experts per layer in a token (the prefill streams its layers in pieces
    no larger), so its read buffers hold `prefetch_depth` times that, not whole layers."""
    row_bytes = record_width * (cache_itemsize or compute_itemsize)
    scratch_row_bytes = record_width * storage_itemsize  # streamed rows stay as stored (converted as multiplied)
    scratch_rows = min(scratch_rows, cfg.d_ffn)
    # Worst case in flight: `prefetch_depth` whole layers (the naive path reads every neuron), or
    # for a mixture of experts `prefetch_depth` sets of routed experts.
    rows_in_flight = cfg.experts_per_token * cfg.expert_ffn if cfg.is_moe else cfg.d_ffn
    io_bytes = prefetch_depth * rows_in_flight * record_width * storage_itemsize
    minimum = resident_bytes + scratch_rows * scratch_row_bytes + io_bytes
    limit = cfg.d_ffn if max_cache_rows is None else min(cfg.d_ffn, max_cache_rows)
    if budget_bytes is None:
        rows = limit
        budget_bytes = minimum + rows * row_bytes * cfg.n_layers
    else:
        if budget_bytes < minimum:
            raise BudgetTooSmallError(
                f"memory budget of {budget_bytes / 1e6:.1f} MB is too small: the minimum is "
                f"{minimum / 1e6:.1f} MB ({minimum} bytes: resident weights {resident_bytes / 1e6:.1f} MB, "
                f"scratch {scratch_rows * scratch_row_bytes / 1e6:.1f} MB, read buffers {io_bytes / 1e6:.1f} MB)",
                minimum_bytes=int(minimum))
        rows = min(limit, (budget_bytes - minimum) // (row_bytes * cfg.n_layers))
    if cfg.is_moe:
        rows -= rows % cfg.expert_ffn  # whole experts
    return MemoryPlan(budget_bytes, resident_bytes, int(rows), row_bytes, scratch_rows, io_bytes,
                      cfg.n_layers, cfg.d_ffn, scratch_row_bytes)


def choose_dtypes(resident_choice: str, cache_choice: str, compute_dtype, storage_dtype, full_rows: int,
                  plan_for) -> tuple:
    """(resident dtype, cache dtype, memory plan): what the resident weights and the cached rows are
    held in. Pure: `plan_for(resident, cache_dtype)` returns the MemoryPlan of one pairing (or raises
    BudgetTooSmallError), with `resident` the compute dtype or "stored" (matrices as stored, norms
    and biases float32).

    A fixed choice ("compute", "storage") is taken as given; "auto" keeps the compute dtype while
    every neuron's row (`full_rows` per layer) still fits the budget (no conversion per token), else
    holds rows, then resident weights too, in the storage dtype: multiplying them as stored costs
    far less than reading from disk the rows the narrower copy makes room for. Without any pairing
    that fits, the last BudgetTooSmallError (the widest minimum) is raised.
    """
    options = lambda choice, narrow: {"compute": [compute_dtype], "storage": [narrow],
                                      "auto": [compute_dtype, narrow]}[choice]
    plans, error = [], None
    for resident in options(resident_choice, "stored"):
        for cache in options(cache_choice, storage_dtype):
            try:
                plans.append((resident, cache, plan_for(resident, cache)))
            except BudgetTooSmallError as e:
                error = e
    if not plans:
        raise error
    for resident, cache, plan in plans:  # in order of preference: compute first
        if plan.cache_rows_per_layer >= full_rows:
            return resident, cache, plan
    return max(plans, key=lambda p: p[2].cache_rows_per_layer)
