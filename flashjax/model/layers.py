"""Flax (linen) modules: norms, embeddings, attention with a KV cache, the dense FFN.

Parameters are never initialised here: they come from a checkpoint and are
passed to `Module.apply` as arguments, so the modules declare their
parameters only to name them. Weight matrices keep the checkpoint layout
[out_features, in_features].

Axis letters in einsum strings: B batch, T query positions, S cache slots (KV cache [B, K, S, H]),
D d_model, K kv heads, G query heads per kv head, H head dim, F d_ffn, V vocab.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from flashjax.config import ModelConfig, rope_inverse_frequencies
from flashjax.model.matmul import weight_matmul, weight_rows
from flashjax.quant import QuantizedMatrix


def _declared(module: nn.Module, name: str, shape, dtype=jnp.float32):
    # Checkpoint-loaded parameter; the initialiser only runs if someone calls `init`. A quantized
    # matrix is taken as loaded: its arrays are not the declared shape (Flax would compare them).
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if isinstance(value, QuantizedMatrix):
            return value
    return module.param(name, nn.initializers.zeros, shape, dtype)


class Norm(nn.Module):
    """RMSNorm (Llama family) or LayerNorm (OPT) over the last axis (d_model, or `dim`: a head's
    query/key norm), computed in float32."""

    cfg: ModelConfig
    dim: int | None = None

    @nn.compact
    def __call__(self, x):
        d = self.dim or self.cfg.d_model
        scale = _declared(self, "scale", (d,))
        x32 = x.astype(jnp.float32)
        if self.cfg.norm == "rms":
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
            return (y.astype(x.dtype) * scale).astype(x.dtype)
        bias = _declared(self, "bias", (d,))
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.cfg.norm_eps)
        return (y * scale + bias).astype(x.dtype)


class Embedder(nn.Module):
    """Token (and, for OPT, learned position) embeddings in; logits out."""

    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        self.embedding = _declared(self, "embedding", (c.vocab_size, c.d_model))
        if not c.uses_rope:
            self.positions = _declared(self, "positions", (c.max_position + c.position_offset, c.d_model))

    def encode(self, tokens, positions):
        # [B, T, D]
        x = weight_rows(self.embedding, tokens)
        if self.cfg.embed_scale is not None:
            x = x * jnp.asarray(self.cfg.embed_scale, x.dtype)
        if not self.cfg.uses_rope:
            x = x + jnp.take(self.positions, positions + self.cfg.position_offset, axis=0)
        return x

    def decode(self, x, lm_head=None):
        table = self.embedding if lm_head is None else lm_head
        # [B, T, V]
        return soft_cap(weight_matmul(x, table), self.cfg.final_softcap)


def soft_cap(x, cap: float | None):
    """cap * tanh(x / cap): Gemma's soft limit on the logits (None: x as is)."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def rope(cfg: ModelConfig, x, positions):
    """Rotary embedding of x [B, T, heads, H], Hugging Face convention: the first `rotary_width`
    dimensions of each head rotated as two halves, the rest passed through (Phi-3's partial rotary).

    LongRoPE picks its long frequencies when the call reaches past the pretraining length (as
    transformers does, from the largest position of the call), and scales the rotation by its
    attention factor."""
    # Constants of the static config: folded into the compiled step.
    inv_freq = jnp.asarray(rope_inverse_frequencies(cfg).astype("float32"))
    scaling, factor = cfg.rope_scaling, 1.0
    if scaling is not None and scaling[0] == "longrope":
        long_inv_freq = jnp.asarray(rope_inverse_frequencies(cfg, long=True).astype("float32"))
        inv_freq = jnp.where(jnp.max(positions) + 1 > scaling[3], long_inv_freq, inv_freq)
        factor = scaling[4]
    # [B, T, R/2]
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    cos = jnp.cos(angles)[:, :, None, :] * factor
    sin = jnp.sin(angles)[:, :, None, :] * factor
    x32 = x.astype(jnp.float32)
    r = cfg.rotary_width
    x1, x2 = jnp.split(x32[..., :r], 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x32[..., r:]], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention over a fixed-capacity KV cache.

    The cache slot of a token is its absolute position, so writing T new
    tokens at `start` is one dynamic_update_slice and the mask is a
    comparison of slot and query positions: no shape depends on the step.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, start, cache_k, cache_v):
        c = self.cfg
        d, hd, n_q, n_kv = c.d_model, c.head_dim, c.n_heads, c.n_kv_heads

        def project(name, bias_name, out, has_bias):
            # [B, T, out]
            y = weight_matmul(x, _declared(self, name, (out, d)))
            if has_bias:
                y = y + _declared(self, bias_name, (out,))
            return y

        b, t, _ = x.shape
        # [B, T, K, G, H] and [B, T, K, H]
        q = project("wq", "bq", n_q * hd, c.qkv_bias).reshape(b, t, n_kv, c.q_per_kv, hd)
        k = project("wk", "bk", n_kv * hd, c.qkv_bias).reshape(b, t, n_kv, hd)
        v = project("wv", "bv", n_kv * hd, c.qkv_bias).reshape(b, t, n_kv, hd)
        if c.qk_norm and c.qk_norm_whole:
            # OLMoE: all query (key) heads normalised together, over the whole projection.
            q = Norm(c, dim=n_q * hd, name="q_norm")(q.reshape(b, t, n_q * hd)).reshape(q.shape)
            k = Norm(c, dim=n_kv * hd, name="k_norm")(k.reshape(b, t, n_kv * hd)).reshape(k.shape)
        elif c.qk_norm:
            # Each head normalised over its own dimensions before the rotation (Qwen3, Gemma 3).
            q = Norm(c, dim=hd, name="q_norm")(q)
            k = Norm(c, dim=hd, name="k_norm")(k)
        if c.uses_rope:
            q = rope(c, q.reshape(b, t, n_q, hd), positions).reshape(q.shape)
            k = rope(c, k, positions)

        # [B, K, S, H]: kv heads outermost so the attention dots need no transpose of the cache.
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.transpose(0, 2, 1, 3).astype(cache_k.dtype), (0, 0, start, 0))
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.transpose(0, 2, 1, 3).astype(cache_v.dtype), (0, 0, start, 0))

        # [B, K, G, T, S]
        scale = hd ** -0.5 if c.attn_scale is None else c.attn_scale
        scores = jnp.einsum("btkgh,bksh->bkgts", q, cache_k).astype(jnp.float32) * scale
        slots = jnp.arange(cache_k.shape[2])
        visible = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]
        if c.sliding_window is not None:
            visible &= slots[None, None, :] > positions[:, :, None] - c.sliding_window
        scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        # [B, T, K, G, H]
        ctx = jnp.einsum("bkgts,bksh->btkgh", probs, cache_v).reshape(b, t, n_q * hd)

        # [B, T, D]
        out = weight_matmul(ctx, _declared(self, "wo", (d, n_q * hd)))
        if c.o_bias:
            out = out + _declared(self, "bo", (d,))
        return out, cache_k, cache_v


