"""References written in the tests from the raw weights (numpy, float64), sharing no code with what
they check, and a recorder of what the flash engine computes in each decode step."""

from __future__ import annotations

import numpy as np


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def ffn_weights(params, layer: int) -> dict:
    """Layer `layer`'s FFN weights as float64 numpy arrays (w_up, w_down, w_gate, biases if any)."""
    return {k: np.asarray(v, np.float64) for k, v in params["layers"][layer]["ffn"].items()}


def preactivations(w: dict, h) -> tuple:
    """(gate or None, up) [..., F] of FFN input h [..., D], biases included."""
    h = np.asarray(h, np.float64)
    up = h @ w["w_up"].T + w.get("b_up", 0.0)
    gate = h @ w["w_gate"].T + w.get("b_gate", 0.0) if "w_gate" in w else None
    return gate, up


def gelu_tanh(x):
    """GELU, tanh approximation (Gemma's GeGLU; PyTorch's gelu(approximate="tanh"))."""
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def gate_function(cfg):
    """The numpy act(gate) of a gated model's config (SwiGLU or GeGLU)."""
    return {"silu_glu": silu, "gelu_tanh_glu": gelu_tanh}[cfg.ffn_activation]


def activations(w: dict, h, act=silu) -> np.ndarray:
    """Per-neuron activation [..., F]: act(gate) * up (gated: SwiGLU, or GeGLU with act=gelu_tanh) or
    relu(up) (ReLU)."""
    gate, up = preactivations(w, h)
    return np.maximum(up, 0.0) if gate is None else act(gate) * up


def masked_ffn(w: dict, h, keep=None, act=silu) -> np.ndarray:
    """FFN output [..., D] of h [..., D] over the neurons `keep` only (every neuron when None):
    the activation masked to `keep`, then the down projection (+ its bias)."""
    act = activations(w, h, act)
    if keep is not None:
        mask = np.zeros(act.shape[-1], bool)
        mask[np.asarray(keep, np.int64)] = True
        act = np.where(mask, act, 0.0)
    return act @ w["w_down"].T + w.get("b_down", 0.0)


def ids_clear_of(values: np.ndarray, bound: float, margin: float) -> np.ndarray:
    """Ids of `values` [F] further than `margin` from `bound`: the neurons whose side of the bound
    float32-vs-float64 rounding cannot change."""
    return np.flatnonzero(np.abs(np.asarray(values, np.float64) - bound) > margin)


def assert_same_choice(chosen, expected_mask: np.ndarray, values: np.ndarray, bound: float, margin: float,
                       what: str) -> None:
    """`chosen` (ids) equals the neurons of `expected_mask` [F], except that a neuron whose value lies
    within `margin` of the bound may go either way; at most a few may be that close."""
    chosen_mask = np.zeros(expected_mask.shape, bool)
    chosen_mask[np.asarray(chosen, np.int64)] = True
    clear = ids_clear_of(values, bound, margin)
    assert len(clear) >= len(values) - 2, f"{what}: {len(values) - len(clear)} neurons within {margin} of the bound"
    wrong = clear[chosen_mask[clear] != expected_mask[clear]]
    assert len(wrong) == 0, f"{what}: neurons {wrong.tolist()} chosen wrongly (values {values[wrong].tolist()})"


