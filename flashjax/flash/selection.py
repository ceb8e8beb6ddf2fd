"""How the flash engine chooses the neurons a token needs (`--sparsity`). Pluggable: a selector's
`begin(token, pos)` either returns every layer's set when the token starts (naive, oracle), which
lets the prefetch thread read layers ahead of the compute, or returns None and picks per layer from
that layer's FFN input. Per-layer selectors pick on the device: `rule(layer)` (and `ahead_rule(layer)`
for lookahead reads) is a `MaskRule` the runner's jitted layer step evaluates right after attention,
so the scores, the threshold or top-k and the mask cost no dispatch of their own and only the mask
crosses to the host. `needed(layer, h)` is the same choice made outside the step (tests, tools).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from flashjax.config import GATED_ACTIVATIONS, ModelConfig
from flashjax.engine import kv_capacity, pad_prompt, prompt_positions
from flashjax.model.layers import dense_ffn_apply
from flashjax.model.transformer import forward, init_kv_cache
from flashjax.sparsity.gate import gate_mask, gate_topk_mask
from flashjax.sparsity.predictor import predictor_threshold_mask, predictor_topk_mask

SPARSITY_MODES = ("dense", "naive", "hybrid", "oracle", "predictor", "gate")


@dataclasses.dataclass(frozen=True)
class MaskRule:
    """One layer's neuron choice as a jitted step computes it: bool [F] = fn(params, h, value).

    `fn` is a module-level function (static under jit, so every layer shares one compiled step per
    kind of rule); `params` are that layer's arrays (predictor factors, or the resident gate rows);
    `value` the threshold (float32) or k (int32), traced so another value does not recompile."""

    fn: Callable
    params: dict
    value: np.ndarray

    def mask(self, h):
        return self.fn(self.params, h, self.value)


def _gate_threshold_rule(activation, params, h, threshold):
    return gate_mask(params["w_gate"], h, threshold, params["b_gate"], activation=activation)


def _gate_topk_rule(activation, params, h, k):
    return gate_topk_mask(params["w_gate"], h, k, params["b_gate"], activation=activation)


# One rule function per gated activation, made once: a rule is a static argument of the jitted step,
# so every layer must hand it the same object.
_GATE_RULES = {activation: (functools.partial(_gate_threshold_rule, activation),
                            functools.partial(_gate_topk_rule, activation)) for activation in GATED_ACTIVATIONS}


class NaiveSelector:
    """Every neuron, every token: the paper's baseline (run with no cache, it reads the whole FFN)."""

    per_layer = False  # every layer's set is known when the token starts (`begin`)
    needs_token = False  # `begin` does not look at the token id (so the host never waits for it)

    def __init__(self, cfg: ModelConfig):
        self._all = np.arange(cfg.d_ffn, dtype=np.int64)
        self.n_layers = cfg.n_layers

    def start(self, capacity: int) -> None:
        pass

    def prefill(self, prompt) -> None:
        pass

    def begin(self, token: int, pos: int) -> list[np.ndarray]:
        return [self._all] * self.n_layers


class RouterSelector:
    """A mixture of experts: each layer's router chooses its experts from the layer's own FFN input,
    inside the layer's step (kernels.attention_route_step), and the runner reads the chosen experts'
    records; layer l+1's router applied to layer l's input guesses its experts early. `naive` reads
    the routed experts every token; `hybrid` caches whole experts that fit (flash/expert_cache.py).

    With `neurons` (a PredictorSelector or GatePathSelector: `--sparsity predictor|gate`), the same
    step also evaluates that selector's rule on the layer's input, and a routed expert streamed
    through scratch is read only at the neurons the rule selects (its neurons ∩ the layer's mask).
    A cached expert is multiplied whole: its rows are in memory already, and whole slots are what
    the expert cache holds. No lookahead rule: the next layer's router guess starts its reads."""

    per_layer = False  # the runner routes (FlashRunner._routing_layer), with `rule(layer)` if any
    needs_token = False

    def __init__(self, cfg: ModelConfig, neurons: "PredictorSelector | None" = None):
        self.cfg, self.neurons = cfg, neurons

    @property
    def nbytes(self) -> int:
        """What the neuron selector holds (predictors, resident gate rows): it counts in the budget."""
        return 0 if self.neurons is None else self.neurons.nbytes

    def rule(self, layer: int) -> MaskRule | None:
        """Layer `layer`'s neuron rule inside its routed experts, or None: every neuron of each."""
        return None if self.neurons is None else self.neurons.rule(layer)

    def start(self, capacity: int) -> None:
        pass

    def prefill(self, prompt) -> None:
        pass

    def begin(self, token: int, pos: int):
        return None  # chosen per layer


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _activations_step(cfg: ModelConfig, params, tokens, length, start, cache):
    """Dense forward of tokens [1, T] (padded past `length`) at slots start.., returning |activation|
    of every layer's neurons for the last token [L, F] and the cache."""
    acts = []

    def recording_ffn(c, p, h):
        return dense_ffn_apply(c, p, h, on_activations=lambda act: acts.append(jnp.abs(act[0, -1])))

    positions = start + prompt_positions(tokens.shape[1], length, jnp)
    _, cache = forward(cfg, params, tokens, positions, start, cache, ffn=recording_ffn)
    return jnp.stack(acts), cache