def gate_activation(activation: str, gate):
    """act(gate) of a gated FFN (`activation` one of config.GATED_ACTIVATIONS): SiLU (SwiGLU),
    tanh-approximated GELU (Gemma's GeGLU) or exact GELU."""
    if activation == "silu_glu":
        return jax.nn.silu(gate)
    return jax.nn.gelu(gate, approximate=activation == "gelu_tanh_glu")


def ffn_activation(cfg: ModelConfig, gate, up):
    """Per-neuron activation: act(gate) * up for gated FFNs, relu(up) for OPT."""
    return gate_activation(cfg.ffn_activation, gate) * up if cfg.is_glu else jax.nn.relu(up)


def route(cfg: ModelConfig, router, h):
    """The weight of each expert for each token [B, T, E] of a mixture-of-experts layer: softmax over
    the router's logits (router [E, D], in float32), the top `experts_per_token` kept and, where the
    checkpoint says so, rescaled to sum to 1; every other expert weighs 0 (it is not computed)."""
    # [B, T, E]
    probs = jax.nn.softmax(weight_matmul(h, router).astype(jnp.float32), axis=-1)
    top, experts = jax.lax.top_k(probs, cfg.experts_per_token)
    if cfg.router_renormalize:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    # [B, T, K, E] one-hot of the chosen experts, summed over K
    return jnp.einsum("btk,btke->bte", top, jax.nn.one_hot(experts, cfg.n_experts, dtype=top.dtype))


