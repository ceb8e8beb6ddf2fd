"""Model and engine configuration: frozen, hashable dataclasses.

`ModelConfig` is passed to jitted functions as a static argument, so it must
be hashable (tuples, not lists or dicts) and must hold only what changes the
shape of the computation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3", "opt",
                           "mixtral", "olmoe", "qwen3_moe")
SUPPORTED_ROPE_SCALING = ("default", "linear", "llama3", "longrope")
# Hugging Face model_type -> flashjax architecture (Gemma 3's text-only checkpoints say "gemma3_text").
HF_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                  "gemma3_text": "gemma3", "phi3": "phi3", "opt": "opt",
                  "mixtral": "mixtral", "olmoe": "olmoe", "qwen3_moe": "qwen3_moe"}
# FFN activations: the gated ones multiply act(gate) by up (SwiGLU, GeGLU); "relu" is OPT's ungated FFN.
GATED_ACTIVATIONS = ("silu_glu", "gelu_tanh_glu", "gelu_glu")
FFN_ACTIVATIONS = GATED_ACTIVATIONS + ("relu",)
# Hugging Face hidden_act -> flashjax gated activation.
_HF_GATED_ACTIVATIONS = {"silu": "silu_glu", "swish": "silu_glu", "gelu_pytorch_tanh": "gelu_tanh_glu",
                         "gelu_new": "gelu_tanh_glu", "gelu": "gelu_glu"}


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model flashjax cannot run."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    Two families are covered by the same fields: the Llama family (RMSNorm,
    RoPE, grouped-query attention, gated FFN) and OPT (LayerNorm, learned
    positions, biases everywhere, ReLU FFN). Qwen3, Gemma 3 and Phi-3 are the
    Llama family with the options below switched on (query/key norms, norms
    after attention and FFN, scaled embeddings, soft-capping, sliding and global
    layers, partial rotary, LongRoPE, final logit soft-capping).

    Gemma's RMSNorm multiplies by (1 + weight): flashjax holds the multiplier itself (as llama.cpp's
    GGUF files store it), adding 1 when it reads a Hugging Face checkpoint (weights/mapping.py).
    """

    architecture: str  # one of SUPPORTED_ARCHITECTURES
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ffn: int
    max_position: int
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-5
    ffn_activation: str = "silu_glu"  # one of FFN_ACTIVATIONS: gated (gate, up, down) or "relu" (up, down)
    qkv_bias: bool = False
    o_bias: bool = False
    ffn_bias: bool = False
    tie_embeddings: bool = True
    # RoPE (Llama family). None for learned absolute positions (OPT).
    rope_theta: float | None = 10000.0
    # ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position) or ("linear", factor)
    rope_scaling: tuple | None = None
    # OPT's learned position table starts at index 2 (a fairseq legacy).
    position_offset: int = 0
    sliding_window: int | None = None
    # Per layer "sliding" or "full" (Gemma 3: local layers with `sliding_window` and `local_rope_theta`,
    # global layers with `rope_theta` and `rope_scaling`); () when every layer is alike.
    layer_types: tuple[str, ...] = ()
    local_rope_theta: float | None = None
    # Rotary dimensions per head (Phi-3's partial rotary); None: the whole head.
    rotary_dim: int | None = None
    qk_norm: bool = False  # RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3)
    sandwich_norm: bool = False  # norms after attention and after the FFN too (Gemma 3)
    embed_scale: float | None = None  # token embeddings multiplied by this (Gemma: sqrt(d_model))
    attn_scale: float | None = None  # attention scores' scale; None: head_dim ** -0.5
    final_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma)
    # Mixture of experts (Mixtral, OLMoE, Qwen3-MoE); 0: a dense FFN. A layer's FFN is its experts'
    # neurons laid end to end: d_ffn = n_experts * expert_ffn, expert e owning neurons
    # e * expert_ffn .. (e + 1) * expert_ffn - 1. So records, caches and reads see one FFN, in which an
    # expert is a contiguous range, and the router's weights scale each neuron by its expert's weight.
    n_experts: int = 0
    experts_per_token: int = 0
    router_renormalize: bool = False  # the top-k weights rescaled to sum to 1 (Mixtral; norm_topk_prob)
    qk_norm_whole: bool = False  # OLMoE: one RMSNorm over all query (key) heads together, not per head
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.ffn_activation not in FFN_ACTIVATIONS:
            raise UnsupportedModelError(
                f"unsupported FFN activation {self.ffn_activation!r}; supported: {', '.join(FFN_ACTIVATIONS)}")
        if self.layer_types and (len(self.layer_types) != self.n_layers
                                 or set(self.layer_types) - {"sliding", "full"}):
            raise UnsupportedModelError(f"layer_types must give 'sliding' or 'full' for each of the {self.n_layers} "
                                        f"layers, got {self.layer_types}")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise UnsupportedModelError(f"rotary_dim {self.rotary_dim} must be even and within the head ({self.head_dim})")
        if self.n_experts:
            if self.n_experts < 0 or self.d_ffn % self.n_experts:
                raise UnsupportedModelError(f"d_ffn {self.d_ffn} is not {self.n_experts} experts of equal size")
            if not 0 < self.experts_per_token <= self.n_experts:
                raise UnsupportedModelError(f"experts_per_token must be in 1..{self.n_experts}, "
                                            f"got {self.experts_per_token}")
            if not self.is_glu:
                raise UnsupportedModelError("mixture-of-experts models must have gated experts")

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def expert_ffn(self) -> int:
        """Neurons per expert (the whole FFN for a dense model)."""
        return self.d_ffn // self.n_experts if self.n_experts else self.d_ffn

    @property
    def is_glu(self) -> bool:
        return self.ffn_activation in GATED_ACTIVATIONS

    @property
    def rotary_width(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    def layer_config(self, i: int) -> "ModelConfig":
        """The config layer i's attention runs with: a sliding layer's window and RoPE base, or a
        global layer's. The same object for models whose layers are alike, so a jitted step compiles
        once per kind of layer, not once per layer."""
        if not self.layer_types:
            return self
        if self.layer_types[i] == "sliding":
            return dataclasses.replace(self, layer_types=(), rope_scaling=None,
                                       rope_theta=self.local_rope_theta or self.rope_theta)
        return dataclasses.replace(self, layer_types=(), sliding_window=None)

    @property
    def uses_rope(self) -> bool:
        return self.rope_theta is not None

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    def param_count(self) -> int:
        """Number of weights, counted from the shapes (biases and norms included)."""
        d, f, hd = self.d_model, self.d_ffn, self.head_dim
        attn = d * hd * (self.n_heads * 2 + self.n_kv_heads * 2)
        if self.qkv_bias:
            attn += hd * (self.n_heads + 2 * self.n_kv_heads)
        if self.o_bias:
            attn += d
        ffn = d * f * (3 if self.is_glu else 2) + ((f + d) if self.ffn_bias else 0)
        norms = (4 if self.sandwich_norm else 2) * d * (2 if self.norm == "layer" else 1)
        if self.qk_norm:
            norms += (self.n_heads + self.n_kv_heads) * hd if self.qk_norm_whole else 2 * hd
        router = self.n_experts * d
        per_layer = attn + ffn + norms + router
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        if not self.uses_rope:
            embed += (self.max_position + self.position_offset) * d
        final_norm = d * (2 if self.norm == "layer" else 1)
        return self.n_layers * per_layer + embed + final_norm

    # ---- constructors -------------------------------------------------

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        """Builds a config from a Hugging Face `config.json` dictionary."""
        if hf.get("model_type") == "gemma3":
            # Gemma 3 4B-27B are image-text checkpoints: flashjax runs their language model (its
            # config is text_config; weights.source maps the tensor names), text in, text out.
            if not isinstance(hf.get("text_config"), Mapping):
                raise UnsupportedModelError(f"{source}: a Gemma 3 image-text config without text_config")
            hf = dict(hf["text_config"], model_type="gemma3_text",
                      tie_word_embeddings=hf.get("tie_word_embeddings", hf["text_config"].get("tie_word_embeddings", True)))
        model_type = hf.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(HF_MODEL_TYPES)}")
        arch = HF_MODEL_TYPES[model_type]
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        common = dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"] if "hidden_size" in hf else hf["d_model"],
                      n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                      bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids,
                      tie_embeddings=bool(hf.get("tie_word_embeddings", arch not in ("phi3",))))
        if arch == "opt":
            if not hf.get("do_layer_norm_before", True):
                raise UnsupportedModelError(f"{source}: OPT with do_layer_norm_before=false (OPT-350m) is not supported")
            if hf.get("word_embed_proj_dim", common["d_model"]) != common["d_model"]:
                raise UnsupportedModelError(f"{source}: OPT with word_embed_proj_dim != hidden_size is not supported")
            if hf.get("activation_function", "relu") != "relu":
                raise UnsupportedModelError(f"{source}: OPT activation {hf['activation_function']!r} is not supported (relu only)")
            bias = bool(hf.get("enable_bias", True))
            return cls(architecture="opt", n_kv_heads=common["n_heads"],
                       head_dim=common["d_model"] // common["n_heads"], d_ffn=hf["ffn_dim"],
                       max_position=hf["max_position_embeddings"], norm="layer", norm_eps=1e-5,
                       ffn_activation="relu", qkv_bias=bias, o_bias=bias, ffn_bias=bias,
                       rope_theta=None, position_offset=2, **common)
        # Gemma names its activation hidden_activation (older Gemma configs carry both names).
        act = hf.get("hidden_activation") or hf.get("hidden_act", "silu")
        if act not in _HF_GATED_ACTIVATIONS:
            raise UnsupportedModelError(f"{source}: hidden activation {act!r} is not supported "
                                        f"(supported: {', '.join(_HF_GATED_ACTIVATIONS)})")
        n_kv = hf.get("num_key_value_heads") or common["n_heads"]
        head_dim = hf.get("head_dim") or common["d_model"] // common["n_heads"]
        max_position = hf.get("max_position_embeddings", 2048)
        sliding = None
        if arch in ("mistral", "mixtral", "phi3", "gemma3"):
            sliding = hf.get("sliding_window")
        elif arch in ("qwen2", "qwen3", "qwen3_moe") and hf.get("use_sliding_window", False):
            sliding = hf.get("sliding_window")
        rope_params = hf.get("rope_parameters") or {}
        extra = {}
        if arch == "gemma3":
            if hf.get("use_bidirectional_attention"):
                raise UnsupportedModelError(f"{source}: Gemma 3 with bidirectional attention is not supported")
            pattern = hf.get("sliding_window_pattern", 6)
            kinds = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                              for i in range(common["n_layers"])]
            # transformers 5 nests RoPE per kind of layer; older configs say rope_theta / rope_local_base_freq.
            full = rope_params.get("full_attention", {})
            local = rope_params.get("sliding_attention", {})
            if local.get("rope_type", "default") != "default":
                raise UnsupportedModelError(f"{source}: RoPE scaling on Gemma 3's sliding layers is not supported")
            rope_theta = full.get("rope_theta", hf.get("rope_theta", 1_000_000.0))
            scaling = hf.get("rope_scaling") or full
            extra = dict(layer_types=tuple("sliding" if k == "sliding_attention" else "full" for k in kinds),
                         local_rope_theta=float(local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))),
                         qk_norm=True, sandwich_norm=True, embed_scale=float(common["d_model"]) ** 0.5,
                         attn_scale=float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5,
                         # attn_logit_softcapping is a Gemma 2 field Gemma 3 ignores: transformers'
                         # Gemma3Attention never applies it, nor does llama.cpp's gemma3 graph.
                         final_softcap=hf.get("final_logit_softcapping"))
        else:
            rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
            scaling = hf.get("rope_scaling") or rope_params
            extra = dict(qk_norm=arch in ("qwen3", "qwen3_moe", "olmoe"), qk_norm_whole=arch == "olmoe")
        d_ffn = hf["intermediate_size"]
        if arch in ("mixtral", "olmoe", "qwen3_moe"):
            extra.update(_moe_fields(hf, arch, source))
            d_ffn = extra["n_experts"] * (hf["moe_intermediate_size"] if arch == "qwen3_moe" else d_ffn)
        partial = hf.get("partial_rotary_factor", rope_params.get("partial_rotary_factor", 1.0))
        rotary_dim = int(head_dim * partial) if partial != 1.0 else None
        original_max = hf.get("original_max_position_embeddings") or (scaling or {}).get("original_max_position_embeddings")
        return cls(architecture=arch, n_kv_heads=n_kv, head_dim=head_dim,
                   d_ffn=d_ffn, max_position=max_position,
                   norm="rms", norm_eps=hf.get("rms_norm_eps", 1e-6), ffn_activation=_HF_GATED_ACTIVATIONS[act],
                   qkv_bias=bool(hf.get("attention_bias", arch == "qwen2")),
                   o_bias=bool(hf.get("attention_bias", False)) and arch != "qwen2",
                   ffn_bias=bool(hf.get("mlp_bias", False)),
                   rope_theta=float(rope_theta),
                   rope_scaling=_rope_scaling(scaling, source, max_position, original_max),
                   sliding_window=sliding, rotary_dim=rotary_dim, **extra, **common)


