"""The decoder as per-layer functions, and the whole-model forward built from them.

Each layer is split at the FFN: `attention_block` (norm, attention, residual)
then `ffn_input` (norm) and an FFN. The dense engine runs every layer inside
one jitted call; the flash engine calls the same pieces layer by layer with a
sparse FFN over neurons it reads from disk, so both share this code.

Parameter tree: {"embed": {...}, "layers": [{"attn_norm", "attn", "ffn_norm",
"ffn", and for Gemma "post_attn_norm", "post_ffn_norm"}, ...], "final_norm": {...},
optional "lm_head"}. KV cache: a list with
one (k, v) pair per layer, each [B, K, S, H].
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from flashjax.config import ModelConfig
from flashjax.model.layers import Attention, DenseFFN, Embedder, Norm


def init_kv_cache(cfg: ModelConfig, batch: int, capacity: int, dtype=jnp.float32):
    shape = (batch, cfg.n_kv_heads, capacity, cfg.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layers)]


def embed(cfg: ModelConfig, params, tokens, positions):
    return Embedder(cfg).apply({"params": params["embed"]}, tokens, positions, method=Embedder.encode)


def attention_block(cfg: ModelConfig, layer, x, positions, start, kv):
    """x -> x + attention(norm(x)) (through the post-attention norm where the architecture has one);
    returns the new residual stream and this layer's cache. `cfg` is the layer's own
    (`ModelConfig.layer_config`): its window and RoPE base."""
    h = Norm(cfg).apply({"params": layer["attn_norm"]}, x)
    out, k, v = Attention(cfg).apply({"params": layer["attn"]}, h, positions, start, kv[0], kv[1])
    if cfg.sandwich_norm:
        out = Norm(cfg).apply({"params": layer["post_attn_norm"]}, out)
    return x + out, (k, v)


def ffn_input(cfg: ModelConfig, layer, x):
    return Norm(cfg).apply({"params": layer["ffn_norm"]}, x)


def ffn_residual(cfg: ModelConfig, post_ffn_norm, x, out):
    """x + the FFN's output `out`, through the post-FFN norm where the architecture has one (its
    params `post_ffn_norm`, else None). The norm needs the whole output: partial sums are added
    before it."""
    if post_ffn_norm is not None:
        out = Norm(cfg).apply({"params": post_ffn_norm}, out)
    return x + out.astype(x.dtype)


def dense_ffn(cfg: ModelConfig, ffn_params, h):
    return DenseFFN(cfg).apply({"params": ffn_params}, h)


def final_logits(cfg: ModelConfig, params, x):
    h = Norm(cfg).apply({"params": params["final_norm"]}, x)
    return Embedder(cfg).apply({"params": params["embed"]}, h, params.get("lm_head"), method=Embedder.decode)


def forward(cfg: ModelConfig, params, tokens, positions, start, cache,
            ffn: Callable = dense_ffn):
    """All layers over tokens [B, T] written at cache slots start..start+T; returns (hidden [B, T, D], cache)."""
    x = embed(cfg, params, tokens, positions)
    new_cache = []
    for i, (layer, kv) in enumerate(zip(params["layers"], cache)):
        x, kv = attention_block(cfg.layer_config(i), layer, x, positions, start, kv)
        x = ffn_residual(cfg, layer.get("post_ffn_norm"), x, ffn(cfg, layer["ffn"], ffn_input(cfg, layer, x)))
        new_cache.append(kv)
    return x, new_cache
