"""The flash runner: prefill and decode with FFN neurons read from disk into per-layer caches.

One decode step, layer by layer: attention on the resident weights -> the
selector's neuron set -> the layer's cache says what is missing (windowing) ->
the prefetch thread has already issued those reads when the set was known
ahead -> rows land in the layer's preallocated device buffer (one jitted
scatter, no reallocation) -> the FFN runs over the cached rows plus any
surplus streamed through scratch -> next layer.

Implements `runner_protocol.Runner`, as the dense runner does, so the generation loop is shared.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from flashjax.config import EngineConfig
from flashjax.engine import ensure_kv_cache, kv_capacity, pad_prompt, prompt_positions, sampling_args
from flashjax.flash import kernels
from flashjax.flash.budget import choose_dtypes, parse_budget, plan_memory
from flashjax.flash.reader import NeuronReader
from flashjax.flash.selection import NaiveSelector, OracleSelector
from flashjax.flash.sparse_ffn import SparseFFN, scratch_bucket, update_bucket, whole_blocks
from flashjax.flash.stats import TokenStats, summarize
from flashjax.flash.shards import NeuronPartition, ShardPlacer, make_mesh
from flashjax.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class FlashOptions:
    sparsity: str = "oracle"  # "naive" | "hybrid" (naive + a cache of what fits) | "oracle" | "predictor" | "gate"
    memory_budget: str | int | None = None  # bytes, "300MB", "2GiB", "50%"; None: unlimited
    window: int = 5  # tokens whose neurons stay cached (the paper uses 4-5)
    prefetch_depth: int = 2  # layers whose reads may be in flight ahead of the compute
    scratch_rows: int = 512  # neurons streamed per scratch chunk
    concurrency: int = 32  # TensorStore file reads in flight
    # oracle: |activation| above this counts as active; "calibrated": the per-layer thresholds
    # `flashjax calibrate` stored (its target sparsity by the true magnitudes).
    threshold: float | str = 0.0
    evict_page_cache: bool = False  # before each token: cold reads, honest figures
    verify: bool = True  # check every shard's checksum when opening
    # predictor / gate selection (see flashjax.sparsity.Selection): a threshold on the predictor's
    # sigmoid, or each token's top-k (k defaults to the calibrated active count) times over_select.
    selection: str = "threshold"
    predictor_threshold: float = 0.2  # measured on the default model: +0.3% perplexity unbudgeted, +2.6% at 65% (0.5: +15%, +59%)
    top_k: int | None = None
    over_select: float = 1.0
    lookahead: bool = True  # predictor: start reading layer l+1 from layer l's input
    # Devices whose memory holds the neuron caches: each layer's neurons split across them
    # (flash/shards.py); the memory budget is then what each device may hold.
    devices: int = 1
    # A host-RAM tier of neuron blocks between the device caches and the disk (bytes, "4GB", or a
    # share of the on-disk FFN like "100%"); None: none. For accelerators, where host RAM is the
    # bigger, slower memory (store/host_tier.py).
    host_cache: str | int | None = None
    staging: str = "auto"  # "pinned" | "direct": host memory the rows land in before the device copy
    # What the resident weights and the cached rows are held in: the compute dtype ("compute": no
    # conversion per token) or the storage dtype ("storage", e.g. float16: half the memory, converted
    # as they are multiplied). "auto" picks per budget (FlashRunner._choose_dtypes).
    resident_dtype: str = "auto"
    cache_dtype: str = "auto"
    # Mixture of experts: which cached expert leaves when a routed one needs its slot (flash/expert_cache.py).
    # LFU measured a higher hit rate and a faster token than LRU on the synthetic OLMoE (benchmarks/bench_moe.py).
    expert_policy: str = "lfu"

    def __post_init__(self):
        if self.window < 1:
            raise ValueError(f"window must be at least 1 token, got {self.window}")
        if self.scratch_rows < 16:
            raise ValueError(f"scratch_rows must be at least 16, got {self.scratch_rows}")
        if self.prefetch_depth < 1 or self.concurrency < 1:
            raise ValueError("prefetch_depth and concurrency must be at least 1")
        for name in ("resident_dtype", "cache_dtype"):
            if getattr(self, name) not in ("auto", "compute", "storage"):
                raise ValueError(f"{name} must be auto, compute or storage, not {getattr(self, name)!r}")
        if self.devices < 1:
            raise ValueError(f"devices must be at least 1, got {self.devices}")
        from flashjax.flash.expert_cache import EXPERT_POLICIES
        if self.expert_policy not in EXPERT_POLICIES:
            raise ValueError(f"expert_policy must be one of {', '.join(EXPERT_POLICIES)}, not {self.expert_policy!r}")


MOE_SPARSITY = ("naive", "hybrid", "predictor", "gate")


def _check_moe_options(options: FlashOptions) -> None:
    """What the flash engine does with a mixture of experts: experts chosen by the router, read every
    token (naive) or cached whole (hybrid; predictor and gate too, which also cut each streamed
    expert to the neurons their rule selects), on one device."""
    if options.sparsity not in MOE_SPARSITY:
        raise ValueError(f"--sparsity {options.sparsity} is not available for mixture-of-experts models: their router "
                         f"chooses the experts; use hybrid (experts cached under the budget), naive (read every "
                         f"token), predictor or gate (hybrid, with only the selected neurons of a streamed expert "
                         f"read), or dense")
    if options.devices != 1 or options.host_cache is not None:
        raise ValueError("mixture-of-experts models run the flash engine on one device without a host tier")


class FlashRunner:
    def __init__(self, flash_model, options: FlashOptions, engine_cfg: EngineConfig, verbose: bool = False,
                 oracle_params=None):
        cfg = flash_model.config
        self.cfg, self.options, self.engine_cfg = cfg, options, engine_cfg
        if cfg.is_moe:
            _check_moe_options(options)
        # Each layer's attention runs with its own config (window, RoPE base); layers alike share one.
        self.layer_cfgs = [cfg.layer_config(l) for l in range(cfg.n_layers)]
        self.layer_kinds = list(dict.fromkeys(self.layer_cfgs))
        self.compute_dtype = jnp.dtype(engine_cfg.compute_dtype)
        self.mesh = make_mesh(options.devices)
        self.placer = ShardPlacer(self.mesh, options.staging)
        self.store = flash_model.ffn_store(concurrency=options.concurrency)
        if options.host_cache is not None:
            from flashjax.store.host_tier import wrap_host_tier
            self.store = wrap_host_tier(self.store, options.host_cache)
        layout = self.store.layout
        self.part_slices = kernels.RecordPart.of_layout(layout)
        self.partition = NeuronPartition.make(cfg.d_ffn, self.store.ffn_block, options.devices)
        # A budget's "50%" is half of the model's weights as stored (the paper's DRAM share of the model).
        self.dense_bytes = flash_model.stored_weight_bytes()
        self.selector = self._make_selector(flash_model, options, oracle_params)
        self.rules = self._device_rules() if self.selector.per_layer else None
        self.expert_rules = self._expert_rules() if cfg.is_moe else None
        budget = None if options.memory_budget is None else parse_budget(options.memory_budget, self.dense_bytes)
        self.resident_dtype, self.cache_dtype, self.plan = self._choose_dtypes(flash_model, budget)
        self.params = self.placer.replicate(flash_model.load_resident(self.resident_dtype))
        if verbose:
            per_device = f" per device, {options.devices} devices" if options.devices > 1 else ""
            if budget is not None:
                print(f"flashjax: budget {options.memory_budget} = {budget / 1e6:.1f} MB; the model's weights as "
                      f"stored ({flash_model.manifest.dtype}) are {self.dense_bytes / 1e6:.1f} MB", file=sys.stderr)
            print(f"flashjax: {self.plan.describe()}{per_device}; resident weights held "
                  f"{self._dtype_name(self.resident_dtype)}, cached rows {self._dtype_name(self.cache_dtype)}",
                  file=sys.stderr)
        self.ffn = SparseFFN(cfg, self.mesh, self.placer, self.partition, self.part_slices, self.plan,
                             self.cache_dtype, options.window, options.expert_policy)
        self.reader = NeuronReader(self.store, options.prefetch_depth)
        self.kv = None
        self._warm = False
        self._last_step_end = None
        self.token_stats: list[TokenStats] = []

    def _plan(self, budget, resident_bytes: int, cache_dtype):
        # Predictors and a resident gate projection are held in memory too: they count. With several
        # devices the plan is per device: each holds the (replicated) resident part and its share of
        # the caches.
        opts, store = self.options, self.store
        return plan_memory(self.cfg, budget, resident_bytes + getattr(self.selector, "nbytes", 0),
                           store.record_width, store.dtype.itemsize, self.compute_dtype.itemsize, opts.scratch_rows,
                           opts.prefetch_depth,
                           max_cache_rows=0 if opts.sparsity == "naive" else self.partition.max_size,
                           cache_itemsize=np.dtype(cache_dtype).itemsize)

    @staticmethod
    def _dtype_name(dtype) -> str:
        return "as stored" if isinstance(dtype, str) else np.dtype(dtype).name

    def _choose_dtypes(self, flash_model, budget):
        """(resident dtype, cache dtype, memory plan): see budget.choose_dtypes."""
        compute = self.compute_dtype
        # Resident weights "as stored": matrices in the storage dtype, norm scales and biases float32.
        resident_bytes = {compute: flash_model.resident_nbytes(compute), "stored": flash_model.resident_nbytes("stored")}
        full = self.partition.max_size if self.options.sparsity != "naive" else 0
        choices = (self.options.resident_dtype, self.options.cache_dtype)
        if flash_model.quantized:
            # Quantized weights are always held as stored: a float copy would cost 4-8x the memory.
            choices = ("storage", "storage")
        return choose_dtypes(*choices, compute, self.store.dtype, full,
                             lambda resident, cache: self._plan(budget, resident_bytes[resident], cache))

    @staticmethod
    def _make_selector(flash_model, options, oracle_params):
        cfg = flash_model.config
        if cfg.is_moe:
            from flashjax.flash.selection import RouterSelector
            neurons = None
            if options.sparsity in ("predictor", "gate"):
                neurons = FlashRunner._neuron_selector(flash_model, options, moe=True)
            return RouterSelector(cfg, neurons)
        if options.sparsity in ("naive", "hybrid"):
            # Hybrid is naive with a cache: the neurons that fit stay for good (every token needs
            # them all, so they never leave the window) and the rest stream from disk every token.
            return NaiveSelector(cfg)
        if options.sparsity == "oracle":
            if oracle_params is None:
                from flashjax.model.params import load_params
                from flashjax.store import open_flash_source
                oracle_params = load_params(open_flash_source(flash_model.path, verify=False), progress=False)
            threshold = options.threshold
            if threshold == "calibrated":
                from flashjax.sparsity import require_predictors
                threshold = require_predictors(flash_model.path, verify=options.verify).thresholds
            return OracleSelector(cfg, oracle_params, threshold)
        if options.sparsity in ("predictor", "gate"):
            return FlashRunner._neuron_selector(flash_model, options)
        raise ValueError(f"unknown sparsity {options.sparsity!r} for the flash engine; "
                         f"use naive, hybrid, oracle, predictor or gate (dense runs everything resident)")

    @staticmethod
    def _neuron_selector(flash_model, options, moe: bool = False):
        """The predictors' (or the gate path's) per-layer neuron rule, from `flashjax calibrate`. A
        mixture of experts uses no lookahead predictors (the next layer's router guess starts its
        reads), so they are dropped rather than held: what is held counts in the budget."""
        from flashjax.flash.selection import GatePathSelector, PredictorSelector
        from flashjax.sparsity import Selection, require_predictors

        predictors = require_predictors(flash_model.path, verify=options.verify)
        if moe:
            predictors = dataclasses.replace(predictors, lookahead=None)
        selection = Selection(mode=options.selection, threshold=options.predictor_threshold,
                              top_k=options.top_k, over_select=options.over_select)
        if options.sparsity == "gate":
            return GatePathSelector(flash_model.path, predictors, selection)
        return PredictorSelector(predictors, selection, options.lookahead and not moe)

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self, capacity: int) -> None:
        self.kv = ensure_kv_cache(self.kv, self.cfg, capacity, self.compute_dtype, self.placer.replicated)
        self.selector.start(capacity)
        self.ffn.reset()
        self.token_stats = []
        self._last_step_end = None

    def warm_up(self, sampling: SamplingParams, key) -> None:
        """Compiles every shape a decode step can meet (cache-update buckets, the whole-layer step and
        the FFN step with and without each scratch bucket, the head) on throwaway inputs before any
        timing starts."""
        if self._warm:
            return
        cfg, cap, width = self.cfg, self.plan.cache_rows_per_layer, self.store.record_width
        n_dev = self.options.devices
        for size in sorted({update_bucket(1 << k) for k in range(0, max(cap, 1).bit_length() + 1)}) if cap else []:
            drop = np.full((n_dev, size), cap, np.int32)  # every destination out of range: no change
            self.ffn.buffers[0] = kernels.update_cache(self.mesh, self.part_slices, self.ffn.buffers[0], *self.placer.shards(
                np.zeros((n_dev, size), np.int32), drop, drop, np.zeros((n_dev, size, width), self.store.dtype)))
        x = self.placer.replicate(jnp.zeros((1, 1, cfg.d_model), self.compute_dtype))
        positions = np.zeros((1, 1), np.int32)
        cached = (self.ffn.buffers[0], self.placer.shards(np.zeros(n_dev, np.int32))[0]) if cap else None
        s_rows = self.plan.scratch_rows
        chunks = [None] + [self.placer.shards(np.zeros((n_dev, size, width), self.store.dtype), np.zeros(n_dev, np.int32))
                           for size in sorted({scratch_bucket(1 << k, s_rows) for k in range(0, s_rows.bit_length() + 1)})]
        layer0 = self.params["layers"][0]
        b_down, post_norm = layer0["ffn"].get("b_down"), layer0.get("post_ffn_norm")
        so_far = jnp.zeros_like(x)
        if cfg.is_moe:
            self._warm_up_experts(x, positions, cached, chunks, layer0)
            chunks = []  # the whole-layer and selecting steps below are for dense FFNs
        pace = self.ffn.pace  # these steps run too (collectives across processes): one in flight
        for chunk in chunks:
            for layer_cfg in self.layer_kinds:  # one compile per kind of layer (Gemma's sliding and global)
                kv = jax.tree.map(jnp.copy, self.kv[0])
                pace(kernels.layer_step, layer_cfg, self.mesh, self.part_slices, layer0, x, positions, np.int32(0),
                     kv, cached, chunk)
            # chunks past the first
            pace(kernels.ffn_step, cfg, self.mesh, self.part_slices, post_norm, (x, so_far), x, None, None, chunk)
            if self.selector.per_layer:  # attention apart, then the FFN over what the layer's input chose
                for maybe_cached in ([None] if cached is None else [None, cached]):
                    pace(kernels.ffn_step, cfg, self.mesh, self.part_slices, post_norm, (x, None), x, b_down,
                         maybe_cached, chunk)
        if self.selector.per_layer:
            for (select, rule), ahead in self.rules:  # layers' predictors may differ in rank: each shape
                for layer_cfg in self.layer_kinds:
                    kv = jax.tree.map(jnp.copy, self.kv[0])
                    kernels.attention_select_step(layer_cfg, select, None if ahead is None else ahead[0], layer0,
                                                  x, positions, np.int32(0), kv, rule,
                                                  None if ahead is None else ahead[1])
        kernels.embed_tokens(cfg, self.params, np.zeros((1, 1), np.int32), positions, self.compute_dtype)
        kernels.head(cfg, self.params, x, np.int32(0), *sampling_args(key, 0, sampling), greedy=sampling.greedy)
        self._warm = True

    def _warm_up_experts(self, x, positions, cached, chunks, layer0) -> None:
        """A mixture of experts' decode shapes: attention with the router (and the next layer's, but
        for the last layer), and the FFN step over the cached experts and each scratch bucket, each
        row with its expert."""
        n_dev = self.options.devices
        post_norm = layer0.get("post_ffn_norm")
        for layer_cfg in self.layer_kinds:
            for next_router in ([layer0["ffn"]["router"], None] if self.cfg.n_layers > 1 else [None]):
                kv = jax.tree.map(jnp.copy, self.kv[0])
                _, h, _, weights, _, _ = kernels.attention_route_step(layer_cfg, layer0, next_router, x, positions,
                                                                      np.int32(0), kv)
        self._warm_up_expert_rules(x, positions, layer0)
        if cached is not None:
            cached = cached + self.placer.shards(*self.ffn.routed_slots(0, None))
        for chunk in chunks:
            if chunk is not None:
                chunk = chunk + self.placer.shards(np.zeros((n_dev, chunk[0].shape[1]), np.int32))
            for maybe_cached in ([None] if cached is None else [None, cached]):
                for so_far in (None, jnp.zeros_like(x)):
                    kernels.ffn_step(self.cfg, self.mesh, self.part_slices, post_norm, (x, so_far), h,
                                     layer0["ffn"].get("b_down"), maybe_cached, chunk, weights)

    def _warm_up_expert_rules(self, x, positions, layer0) -> None:
        """With a neuron rule inside the experts, each decode variant of the routing step: every
        layer's rule (layers' predictors may differ in rank: each shape), with the next layer's
        router but for the last layer, as `_routing_layer` calls it."""
        n = self.cfg.n_layers
        for l, rule in enumerate(self.expert_rules):
            if rule is None:
                continue
            select, arrays = rule
            next_router = layer0["ffn"]["router"] if l + 1 < n else None
            kv = jax.tree.map(jnp.copy, self.kv[0])
            kernels.attention_route_step(self.layer_cfgs[l], layer0, next_router, x, positions, np.int32(0), kv,
                                         select, arrays)

    def compile_count(self) -> int:
        fns = (kernels.embed_tokens, kernels.attention_select_step, kernels.attention_route_step, kernels.layer_step,
               kernels.ffn_step, kernels.update_cache, kernels.head)
        return sum(f._cache_size() for f in fns)

    # ---- one token ------------------------------------------------------------------------------

    def _plan_ahead(self, needed_ahead, update_caches: bool, stats):
        """For neuron sets known before the token starts (naive, hybrid, oracle, prefill): every
        layer's cache updates (None when the caches are left alone), the ids this process reads,
        and each device's count of streamed records (`SparseFFN.stream_lengths`)."""
        t0 = time.perf_counter()
        updates, read_ids, lengths = [], [], []
        for l, needed in enumerate(needed_ahead):
            if update_caches:
                updates.append(self.ffn.step_caches(l, needed))
                read_ids.append(self.ffn.read_ids(updates[l]))
                stats.needed += len(needed)
            else:
                updates.append(None)
                read_ids.append(self.ffn.local_ids(self.partition.split(needed)))
            lengths.append(self.ffn.stream_lengths(updates[l], needed))
        stats.memory_management_ms += (time.perf_counter() - t0) * 1e3
        return updates, read_ids, lengths

    def _layers(self, x, positions, start, ahead, stats):
        """Runs every layer; returns x.

        `ahead`: (every layer's cache updates, ids to read, stream lengths) from `_plan_ahead` when the neuron sets
        were known before the token started (naive, hybrid, oracle, prefill): all reads go to the
        prefetch thread at once and run ahead of the compute, and each layer is one dispatch
        (attention and FFN together). None: the selector picks per layer from that layer's FFN
        input, so attention runs as its own step; with lookahead, layer l+1's predicted reads are
        issued as soon as layer l's input is known.
        """
        if ahead is not None:
            updates, read_ids, lengths = ahead
            self.reader.submit(read_ids)
        for l, layer in enumerate(self.params["layers"]):
            weights = None
            if ahead is not None:
                x, h, partial, chunks = self._planned_layer(l, layer, x, positions, start, updates[l], read_ids[l],
                                                            lengths[l], stats)
            elif self.cfg.is_moe:
                x, h, partial, chunks, weights = self._routing_layer(l, layer, x, positions, start, stats)
            else:
                x, h, partial, chunks = self._selecting_layer(l, layer, x, positions, start, stats)
            if len(chunks) > 1:
                x = self.ffn.remaining_chunks(x, partial, h, layer.get("post_ffn_norm"), chunks, weights)
        return x

    # ---- mixtures of experts ---------------------------------------------------------------------

    def _expert_neurons(self, experts: np.ndarray) -> np.ndarray:
        f = self.cfg.expert_ffn
        return (np.asarray(experts, np.int64)[:, None] * f + np.arange(f)).reshape(-1)

    def _expert_rules(self):
        """Per layer: the neuron rule inside its routed experts, on the mesh, or None (naive, hybrid)."""
        rules = []
        for l in range(self.cfg.n_layers):
            rule = self.selector.rule(l)
            rules.append(None if rule is None else (rule.fn, (self.placer.replicate(rule.params), rule.value)))
        return rules

    def _routing_layer(self, l, layer, x, positions, start, stats):
        """A mixture-of-experts layer in a decode step: attention and the router in one dispatch (with
        layer l+1's router applied early to this layer's input, and the layer's neuron rule if any);
        the host learns the experts (and the neuron mask), the caches take them, the reads not
        already started by the previous layer's guess are issued, the next layer's guessed experts
        start reading, then the FFN over the cached experts and the streamed ones, each row weighed
        by its expert's router weight. With a neuron rule a streamed expert is read, and multiplied,
        only at the neurons the rule selects; a cached one whole."""
        cfg = self.cfg
        next_router = self.params["layers"][l + 1]["ffn"]["router"] if l + 1 < cfg.n_layers else None
        select, rule = self.expert_rules[l] if self.expert_rules[l] is not None else (None, None)
        x, h, self.kv[l], weights, guess, mask = kernels.attention_route_step(
            self.layer_cfgs[l], layer, next_router, x, positions, start, self.kv[l], select, rule)
        t0 = time.perf_counter()
        # The one wait per layer: the host learns which experts this layer (and, guessed, the next)
        # uses, and which of their neurons the rule selects.
        routed, guessed, mask = jax.device_get((weights[0, -1], None if guess is None else guess[0, -1], mask))
        experts = np.flatnonzero(routed > 0)
        predicted = self.reader.predicted_for(l)
        if predicted is not None:
            stats.experts_guessed += len(predicted)
            stats.experts_guessed_right += int(np.isin(predicted, experts).sum())
            stats.experts_routed_guessed_layers += len(experts)
        stats.experts_routed += len(experts)
        stats.select_ms += (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        needed = self._expert_neurons(experts)
        if mask is not None:
            stats.expert_neurons_routed += len(needed)
            stats.expert_neurons_selected += int(np.count_nonzero(mask[needed]))
        updates = self.ffn.step_caches(l, needed, stream_only=mask)
        read_ids = self.ffn.read_ids(updates)
        stats.memory_management_ms += (time.perf_counter() - t0) * 1e3
        rows = self.reader.take(l, read_ids, stats)
        if guessed is not None:
            next_experts = np.flatnonzero(guessed > 0)
            self.reader.expect(l + 1, self._guess_reads(l + 1, next_experts), next_experts)
        stats.needed += len(needed)
        cached, surplus = self.ffn.update(l, updates, rows, read_ids, stats, routed=experts)
        loads = len(updates[0].load_ids)
        chunks = self.ffn.scratch_chunks(surplus, self.ffn.stream_lengths(updates), [read_ids[loads:]])
        x, partial = self.ffn.pace(kernels.ffn_step, cfg, self.mesh, self.part_slices, layer.get("post_ffn_norm"),
                                   (x, None), h, layer["ffn"].get("b_down"), cached, chunks[0] if chunks else None,
                                   weights)
        return x, h, partial, chunks, weights

    def _guess_reads(self, l: int, experts: np.ndarray) -> np.ndarray:
        """What to start reading for layer l's guessed experts: only what its caches lack; the reads
        overlap the layer before's compute. With a neuron rule, a streamed expert is read only at
        the neurons the rule picks from layer l's own input, not known yet: whole experts read early
        would undo that sparsity, so the guess reads only when every missing routed expert is sure
        to be loaded whole, i.e. the layer has a slot for each of a token's experts (the guess is
        still kept, for its precision and recall)."""
        if self.expert_rules[l] is not None and self.ffn.caches[l][0].n_slots < self.cfg.experts_per_token:
            return np.zeros(0, np.int64)
        return self.ffn.uncached(l, self._expert_neurons(experts))

    def _moe_prefill_layers(self, x, positions):
        """The prompt through a mixture of experts: per layer, attention and the router for every
        token, then every expert's records streamed in scratch-sized pieces (the prompt's tokens
        together route to nearly all of them), weighed per token; the caches are left alone. The
        prefetch thread reads the pieces ahead, `prefetch_depth` at a time, so memory stays bounded."""
        cfg, s_rows = self.cfg, self.plan.scratch_rows
        pieces = [np.arange(b, min(b + s_rows, cfg.d_ffn)) for b in range(0, cfg.d_ffn, s_rows)]
        for l in range(cfg.n_layers):
            for ids in pieces:
                self.reader.prefetcher.submit(l, ids)
        stats = TokenStats()
        for l, layer in enumerate(self.params["layers"]):
            # The prompt multiplies every expert's neurons whole, as a dense model's prompt does.
            x, h, self.kv[l], weights, _, _ = kernels.attention_route_step(self.layer_cfgs[l], layer, None, x,
                                                                           positions, np.int32(0), self.kv[l])
            partial = (x, None)
            for i, ids in enumerate(pieces):
                chunk, = self.ffn.scratch_chunks([self.reader.next_layer(stats)], [len(ids)], [ids])
                x, partial = self.ffn.pace(kernels.ffn_step, cfg, self.mesh, self.part_slices,
                                           layer.get("post_ffn_norm"), partial, h,
                                           layer["ffn"].get("b_down") if i == 0 else None, None, chunk, weights)
        return x

    def _planned_layer(self, l, layer, x, positions, start, updates, read_ids, lengths, stats):
        """A layer whose reads were submitted when the token started: one dispatch for all of it."""
        rows = self.reader.next_layer(stats)
        cached, surplus = self.ffn.update(l, updates, rows, read_ids, stats)
        chunks = self.ffn.scratch_chunks(surplus, lengths)
        x, h, self.kv[l], partial = self.ffn.pace(kernels.layer_step, self.layer_cfgs[l], self.mesh,
                                                  self.part_slices, layer, x, positions, start, self.kv[l], cached,
                                                  chunks[0] if chunks else None)
        return x, h, partial, chunks

    def _device_rules(self):
        """Per layer: (its own rule, the lookahead rule guessing layer l+1 or None), on the mesh."""
        sel, n = self.selector, self.cfg.n_layers

        def placed(rule):
            return None if rule is None else (rule.fn, (self.placer.replicate(rule.params), rule.value))

        return [(placed(sel.rule(l)), placed(sel.ahead_rule(l + 1)) if l + 1 < n else None) for l in range(n)]

    def _selecting_layer(self, l, layer, x, positions, start, stats):
        """A layer that chooses its neurons from its own FFN input: attention and the choice in one
        dispatch, then the reads (some already started by the previous layer's lookahead), then the
        FFN. Only the masks cross to the host: the caches' bookkeeping needs the whole needed set."""
        cfg = self.cfg
        (select, rule), ahead = self.rules[l]
        ahead_fn, ahead_rule = ahead if ahead is not None else (None, None)
        x, h, self.kv[l], needed, predicted_next = kernels.attention_select_step(
            self.layer_cfgs[l], select, ahead_fn, layer, x, positions, start, self.kv[l], rule, ahead_rule)
        t0 = time.perf_counter()
        # The one wait per layer: the host learns which neurons this layer (and the next) needs.
        needed, predicted_next = jax.device_get((self.placer.local_copy(needed),
                                                 None if ahead is None else self.placer.local_copy(predicted_next)))
        needed = np.flatnonzero(needed)
        predicted = self.reader.predicted_for(l)
        if predicted is not None:
            # What the lookahead predicted is used too: its reads are not wasted, and the extra
            # neurons only bring the FFN closer to dense.
            needed = np.union1d(needed, predicted)
        stats.select_ms += (time.perf_counter() - t0) * 1e3
        t0 = time.perf_counter()
        updates = self.ffn.step_caches(l, needed)
        read_ids = self.ffn.read_ids(updates)
        stats.memory_management_ms += (time.perf_counter() - t0) * 1e3
        rows = self.reader.take(l, read_ids, stats)
        if predicted_next is not None:
            # Only what layer l+1's caches lack; its reads overlap this layer's compute. Whole blocks
            # are read anyway, so keep all their rows: a neuron the lookahead missed but that shares
            # a block with one it caught is then not read a second time.
            next_ids = np.flatnonzero(predicted_next)
            missing = whole_blocks(self.ffn.uncached(l + 1, next_ids), self.store.ffn_block, cfg.d_ffn)
            self.reader.expect(l + 1, missing, next_ids)
        stats.needed += len(needed)
        cached, surplus = self.ffn.update(l, updates, rows, read_ids, stats)
        chunks = self.ffn.scratch_chunks(surplus, self.ffn.stream_lengths(updates))
        x, partial = self.ffn.pace(kernels.ffn_step, cfg, self.mesh, self.part_slices, layer.get("post_ffn_norm"),
                                   (x, None), h, layer["ffn"].get("b_down"), cached, chunks[0] if chunks else None)
        return x, h, partial, chunks

    def prefill(self, prompt: np.ndarray, sampling: SamplingParams, key):
        self._last_step_end = None  # a new sequence: the first decode's period starts at that decode
        tokens = pad_prompt(prompt, self.engine_cfg.prefill_block, kv_capacity(self.kv))
        padded = tokens.shape[1]
        self.selector.prefill(tokens[0, :len(prompt)])
        positions = prompt_positions(padded, len(prompt))
        x = kernels.embed_tokens(self.cfg, self.params, tokens, positions, self.compute_dtype)
        if self.cfg.is_moe:
            x = self._moe_prefill_layers(x, positions)
        else:
            # The prompt's tokens together use nearly every neuron: stream each whole layer once, uncached.
            everything = [np.arange(self.cfg.d_ffn)] * self.cfg.n_layers
            stats = TokenStats()
            x = self._layers(x, positions, np.int32(0), self._plan_ahead(everything, False, stats), stats)
        return self._here(kernels.head(self.cfg, self.params, x, np.int32(len(prompt) - 1),
                                       *sampling_args(key, len(prompt) - 1, sampling), greedy=sampling.greedy))

    def _here(self, out):
        """(token, logits), replicated on the mesh -> this process's copy, which host code reads."""
        return jax.tree.map(self.placer.local_copy, out)

    def decode(self, token, pos: int, sampling: SamplingParams, key):
        """One token. Nothing here waits for the device: like the dense engine, the step is dispatched
        and the caller reads the token when it needs it, so this token's host work (reads, cache
        bookkeeping) overlaps the previous token's compute. Only the oracle (a measuring device)
        needs the token id on the host."""
        if self.options.evict_page_cache:
            self.store.evict_page_cache()
        # Outside the timings: the oracle is a measuring device. Per-layer selectors return None here.
        needed = self.selector.begin(int(token[0]) if self.selector.needs_token else None, pos)
        t0 = time.perf_counter()
        stats = TokenStats()
        ahead = None if needed is None else self._plan_ahead(needed, True, stats)
        positions = np.full((1, 1), pos, np.int32)
        # The token stays on the device (no wait for it); on several devices it is copied to all of them.
        tokens = self.placer.replicate(jnp.reshape(token, (1, 1)))
        x = kernels.embed_tokens(self.cfg, self.params, tokens, positions, self.compute_dtype)
        x = self._layers(x, positions, np.int32(pos), ahead, stats)
        out = self._here(kernels.head(self.cfg, self.params, x, np.int32(0), *sampling_args(key, pos, sampling),
                                      greedy=sampling.greedy))
        # The token's period: from the end of the previous step's dispatch (or this step's start) to
        # the end of this one's. With steps dispatched ahead, that is what a token costs.
        now = time.perf_counter()
        since = t0 if self._last_step_end is None else self._last_step_end
        self._last_step_end = now
        stats.total_ms = (now - since) * 1e3
        stats.compute_ms = max(0.0, stats.total_ms - stats.io_wait_ms - stats.memory_management_ms)
        self.token_stats.append(stats)
        return out

    def stats(self) -> dict:
        """The plan, and per-token means over the decode steps since `start` (flash/stats.py)."""
        return {
            "sparsity": self.options.sparsity,
            "memory_budget_bytes": self.plan.budget_bytes,
            "weights_bytes": self.plan.total_bytes,
            "resident_bytes": self.plan.resident_bytes,
            "cache_rows_per_layer": self.plan.cache_rows_per_layer,
            **summarize(self.token_stats),
            "ffn_bytes": self.cfg.n_layers * self.cfg.d_ffn * self.store.record_nbytes,
            # Per device when devices > 1: weights_bytes, memory_budget_bytes, cache_rows_per_layer.
            "devices": self.options.devices,
            "resident_dtype": self._dtype_name(self.resident_dtype),
            "cache_dtype": self._dtype_name(self.cache_dtype),
            "platform": self.placer.mesh.devices.flat[0].platform,
            "staging": self.placer.staging,
            "host_cache_bytes": getattr(self.store, "nbytes", 0) if self.options.host_cache is not None else 0,
            **self._expert_sparsity(),
        }

    def _expert_sparsity(self) -> dict:
        """A mixture of experts with a neuron rule: the share of the routed experts' neurons it
        selected (what a streamed expert reads; a cached one multiplies whole), per decode token."""
        if not self.cfg.is_moe or all(rule is None for rule in self.expert_rules):
            return {}
        routed = sum(t.expert_neurons_routed for t in self.token_stats)
        selected = sum(t.expert_neurons_selected for t in self.token_stats)
        n = len(self.token_stats) or 1
        return {"expert_neurons_routed_per_token": routed / n, "expert_neurons_selected_per_token": selected / n,
                "expert_neurons_selected_share": selected / routed if routed else None}

    one_pass_logits = False  # scored step by step: sparsity acts in decode steps

    def sequence_logits(self, tokens):
        raise NotImplementedError("the flash engine scores step by step (prefill + decode)")

    def close(self) -> None:
        self.reader.close()