def _moe_fields(hf: Mapping[str, Any], arch: str, source: str) -> dict:
    """The router's fields of a mixture-of-experts config (Mixtral, OLMoE, Qwen3-MoE)."""
    if arch == "olmoe" and hf.get("clip_qkv") is not None:
        raise UnsupportedModelError(f"{source}: OLMoE with clip_qkv is not supported")
    if arch == "qwen3_moe" and (hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1):
        raise UnsupportedModelError(f"{source}: Qwen3-MoE with dense layers among the expert layers "
                                    f"(mlp_only_layers, decoder_sparse_step) is not supported")
    # Hub configs say num_local_experts (Mixtral) or num_experts; transformers 5 writes the former for all.
    n_experts = hf.get("num_local_experts") or hf.get("num_experts")
    if not n_experts or "num_experts_per_tok" not in hf:
        raise UnsupportedModelError(f"{source}: a mixture-of-experts config without num_experts and num_experts_per_tok")
    # Mixtral always renormalizes its top-k weights; OLMoE and Qwen3-MoE say so in norm_topk_prob.
    renormalize = True if arch == "mixtral" else bool(hf.get("norm_topk_prob", False))
    return dict(n_experts=int(n_experts), experts_per_token=int(hf["num_experts_per_tok"]),
                router_renormalize=renormalize)