class FlashRecorder:
    """Records, for every decode step of a flash LLM (`flashjax.load(..., sparsity=...)`), per layer:

    - `h[l]`: the FFN input the engine computed ([D], float32);
    - `out[l]`: the engine's FFN output ([D]), before any post-FFN norm (Gemma) adds it to the stream;
    - `needed[l]`: the ids the selector returned for layer l (`begin` for selectors that choose
      when the token starts, such as the oracle; `needed` for per-layer ones, such as predictors and
      the gate path), and `ahead[l]`: ids a lookahead predicted for layer l from layer l-1's input;
    - `token`, `pos`: the token decoded and its position.

    A context manager: while it is open, the flash kernels the runner calls (`layer_step`,
    `attention_select_step`, `ffn_step`) are wrapped so each layer's FFN input, FFN contribution (the
    FFN's output the steps return beside the stream) and (per-layer selectors) the masks chosen on
    the device are recorded; `begin` is wrapped on the selector instance.
    """

    def __init__(self, llm):
        self.llm = llm
        self.steps: list[dict] = []
        self._layer = -1
        self._decoding = False

    def __enter__(self):
        from flashjax.flash import kernels

        runner, selector = self.llm.runner, self.llm.runner.selector
        self._kernels = kernels
        names = ("layer_step", "attention_select_step", "ffn_step")
        self._saved = {name: getattr(kernels, name) for name in names}
        layer_step, attention_select_step, ffn_step = (self._saved[n] for n in names)

        def record(h, contribution):
            if not self._decoding:
                return  # the prefill streams every neuron, uncached
            step, l = self.steps[-1], self._layer
            step["h"][l] = np.asarray(h, np.float32).reshape(-1)
            step["out"][l] = step["out"].get(l, 0.0) + np.asarray(contribution, np.float64).reshape(-1)

        def recording_layer_step(cfg, mesh, part_slices, layer, x, positions, start, kv, cached, scratch):
            self._layer += 1
            y, h, kv, partial = layer_step(cfg, mesh, part_slices, layer, x, positions, start, kv, cached, scratch)
            record(h, partial[1])  # the FFN's output, before any post-FFN norm
            return y, h, kv, partial

        def recording_attention_select_step(*args, **kwargs):
            self._layer += 1
            out = attention_select_step(*args, **kwargs)
            needed, predicted_next = out[3], out[4]
            if self._decoding:
                step, l = self.steps[-1], self._layer
                step["needed"][l] = np.flatnonzero(np.asarray(needed))
                if predicted_next is not None:
                    step["ahead"][l + 1] = np.flatnonzero(np.asarray(predicted_next))
            return out

        def recording_ffn_step(cfg, mesh, part_slices, post_ffn_norm, partial, h, b_down, cached, scratch):
            y, (x, out) = ffn_step(cfg, mesh, part_slices, post_ffn_norm, partial, h, b_down, cached, scratch)
            so_far = partial[1]
            record(h, np.asarray(out, np.float64) - (0.0 if so_far is None else np.asarray(so_far, np.float64)))
            return y, (x, out)

        kernels.layer_step, kernels.attention_select_step, kernels.ffn_step = (
            recording_layer_step, recording_attention_select_step, recording_ffn_step)

        decode = runner.decode

        def recording_decode(token, pos, *args, **kwargs):
            self.steps.append(dict(token=int(np.asarray(token).reshape(-1)[0]), pos=int(pos), h={}, out={},
                                   needed={}, ahead={}))
            self._layer, self._decoding = -1, True
            try:
                return decode(token, pos, *args, **kwargs)
            finally:
                self._decoding = False

        prefill = runner.prefill

        def recording_prefill(*args, **kwargs):
            self._layer = -1
            return prefill(*args, **kwargs)

        runner.decode, runner.prefill = recording_decode, recording_prefill
        begin = selector.begin

        def recording_begin(token, pos):
            sets = begin(token, pos)
            if sets is not None and self.steps:
                self.steps[-1]["needed"].update({l: np.asarray(ids) for l, ids in enumerate(sets)})
            return sets

        selector.begin = recording_begin
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(self._kernels, name, fn)
        return False

    def used(self, step: dict, l: int) -> np.ndarray:
        """The neurons the engine's FFN of layer l ran over in `step` with window 1: the selector's set,
        plus what the lookahead predicted for the layer (the engine keeps those rows too)."""
        return np.union1d(step["needed"][l], step["ahead"].get(l, np.zeros(0, np.int64)))
