"""Model and engine configuration: frozen, hashable dataclasses.

`ModelConfig` is passed to jitted functions as a static argument, so it must
be hashable (tuples, not lists or dicts) and must hold only what changes the
shape of the computation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "opt")
SUPPORTED_ROPE_SCALING = ("default", "linear", "llama3")


class UnsupportedModelError(ValueError):
    """The checkpoint describes a model flashjax cannot run."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    Two families are covered by the same fields: the Llama family (RMSNorm,
    RoPE, grouped-query attention, SwiGLU FFN) and OPT (LayerNorm, learned
    positions, biases everywhere, ReLU FFN).
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
    ffn_activation: str = "silu_glu"  # "silu_glu" (gate, up, down) | "relu" (up, down)
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
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"unsupported architecture {self.architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedModelError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def is_glu(self) -> bool:
        return self.ffn_activation == "silu_glu"

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
        norms = 2 * d * (2 if self.norm == "layer" else 1)
        per_layer = attn + ffn + norms
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        if not self.uses_rope:
            embed += (self.max_position + self.position_offset) * d
        final_norm = d * (2 if self.norm == "layer" else 1)
        return self.n_layers * per_layer + embed + final_norm

    # ---- constructors -------------------------------------------------

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any], source: str = "config.json") -> "ModelConfig":
        """Builds a config from a Hugging Face `config.json` dictionary."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        common = dict(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"] if "hidden_size" in hf else hf["d_model"],
                      n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                      bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos_ids,
                      tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
        if model_type == "opt":
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
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported (silu only)")
        n_kv = hf.get("num_key_value_heads") or common["n_heads"]
        head_dim = hf.get("head_dim") or common["d_model"] // common["n_heads"]
        sliding = None
        if model_type == "mistral":
            sliding = hf.get("sliding_window")
        elif model_type == "qwen2" and hf.get("use_sliding_window", False):
            sliding = hf.get("sliding_window")
        rope_params = hf.get("rope_parameters") or {}
        rope_theta = hf.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or rope_params
        return cls(architecture=model_type, n_kv_heads=n_kv, head_dim=head_dim,
                   d_ffn=hf["intermediate_size"], max_position=hf.get("max_position_embeddings", 2048),
                   norm="rms", norm_eps=hf.get("rms_norm_eps", 1e-6), ffn_activation="silu_glu",
                   qkv_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
                   o_bias=bool(hf.get("attention_bias", False)), ffn_bias=bool(hf.get("mlp_bias", False)),
                   rope_theta=float(rope_theta), rope_scaling=_rope_scaling(scaling, source),
                   sliding_window=sliding, **common)


def _rope_scaling(scaling: Mapping[str, Any] | None, source: str) -> tuple | None:
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
    raise UnsupportedModelError(
        f"{source}: rope scaling {kind!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_SCALING)}")


def rope_inverse_frequencies(cfg: ModelConfig):
    """Per-pair rotation frequencies, with the checkpoint's RoPE scaling applied (numpy, float64)."""
    import numpy as np

    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
    if cfg.rope_scaling is None:
        return inv_freq
    if cfg.rope_scaling[0] == "linear":
        return inv_freq / cfg.rope_scaling[1]
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