def _rope_scaling(scaling: Mapping[str, Any] | None, source: str, max_position: int = 0,
                  original_max: int | None = None) -> tuple | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind == "linear":
        return ("linear", float(scaling["factor"]))
    if kind == "llama3":
        return ("llama3", float(scaling["factor"]), float(scaling["low_freq_factor"]),
                float(scaling["high_freq_factor"]), int(scaling["original_max_position_embeddings"]))
    if kind in ("longrope", "su"):
        # Phi-3's LongRoPE: per-pair frequency divisors, the short set up to the pretraining length and
        # the long set past it, and cos/sin scaled by an attention factor (the paper's, from the ratio
        # of lengths, unless the config gives one).
        original_max = int(original_max or max_position)
        factor = scaling.get("factor") or max_position / original_max
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original_max))
        return ("longrope", tuple(float(v) for v in scaling["short_factor"]),
                tuple(float(v) for v in scaling["long_factor"]), original_max, float(attention_factor))
    raise UnsupportedModelError(
        f"{source}: rope scaling {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_SCALING)}")


def rope_inverse_frequencies(cfg: ModelConfig, long: bool = False):
    """Per-pair rotation frequencies over the rotary dimensions, with the checkpoint's RoPE scaling
    applied (numpy, float64). LongRoPE has two sets: `long` picks the one past the pretraining length."""
    import numpy as np

    dim = cfg.rotary_width
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if cfg.rope_scaling is None:
        return inv_freq
    if cfg.rope_scaling[0] == "linear":
        return inv_freq / cfg.rope_scaling[1]
    if cfg.rope_scaling[0] == "longrope":
        factors = np.asarray(cfg.rope_scaling[2 if long else 1], np.float64)
        if factors.shape != inv_freq.shape:
            raise UnsupportedModelError(f"LongRoPE has {len(factors)} factors for {len(inv_freq)} rotary pairs")
        return inv_freq / factors
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
    _, factor, low_ff, high_ff, original_max = cfg.rope_scaling
    low_wavelen, high_wavelen = original_max / low_ff, original_max / high_ff
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max / wavelen - low_ff) / (high_ff - low_ff)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model (not what the model is)."""

    compute_dtype: str = "float32"  # bfloat16 matmuls on XLA:CPU measured ~13x slower than float32
    max_context: int | None = None  # None: the model's own limit
    # KV cache capacity is rounded up to this, so a new capacity (and compile) is rare.
    cache_block: int = 256
    # Prompts are padded up to a multiple of this before prefill, bounding the number of compiles.
    prefill_block: int = 64

    def __post_init__(self):
        if self.compute_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"compute dtype must be float32, bfloat16 or float16, not {self.compute_dtype!r}")
        # Two tokens at least: one of prompt and one generated.
        if self.max_context is not None and (isinstance(self.max_context, bool)
                                             or not isinstance(self.max_context, int) or self.max_context < 2):
            raise ValueError(f"max_context must be an integer of at least 2 tokens, got {self.max_context!r}")
        if self.cache_block < 1 or self.prefill_block < 1:
            raise ValueError("cache_block and prefill_block must be at least 1")
