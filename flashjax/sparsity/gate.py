"""The training-free gate path of gated FFNs (SwiGLU, GeGLU): keep each layer's gate projection
resident, compute it exactly, and read only the up/down rows of the neurons whose |act(gate)|
clears a per-layer threshold. `activation` is the model's (config.GATED_ACTIVATIONS); SiLU and
GELU are both near zero for negative gates, which is what the path relies on.

The threshold is calibrated like the activation threshold, on |act(gate)| instead of
|act(gate) * up|: the `target_sparsity` quantile over the calibration tokens. A threshold of 0
keeps every neuron with a nonzero gate (in practice all of them), so the path then equals dense.

    selector = GateSelector.from_model(model_dir, thresholds)   # w_gate [F, D] per layer, resident
    ids = selector.needed_ids(layer, h)                          # h [..., D], numpy or jax
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from flashjax.model.layers import gate_activation
from flashjax.model.matmul import weight_matmul
from flashjax.sparsity.predictor import _topk_rows, selection_metrics
from flashjax.sparsity.thresholds import quantile_threshold


def _gate_magnitude(w_gate, h, b_gate, activation: str):
    # [..., F]; w_gate [F, D] in any float dtype or quantized (the records' gate rows, as stored)
    g = weight_matmul(h.astype(jnp.float32), w_gate)
    if b_gate is not None:
        g = g + b_gate
    return jnp.abs(gate_activation(activation, g))


gate_magnitude = jax.jit(_gate_magnitude, static_argnames=("activation",))
gate_magnitude.__doc__ = "|act(h @ w_gate.T + b_gate)| [..., F] for h [..., D], w_gate [F, D] (jitted)."


@functools.partial(jax.jit, static_argnames=("activation",))
def gate_mask(w_gate, h, threshold, b_gate, activation: str):
    """bool [F]: neurons whose |act(gate)| > threshold for any token of h [..., D]."""
    m = _gate_magnitude(w_gate, h, b_gate, activation)
    return jnp.any(m.reshape(-1, m.shape[-1]) > threshold, axis=0)


@functools.partial(jax.jit, static_argnames=("activation",))
def gate_topk_mask(w_gate, h, k, b_gate, activation: str):
    """bool [F]: each token's k largest |act(gate)| (union over tokens); k traced."""
    m = _gate_magnitude(w_gate, h, b_gate, activation)
    return jnp.any(_topk_rows(m.reshape(-1, m.shape[-1]), k), axis=0)


def gate_keep_ids(w_gate, h, threshold: float, activation: str, b_gate=None) -> np.ndarray:
    """Sorted neuron ids (int64) kept by the gate path for h [..., D]."""
    return np.flatnonzero(np.asarray(gate_mask(w_gate, h, np.float32(threshold), b_gate, activation=activation)))


def gate_magnitudes(x: np.ndarray, w_gate, activation: str, b_gate=None, chunk: int = 4096) -> np.ndarray:
    """|act(gate)| [N, F] float32 of calibration inputs x [N, D], computed in chunks."""
    w = jnp.asarray(w_gate)
    b = None if b_gate is None else jnp.asarray(b_gate)
    return np.concatenate([np.asarray(gate_magnitude(w, jnp.asarray(x[i:i + chunk]), b, activation=activation))
                           for i in range(0, len(x), chunk)])


def gate_threshold(x: np.ndarray, w_gate, target_sparsity: float | None, activation: str, b_gate=None) -> float:
    """The |act(gate)| threshold that drops `target_sparsity` of (token, neuron) pairs of x [N, D]."""
    if not target_sparsity:
        return 0.0
    return quantile_threshold(gate_magnitudes(x, w_gate, activation, b_gate), target_sparsity)


def gate_metrics(x: np.ndarray, w_gate, threshold: float, labels: np.ndarray, activation: str,
                 magnitudes: np.ndarray | None = None, b_gate=None) -> dict:
    """How well the gate path's choice matches the true active neurons (see `selection_metrics`)."""
    return selection_metrics(gate_magnitudes(x, w_gate, activation, b_gate) > threshold, labels, magnitudes)


@dataclasses.dataclass
class GateSelector:
    """Per layer: the resident gate projection w_gate [F, D] (+ b_gate [F]) and its threshold, for a
    model whose gated activation is `activation`.

    `top_k` (with `over_select`), when set, keeps each token's k largest |act(gate)| instead of
    thresholding."""

    w_gate: list
    thresholds: np.ndarray
    activation: str
    b_gate: list | None = None
    top_k: int | None = None
    over_select: float = 1.0

    def k(self, layer: int) -> int:
        """Neurons kept per token under top-k: ceil(top_k * over_select), at most the layer's."""
        return int(min(self.w_gate[layer].shape[0], max(1, np.ceil(self.top_k * self.over_select))))

    def needed_ids(self, layer: int, h) -> np.ndarray:
        b = None if self.b_gate is None else self.b_gate[layer]
        w = self.w_gate[layer]
        if self.top_k is not None:
            return np.flatnonzero(np.asarray(gate_topk_mask(w, h, np.int32(self.k(layer)), b,
                                                            activation=self.activation)))
        return np.flatnonzero(np.asarray(gate_mask(w, h, np.float32(self.thresholds[layer]), b,
                                                   activation=self.activation)))

    @property
    def nbytes(self) -> int:
        """Memory the resident gate projections take."""
        parts = list(self.w_gate) + (list(self.b_gate) if self.b_gate is not None else [])
        return int(sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(parts)))

    @classmethod
    def from_model(cls, model_dir, thresholds, dtype=jnp.float32, **options) -> "GateSelector":
        """Reads every layer's gate rows out of a flash model's FFN records (a whole-layer read each,
        once, at load time) and keeps them on the device."""
        from flashjax.store import read_manifest

        w, b = load_gate_weights(model_dir, dtype)
        return cls(w, np.asarray(thresholds, np.float32), read_manifest(model_dir).config.ffn_activation, b, **options)


def load_gate_weights(model_dir, dtype=jnp.float32) -> tuple[list, list | None]:
    """(w_gate [F, D] per layer, b_gate [F] per layer or None) as jax arrays, read from the records
    of a flash model directory."""
    from flashjax.store import open_flash_model

    model = open_flash_model(model_dir, verify=False)
    if not model.config.is_glu:
        raise ValueError(f"{model_dir}: the gate path needs a gated FFN (SwiGLU, GeGLU); "
                         f"this one uses {model.config.ffn_activation}")
    from flashjax.store.model import part_weights

    store, layout = model.ffn_store(), model.manifest.layout
    w, b = [], []
    for layer in range(model.config.n_layers):
        records = store.read_layer(layer)
        # A quantized model's gate rows stay quantized: a float copy would cost what quantizing saved.
        w.append(part_weights(layout, "gate", records[:, layout.part_slice("gate")], dtype))
        if "b_gate" in layout.names:
            b.append(part_weights(layout, "b_gate", records[:, layout.part_slice("b_gate")]))
    return w, (b or None)
