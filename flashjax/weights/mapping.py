"""Checkpoint tensor names -> flashjax parameter paths, written as data.

Each row: (flashjax path, Hugging Face name, GGUF name, needed-when[, fused part]). `{i}` is
the layer index. A fused part (group, index) takes rows of a fused checkpoint tensor: Phi-3 stores
q, k and v as one `qkv_proj` and gate and up as one `gate_up_proj`; `FUSED_ROWS` gives each group's
row counts. Per-tensor hooks: `_gguf_unpermute` undoes the reordering llama.cpp's converter applies
to q/k projections of the architectures listed in `GGUF_ROTARY_INTERLEAVED`, and Gemma's Hugging
Face norm weights get 1 added (flashjax, like llama.cpp's GGUF files, holds the multiplier
1 + weight); everything else is copied as stored.
All weight matrices keep the Hugging Face layout [out_features, in_features].
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from flashjax.config import ModelConfig

# needed-when predicates over the config
_always = lambda c: True
_qkv_bias = lambda c: c.qkv_bias
_o_bias = lambda c: c.o_bias
_ffn_bias = lambda c: c.ffn_bias
_untied = lambda c: not c.tie_embeddings
_glu = lambda c: c.is_glu
_qk_norm = lambda c: c.qk_norm

LLAMA_TABLE = [
    ("embed.embedding", "model.embed_tokens.weight", "token_embd.weight", _always),
    ("final_norm.scale", "model.norm.weight", "output_norm.weight", _always),
    ("lm_head", "lm_head.weight", "output.weight", _untied),
    ("layers.{i}.attn_norm.scale", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", _always),
    ("layers.{i}.attn.wq", "model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", _always),
    ("layers.{i}.attn.wk", "model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight", _always),
    ("layers.{i}.attn.wv", "model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight", _always),
    ("layers.{i}.attn.wo", "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", _always),
    ("layers.{i}.attn.bq", "model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias", _qkv_bias),
    ("layers.{i}.attn.bk", "model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias", _qkv_bias),
    ("layers.{i}.attn.bv", "model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias", _qkv_bias),
    ("layers.{i}.attn.bo", "model.layers.{i}.self_attn.o_proj.bias", "blk.{i}.attn_output.bias", _o_bias),
    ("layers.{i}.attn.q_norm.scale", "model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight", _qk_norm),
    ("layers.{i}.attn.k_norm.scale", "model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight", _qk_norm),
    ("layers.{i}.ffn_norm.scale", "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", _always),
    ("layers.{i}.ffn.w_gate", "model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", _always),
    ("layers.{i}.ffn.w_up", "model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", _always),
    ("layers.{i}.ffn.w_down", "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", _always),
    ("layers.{i}.ffn.b_gate", "model.layers.{i}.mlp.gate_proj.bias", None, _ffn_bias),
    ("layers.{i}.ffn.b_up", "model.layers.{i}.mlp.up_proj.bias", None, _ffn_bias),
    ("layers.{i}.ffn.b_down", "model.layers.{i}.mlp.down_proj.bias", None, _ffn_bias),
]

# Gemma 3: the Llama rows (embeddings, head, attention with its q/k norms, FFN), with norms before and
# after attention and the FFN in place of Llama's FFN norm (Hugging Face's post_attention_layernorm is
# the norm *after* attention here, not the FFN's input norm as in Llama).
_LLAMA_FFN_NORM = next(i for i, row in enumerate(LLAMA_TABLE) if row[0] == "layers.{i}.ffn_norm.scale")
GEMMA3_TABLE = LLAMA_TABLE[:_LLAMA_FFN_NORM] + [
    ("layers.{i}.post_attn_norm.scale", "model.layers.{i}.post_attention_layernorm.weight",
     "blk.{i}.post_attention_norm.weight", _always),
    ("layers.{i}.ffn_norm.scale", "model.layers.{i}.pre_feedforward_layernorm.weight", "blk.{i}.ffn_norm.weight", _always),
    ("layers.{i}.post_ffn_norm.scale", "model.layers.{i}.post_feedforward_layernorm.weight",
     "blk.{i}.post_ffw_norm.weight", _always),
] + LLAMA_TABLE[_LLAMA_FFN_NORM + 1:]

# Phi-3 / Phi-4-mini: fused projections, split at load. llama.cpp keeps them fused too (attn_qkv, and
# gate_up as ffn_up of twice the width), in the same row order.
PHI3_TABLE = [
    ("embed.embedding", "model.embed_tokens.weight", "token_embd.weight", _always),
    ("final_norm.scale", "model.norm.weight", "output_norm.weight", _always),
    ("lm_head", "lm_head.weight", "output.weight", _untied),
    ("layers.{i}.attn_norm.scale", "model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", _always),
    ("layers.{i}.attn.wq", "model.layers.{i}.self_attn.qkv_proj.weight", "blk.{i}.attn_qkv.weight", _always, ("qkv", 0)),
    ("layers.{i}.attn.wk", "model.layers.{i}.self_attn.qkv_proj.weight", "blk.{i}.attn_qkv.weight", _always, ("qkv", 1)),
    ("layers.{i}.attn.wv", "model.layers.{i}.self_attn.qkv_proj.weight", "blk.{i}.attn_qkv.weight", _always, ("qkv", 2)),
    ("layers.{i}.attn.wo", "model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", _always),
    ("layers.{i}.ffn_norm.scale", "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight", _always),
    ("layers.{i}.ffn.w_gate", "model.layers.{i}.mlp.gate_up_proj.weight", "blk.{i}.ffn_up.weight", _always, ("gate_up", 0)),
    ("layers.{i}.ffn.w_up", "model.layers.{i}.mlp.gate_up_proj.weight", "blk.{i}.ffn_up.weight", _always, ("gate_up", 1)),
    ("layers.{i}.ffn.w_down", "model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", _always),
]

# Mixtures of experts: the Llama rows up to the FFN, the router, and each expert's projections laid
# end to end into one FFN (config.ModelConfig: expert e owns neurons e * expert_ffn ..). An expert
# part (("experts", axis)) names one checkpoint tensor per expert (`{e}`), concatenated along `axis`
# (the neurons: rows of gate and up, columns of down); llama.cpp stores the experts of a layer as one
# 3-D tensor [E, F, D] (down: [E, D, F]), laid out the same way. OLMoE and Qwen3-MoE name their
# Hugging Face tensors alike; Mixtral has its own names (w1 gate, w3 up, w2 down).
_LLAMA_ATTENTION = LLAMA_TABLE[:_LLAMA_FFN_NORM + 1]


def _moe_rows(prefix: str, gate: str, up: str, down: str) -> list:
    return [
        ("layers.{i}.ffn.router", prefix + ".gate.weight", "blk.{i}.ffn_gate_inp.weight", _always),
        ("layers.{i}.ffn.w_gate", prefix + ".experts.{e}." + gate, "blk.{i}.ffn_gate_exps.weight", _always,
         ("experts", 0)),
        ("layers.{i}.ffn.w_up", prefix + ".experts.{e}." + up, "blk.{i}.ffn_up_exps.weight", _always, ("experts", 0)),
        ("layers.{i}.ffn.w_down", prefix + ".experts.{e}." + down, "blk.{i}.ffn_down_exps.weight", _always,
         ("experts", 1)),
    ]


MIXTRAL_TABLE = _LLAMA_ATTENTION + _moe_rows("model.layers.{i}.block_sparse_moe", "w1.weight", "w3.weight",
                                             "w2.weight")
OLMOE_TABLE = _LLAMA_ATTENTION + _moe_rows("model.layers.{i}.mlp", "gate_proj.weight", "up_proj.weight",
                                           "down_proj.weight")


def fused_rows(cfg: ModelConfig, group: str) -> list[int]:
    """Row counts of the parts of a fused tensor, in the order stored."""
    hd = cfg.head_dim
    return {"qkv": [cfg.n_heads * hd, cfg.n_kv_heads * hd, cfg.n_kv_heads * hd],
            "gate_up": [cfg.d_ffn, cfg.d_ffn]}[group]

OPT_TABLE = [
    ("embed.embedding", "model.decoder.embed_tokens.weight", None, _always),
    ("embed.positions", "model.decoder.embed_positions.weight", None, _always),
    ("final_norm.scale", "model.decoder.final_layer_norm.weight", None, _always),
    ("final_norm.bias", "model.decoder.final_layer_norm.bias", None, _always),
    ("lm_head", "lm_head.weight", None, _untied),
    ("layers.{i}.attn_norm.scale", "model.decoder.layers.{i}.self_attn_layer_norm.weight", None, _always),
    ("layers.{i}.attn_norm.bias", "model.decoder.layers.{i}.self_attn_layer_norm.bias", None, _always),
    ("layers.{i}.attn.wq", "model.decoder.layers.{i}.self_attn.q_proj.weight", None, _always),
    ("layers.{i}.attn.wk", "model.decoder.layers.{i}.self_attn.k_proj.weight", None, _always),
    ("layers.{i}.attn.wv", "model.decoder.layers.{i}.self_attn.v_proj.weight", None, _always),
    ("layers.{i}.attn.wo", "model.decoder.layers.{i}.self_attn.out_proj.weight", None, _always),
    ("layers.{i}.attn.bq", "model.decoder.layers.{i}.self_attn.q_proj.bias", None, _qkv_bias),
    ("layers.{i}.attn.bk", "model.decoder.layers.{i}.self_attn.k_proj.bias", None, _qkv_bias),
    ("layers.{i}.attn.bv", "model.decoder.layers.{i}.self_attn.v_proj.bias", None, _qkv_bias),
    ("layers.{i}.attn.bo", "model.decoder.layers.{i}.self_attn.out_proj.bias", None, _o_bias),
    ("layers.{i}.ffn_norm.scale", "model.decoder.layers.{i}.final_layer_norm.weight", None, _always),
    ("layers.{i}.ffn_norm.bias", "model.decoder.layers.{i}.final_layer_norm.bias", None, _always),
    ("layers.{i}.ffn.w_up", "model.decoder.layers.{i}.fc1.weight", None, _always),
    ("layers.{i}.ffn.b_up", "model.decoder.layers.{i}.fc1.bias", None, _ffn_bias),
    ("layers.{i}.ffn.w_down", "model.decoder.layers.{i}.fc2.weight", None, _always),
    ("layers.{i}.ffn.b_down", "model.decoder.layers.{i}.fc2.bias", None, _ffn_bias),
]


TABLES = {"llama": LLAMA_TABLE, "mistral": LLAMA_TABLE, "qwen2": LLAMA_TABLE, "qwen3": LLAMA_TABLE,
          "gemma3": GEMMA3_TABLE, "phi3": PHI3_TABLE, "opt": OPT_TABLE,
          "mixtral": MIXTRAL_TABLE, "olmoe": OLMOE_TABLE, "qwen3_moe": OLMOE_TABLE}


# Whether llama.cpp's converter (convert_hf_to_gguf.py) interleaved the two rotary halves of each
# head's attn_q/attn_k rows, per flashjax architecture read from GGUF. Its `LlamaModel.permute` runs
# only for the Llama family (LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM; GGUF
# architecture "llama"), whose ggml RoPE rotates adjacent pairs. Qwen2 (and Qwen2-MoE, Qwen3,
# Qwen3-MoE, Gemma 3, Phi-3, OLMoE) use ggml's NEOX rotation and are stored as Hugging Face stores
# them. transformers' own GGUF loader reverses the permutation for "llama" only, in agreement.
# (Mistral GGUF files are written as "llama" and read as flashjax's "llama".)
GGUF_ROTARY_INTERLEAVED = {
    "llama": True,
    "qwen2": False,
    "qwen3": False,
    "gemma3": False,
    "phi3": False,
    "mixtral": True,  # written by llama.cpp as a "llama" GGUF with experts
    "olmoe": False,
    "qwen3_moe": False,
}


def expected_shape(cfg: ModelConfig, path: str) -> tuple[int, ...]:
    """The shape flashjax needs for a parameter path (after any hook)."""
    d, f, hd, v = cfg.d_model, cfg.d_ffn, cfg.head_dim, cfg.vocab_size
    if path.endswith(("q_norm.scale", "k_norm.scale")):
        if cfg.qk_norm_whole:  # OLMoE: over every head at once
            return ((cfg.n_heads if path.endswith("q_norm.scale") else cfg.n_kv_heads) * hd,)
        return (hd,)
    leaf = path.rsplit(".", 1)[-1]
    shapes = {
        "embedding": (v, d), "positions": (cfg.max_position + cfg.position_offset, d), "lm_head": (v, d),
        "scale": (d,), "bias": (d,),
        "wq": (cfg.n_heads * hd, d), "wk": (cfg.n_kv_heads * hd, d), "wv": (cfg.n_kv_heads * hd, d),
        "wo": (d, cfg.n_heads * hd), "bq": (cfg.n_heads * hd,), "bk": (cfg.n_kv_heads * hd,),
        "bv": (cfg.n_kv_heads * hd,), "bo": (d,),
        "router": (cfg.n_experts, d), "w_gate": (f, d), "w_up": (f, d), "w_down": (d, f), "b_gate": (f,), "b_up": (f,), "b_down": (d,),
    }
    return shapes[leaf]


def _gguf_unpermute(n_heads: int) -> Callable[[np.ndarray], np.ndarray]:
    # llama.cpp's converter interleaves the two halves of each head's rotary
    # dimensions (its RoPE rotates adjacent pairs); Hugging Face rotates halves.
    def hook(w: np.ndarray) -> np.ndarray:
        half = w.shape[0] // n_heads // 2
        return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return hook


def _gguf_hook(cfg: ModelConfig, path: str) -> Callable | None:
    if cfg.architecture not in GGUF_ROTARY_INTERLEAVED:
        raise ValueError(f"no GGUF q/k layout rule for architecture {cfg.architecture}")
    if not GGUF_ROTARY_INTERLEAVED[cfg.architecture]:
        return None
    if path.endswith(("attn.wq", "attn.bq")):
        return _gguf_unpermute(cfg.n_heads)
    if path.endswith(("attn.wk", "attn.bk")):
        return _gguf_unpermute(cfg.n_kv_heads)
    return None


def _plus_one(w: np.ndarray) -> np.ndarray:
    return w + np.float32(1.0)


def _rows(start: int, stop: int) -> Callable[[np.ndarray], np.ndarray]:
    def hook(w: np.ndarray) -> np.ndarray:
        return w[start:stop]
    return hook


def _join_experts(axis: int) -> Callable[[list], np.ndarray]:
    # Hugging Face: one tensor per expert, laid end to end along the neurons.
    def hook(per_expert: list) -> np.ndarray:
        return np.concatenate(per_expert, axis=axis)
    return hook


def _flatten_experts(axis: int) -> Callable[[np.ndarray], np.ndarray]:
    # GGUF: one [E, F, D] tensor (down: [E, D, F]) -> [E * F, D] (down: [D, E * F]). Also applied to a
    # quantized tensor's values, scales and offsets, shaped [E, F, ...] (GGUFFile.read_quantized): their
    # blocks run along the last axis, so they move whole and stay in order within each row.
    def hook(w: np.ndarray) -> np.ndarray:
        if axis == 0:
            return w.reshape(-1, w.shape[-1])
        return w.transpose(1, 0, 2).reshape(w.shape[1], -1)
    return hook


def _hook(cfg: ModelConfig, path: str, fmt: str, fused) -> Callable | None:
    """The one transform a tensor needs on its way in (at most one applies to any tensor)."""
    if fused is not None and fused[0] == "experts":
        return _join_experts(fused[1]) if fmt == "hf" else _flatten_experts(fused[1])
    if fused is not None:
        group, index = fused
        sizes = fused_rows(cfg, group)
        return _rows(sum(sizes[:index]), sum(sizes[:index + 1]))
    if fmt == "gguf":
        return _gguf_hook(cfg, path)
    if cfg.architecture == "gemma3" and path.endswith(".scale"):
        return _plus_one
    return None


def tensor_plan(cfg: ModelConfig, fmt: str) -> Iterator[tuple[str, str, Callable | None]]:
    """Yields (flashjax path, checkpoint name, hook) for every tensor the model needs.

    `fmt` is "hf" or "gguf". A fused checkpoint tensor is named once per part it feeds. A mixture of
    experts' Hugging Face expert tensors come as a tuple of names, one per expert, for a hook that
    joins them.
    """
    column = 1 if fmt == "hf" else 2
    for row in TABLES[cfg.architecture]:
        path, name, needed = row[0], row[column], row[3]
        fused = row[4] if len(row) > 4 else None
        if not needed(cfg) or (path.endswith("w_gate") and not cfg.is_glu):
            continue
        if name is None:
            raise ValueError(f"{path} has no {fmt} name for architecture {cfg.architecture}")
        hook = _hook(cfg, path, fmt, fused)
        layers = range(cfg.n_layers) if "{i}" in path else [None]
        for i in layers:
            if i is None:
                yield path, name, hook
            elif "{e}" in name:
                yield path.format(i=i), tuple(name.format(i=i, e=e) for e in range(cfg.n_experts)), hook
            else:
                yield path.format(i=i), name.format(i=i), hook