def neuron_weights(cfg: ModelConfig, expert_weights, expert_of_rows=None):
    """Each neuron's share of the FFN output [B, T, N]: its expert's weight. `expert_of_rows` [N] names
    the expert of each row (cached or streamed rows, in any order); None: every neuron of the layer in
    order (expert e's neurons are e * expert_ffn ..)."""
    if expert_of_rows is None:
        return jnp.repeat(expert_weights, cfg.expert_ffn, axis=-1)
    return jnp.take(expert_weights, expert_of_rows, axis=-1)


def ffn_over_neurons(cfg: ModelConfig, h, neurons, live=None, on_activations=None, scale=None):
    """The FFN arithmetic, written once: the contribution of a set of neurons to the FFN output.

    Every path calls this: the dense FFN (all neurons), the flash engine (cached or streamed rows),
    activation collection and the oracle. `neurons` is neuron-major, the layout of a flash record:
    {"up": [N, D], "down": [N, D] (row n = column n of Hugging Face's w_down), "gate": [N, D] for
    gated FFNs, optional biases "b_up", "b_gate": [N] or [N, 1]}. The down-projection bias is not
    per neuron and is added by the caller. `live` (bool [N]) zeroes padding rows;
    `on_activations` sees the activations [B, T, N] (at trace time) for calibration and the oracle;
    `scale` [B, T, N] weighs each neuron (a mixture of experts: its expert's router weight, 0 for
    experts not chosen). Returns [B, T, D] for h [B, T, D].
    """

    def projection(name):
        # [B, T, N]
        out = weight_matmul(h, neurons[name])
        bias = neurons.get("b_" + name)
        return out if bias is None else out + bias.reshape(-1).astype(out.dtype)

    gate = projection("gate") if cfg.is_glu else None
    act = ffn_activation(cfg, gate, projection("up"))
    if scale is not None:
        act = act * scale.astype(act.dtype)
    if live is not None:
        act = jnp.where(live, act, 0.0)
    if on_activations is not None:
        on_activations(act)
    # [B, T, D]
    return weight_matmul(act, neurons["down"], w_rows_are_outputs=False)


def dense_ffn_apply(cfg: ModelConfig, ffn_params, h, on_activations=None):
    """The FFN with every neuron resident, from Hugging Face-layout parameters
    {"w_up", "w_gate", "w_down" [D, F], "b_up", "b_gate", "b_down"}; a quantized model holds the
    down projection neuron-major instead, as its records do ("down_rows" [F, D], blocks along D).
    A mixture of experts has its "router" [E, D] here too and every expert's neurons laid end to end
    (F = E * expert_ffn): each neuron is weighed by its expert's router weight, so the experts not
    chosen contribute nothing. (Every expert is multiplied: the dense engine is the reference.)"""
    # The transpose of w_down folds into the dot's dimension numbers; nothing is copied.
    down = ffn_params["down_rows"] if "down_rows" in ffn_params else ffn_params["w_down"].T
    neurons = {"up": ffn_params["w_up"], "down": down}
    for ours, theirs in (("gate", "w_gate"), ("b_up", "b_up"), ("b_gate", "b_gate")):
        if theirs in ffn_params:
            neurons[ours] = ffn_params[theirs]
    scale = neuron_weights(cfg, route(cfg, ffn_params["router"], h)) if cfg.is_moe else None
    out = ffn_over_neurons(cfg, h, neurons, on_activations=on_activations, scale=scale)
    return out + ffn_params["b_down"] if "b_down" in ffn_params else out


class DenseFFN(nn.Module):
    """The feed-forward block with every neuron resident (declares the parameters it reads)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h):
        c = self.cfg
        f, d = c.d_ffn, c.d_model
        shapes = {"w_up": (f, d)}
        shapes.update({"down_rows": (f, d)} if self.has_variable("params", "down_rows") else {"w_down": (d, f)})
        if c.is_glu:
            shapes["w_gate"] = (f, d)
        if c.is_moe:
            shapes["router"] = (c.n_experts, d)
        if c.ffn_bias:
            shapes.update(b_up=(f,), b_down=(d,), **({"b_gate": (f,)} if c.is_glu else {}))
        return dense_ffn_apply(c, {name: _declared(self, name, shape) for name, shape in shapes.items()}, h)