class OracleSelector:
    """The true active neurons, from a full dense computation of the same token.

    A measuring device, not part of the engine: it holds the whole model in memory (outside the
    memory budget) and runs outside the timings. It shows the best a perfect predictor could do.
    "Active" means |activation| > threshold (a scalar or one per layer): for ReLU models a positive
    activation; for SwiGLU models with threshold 0, every neuron with a nonzero activation (in
    practice all of them), or with calibrated thresholds, the target share by true magnitude.
    """

    per_layer = False
    needs_token = True  # it runs the dense model on the token itself

    def __init__(self, cfg: ModelConfig, full_params, threshold=0.0):
        # A scalar, or one threshold per layer (e.g. calibrated to a target sparsity).
        self.cfg, self.params = cfg, full_params
        self.threshold = np.broadcast_to(np.asarray(threshold, np.float32), (cfg.n_layers,))[:, None]
        self.cache = None

    def start(self, capacity: int) -> None:
        self.cache = init_kv_cache(self.cfg, 1, capacity)

    def prefill(self, prompt) -> None:
        tokens = pad_prompt(prompt, 64, kv_capacity(self.cache))
        # Slots past the prompt get padding; each is rewritten by `begin` before any query sees it.
        _, self.cache = _activations_step(self.cfg, self.params, tokens, np.int32(len(prompt)), np.int32(0),
                                          self.cache)

    def begin(self, token: int, pos: int) -> list[np.ndarray]:
        acts, self.cache = _activations_step(self.cfg, self.params, np.array([[token]], np.int32), np.int32(1),
                                             np.int32(pos), self.cache)
        active = np.asarray(acts) > self.threshold
        return [np.flatnonzero(row) for row in active]


class PredictorSelector:
    """The paper's low-rank predictors (from `flashjax calibrate`), one per layer, on that layer's
    FFN input; with lookahead, a second predictor per layer guesses layer l+1's neurons from layer
    l's input so their reads start before layer l+1's attention has run."""

    per_layer = True  # picks from each layer's FFN input (`needed`); `begin` returns None
    needs_token = False

    def __init__(self, predictors, selection, lookahead: bool = True):
        self.predictors, self.selection = predictors, selection
        self.use_lookahead = lookahead and predictors.lookahead is not None

    @property
    def nbytes(self) -> int:
        return self.predictors.nbytes

    def start(self, capacity: int) -> None:
        pass

    def prefill(self, prompt) -> None:
        pass

    def begin(self, token: int, pos: int):
        return None

    def _rule(self, params: dict, layer: int) -> MaskRule:
        if self.selection.mode == "topk":
            k = self.selection.k(self.predictors.config.d_ffn, float(self.predictors.active_counts[layer]))
            return MaskRule(predictor_topk_mask, params, np.int32(k))
        return MaskRule(predictor_threshold_mask, params, np.float32(self.selection.threshold))

    def rule(self, layer: int) -> MaskRule:
        """How layer `layer` picks its neurons from its own FFN input, on the device."""
        return self._rule(self.predictors.layers[layer], layer)

    def ahead_rule(self, layer: int) -> MaskRule | None:
        """How layer `layer`'s neurons are guessed from layer-1's FFN input (None: no lookahead)."""
        return self._rule(self.predictors.lookahead[layer], layer) if self.use_lookahead else None

    def needed(self, layer: int, h) -> np.ndarray:
        return self.predictors.needed_ids(layer, h, self.selection)

    def ahead(self, layer: int, h_prev):
        return self.predictors.lookahead_ids(layer, h_prev, self.selection) if self.use_lookahead else None


class GatePathSelector(PredictorSelector):
    """Gated FFNs without training: the gate projection stays resident and is computed exactly; only
    neurons whose |act(gate)| clears the calibrated threshold have their records read."""

    def __init__(self, model_dir, predictors, selection):
        from flashjax.sparsity import GateSelector

        super().__init__(predictors, selection, lookahead=False)
        if predictors.gate_thresholds is None:
            raise ValueError("the gate path is for gated FFNs, SwiGLU or GeGLU (this model's predictors have no gate "
                             "thresholds)")
        self.gate = GateSelector.from_model(model_dir, predictors.gate_thresholds, top_k=(
            selection.top_k if selection.mode == "topk" else None), over_select=selection.over_select)

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes

    def rule(self, layer: int) -> MaskRule:
        gate = self.gate
        params = {"w_gate": gate.w_gate[layer], "b_gate": None if gate.b_gate is None else gate.b_gate[layer]}
        threshold_rule, topk_rule = _GATE_RULES[gate.activation]
        if gate.top_k is not None:
            return MaskRule(topk_rule, params, np.int32(gate.k(layer)))
        return MaskRule(threshold_rule, params, np.float32(gate.thresholds[layer]))

    def needed(self, layer: int, h) -> np.ndarray:
        return self.gate.needed_ids(layer, h)
