"""GGUF files: model config from the metadata, tensors dequantized one at a time."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from flashjax.config import ModelConfig, UnsupportedModelError
from flashjax.weights.errors import CheckpointError
from flashjax.weights.gguf_format import GGUFContainer, GGUFFormatError

# GGUF architecture name -> flashjax architecture. Mistral GGUFs say "llama", and so do Mixtral's:
# llama.cpp's converter writes MixtralForCausalLM with its Llama converter (q/k permuted as for Llama),
# adding llama.expert_count, so a "llama" file with experts is read as "mixtral".
_GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3",
               "phi3": "phi3", "olmoe": "olmoe", "qwen3moe": "qwen3_moe"}
# Whether the router's top-k weights are rescaled to sum to 1 (config.ModelConfig.router_renormalize).
# llama.cpp fixes it in each architecture's graph (build_moe_ffn's norm_w: true in its llama and
# qwen3moe graphs, false in olmoe's) and reads no metadata key for it there (expert_weights_norm is
# read only by other architectures), so a GGUF runs as llama.cpp runs it; it matches the Hugging Face
# configs of the released models (Mixtral always renormalizes; OLMoE's norm_topk_prob is false,
# Qwen3-MoE's true).
_GGUF_ROUTER_RENORMALIZE = {"mixtral": True, "olmoe": False, "qwen3_moe": True}
# llama.cpp's Gemma 3: every sixth layer global, the sliding layers' RoPE base fixed (llama-model.cpp).
GEMMA3_SLIDING_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10_000.0


class GGUFFile:
    """A GGUF file, memory-mapped (weights/gguf_format.py); tensors are dequantized when read."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: file not found")
        try:  # also checks that every tensor's data lies inside the file
            self._gguf = GGUFContainer(self.path)
        except GGUFFormatError as e:
            raise CheckpointError(str(e)) from None
        self._tensors = self._gguf.tensors

    def field(self, key: str, default=None):
        """A metadata value (int, float, bool, str or list; lists are shared: do not modify them)."""
        return self._gguf.fields.get(key, default)

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions fastest-first; numpy order is the reverse.
        return self._tensors[name].shape

    def read(self, name: str) -> np.ndarray:
        import gguf

        t = self._tensors[name]
        try:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot dequantize tensor {name!r} "
                                  f"({t.tensor_type.name}): {e}") from None
        return np.asarray(data, dtype=np.float32).reshape(self.shape(name))

    def read_quantized(self, name: str):
        """The tensor as flashjax.quant.QuantizedRows when its GGUF blocks map onto flashjax's formats
        code for code (weights/gguf_blocks.py), with the relative error of that copy against the GGUF's
        own dequantized values; None otherwise (the caller then reads floats). A 3-D tensor (a mixture
        of experts' [E, rows, k]) comes with its arrays shaped [E, rows, ...], for the mapping's hook."""
        from flashjax.quant import relative_rms_error
        from flashjax.weights.gguf_blocks import read_blocks

        t = self._tensors[name]
        shape = self.shape(name)
        if len(shape) not in (2, 3):
            return None
        n_rows = math.prod(shape[:-1])
        try:
            rows = read_blocks(t.tensor_type.name, np.asarray(t.data).reshape(n_rows, -1), shape[-1])
        except ValueError as e:
            raise CheckpointError(f"{self.path}: cannot read the blocks of tensor {name!r} "
                                  f"({t.tensor_type.name}): {e}") from None
        if rows is None:
            return None
        # Only Q4_K's scales change (rounded to float16); the other direct types copy exactly.
        error = (relative_rms_error(rows.dequantize(), self.read(name).reshape(n_rows, -1))
                 if t.tensor_type.name == "Q4_K" else 0.0)
        rows = dataclasses.replace(rows, origin=t.tensor_type.name, origin_error=error)
        if len(shape) == 3:
            # A layer's experts [E, rows, k] (llama.cpp's ffn_*_exps): values, scales and offsets keep
            # the expert axis in front, [E, rows, ...], for the mapping's hook to lay the experts end to
            # end as it does the floats (weights/mapping.py `_flatten_experts`). Rows of k values hold
            # whole blocks (read_blocks returns None otherwise), so any regrouping along the rows or
            # across experts moves whole blocks with their scales.
            rows = dataclasses.replace(rows, **{key: getattr(rows, key).reshape(*shape[:-1], -1)
                                                for key in ("values", "scales", "offsets")
                                                if getattr(rows, key) is not None})
        return rows

    def model_config(self) -> ModelConfig:
        arch = self.field("general.architecture")
        if arch not in _GGUF_ARCHS:
            raise UnsupportedModelError(f"{self.path}: unsupported GGUF architecture {arch!r}; "
                                        f"supported: {', '.join(sorted(_GGUF_ARCHS))}")

        def need(key):
            value = self.field(f"{arch}.{key}")
            if value is None:
                raise CheckpointError(f"{self.path}: GGUF metadata field {arch}.{key} is missing")
            return value

        n_heads = int(need("attention.head_count"))
        d_model = int(need("embedding_length"))
        vocab = self.field(f"{arch}.vocab_size")
        if vocab is None:
            if "tokenizer.ggml.tokens" not in self._gguf.fields:
                raise CheckpointError(f"{self.path}: GGUF metadata has neither {arch}.vocab_size nor "
                                      f"tokenizer.ggml.tokens, so the vocabulary size is unknown")
            vocab = len(self._gguf.fields["tokenizer.ggml.tokens"])
        head_dim = int(self.field(f"{arch}.attention.key_length") or d_model // n_heads)
        n_layers = int(need("block_count"))
        scaling = None
        if self.field(f"{arch}.rope.scaling.type") == "linear":
            scaling = ("linear", float(self.field(f"{arch}.rope.scaling.factor")))
        eos = self.field("tokenizer.ggml.eos_token_id")
        eot = self.field("tokenizer.ggml.eot_token_id")
        eos_ids = tuple(dict.fromkeys(int(i) for i in (eos, eot) if i is not None))
        bos = self.field("tokenizer.ggml.bos_token_id")
        max_position = int(need("context_length"))
        extra = {}
        if arch in ("qwen3", "qwen3moe"):
            extra = dict(qk_norm=True)
        elif arch == "olmoe":
            # attn_q_norm / attn_k_norm over the whole projection (every head at once), as llama.cpp's
            # olmoe graph applies them before splitting the heads; the rotary halves stay as Hugging Face has them.
            extra = dict(qk_norm=True, qk_norm_whole=True)
        elif arch == "gemma3":
            # llama.cpp scales queries by 1/sqrt(head_dim) except on the 27B (62 layers), whose
            # query_pre_attn_scalar is d_model / n_heads; its files store the norms as 1 + weight.
            scalar = d_model // n_heads if n_layers == 62 else head_dim
            extra = dict(ffn_activation="gelu_tanh_glu", qk_norm=True, sandwich_norm=True,
                         embed_scale=float(d_model) ** 0.5, attn_scale=float(scalar) ** -0.5,
                         sliding_window=int(need("attention.sliding_window")),
                         layer_types=tuple("sliding" if (i + 1) % GEMMA3_SLIDING_PATTERN else "full"
                                           for i in range(n_layers)),
                         local_rope_theta=GEMMA3_LOCAL_ROPE_THETA,
                         final_softcap=self.field(f"{arch}.final_logit_softcapping"))
        elif arch == "phi3":
            rotary = self.field(f"{arch}.rope.dimension_count")
            window = self.field(f"{arch}.attention.sliding_window")
            extra = dict(rotary_dim=None if rotary in (None, head_dim) else int(rotary),
                         sliding_window=int(window) if window else None)
            if "rope_factors_long.weight" in self._tensors:
                original = int(self.field(f"{arch}.rope.scaling.original_context_length") or max_position)
                factor = self.field(f"{arch}.rope.scaling.attn_factor")
                if factor is None:
                    ratio = max_position / original
                    factor = 1.0 if ratio <= 1.0 else math.sqrt(1 + math.log(ratio) / math.log(original))
                scaling = ("longrope", tuple(float(v) for v in self.read("rope_factors_short.weight")),
                           tuple(float(v) for v in self.read("rope_factors_long.weight")), original, float(factor))
        architecture, d_ffn = _GGUF_ARCHS[arch], int(need("feed_forward_length"))
        n_experts = int(self.field(f"{arch}.expert_count") or 0)
        if arch in ("olmoe", "qwen3moe") and not n_experts:
            raise CheckpointError(f"{self.path}: GGUF metadata field {arch}.expert_count is missing")
        if n_experts:
            if architecture == "llama":
                architecture = "mixtral"
            elif architecture not in _GGUF_ROUTER_RENORMALIZE:
                raise UnsupportedModelError(f"{self.path}: a {arch!r} GGUF with experts is not supported")
            used = int(need("expert_used_count"))
            # An expert's neurons: feed_forward_length for llama and olmoe (llama.cpp's graphs);
            # qwen3moe's feed_forward_length is the dense size its converter copies from the config,
            # unused, and expert_feed_forward_length the expert's (llama.cpp's fallback without it: n_ff
            # divided by the experts used). flashjax lays the experts end to end as one FFN.
            per_expert = d_ffn
            if arch == "qwen3moe":
                per_expert = int(self.field(f"{arch}.expert_feed_forward_length") or d_ffn // used)
            d_ffn = n_experts * per_expert
            extra.update(n_experts=n_experts, experts_per_token=used,
                         router_renormalize=_GGUF_ROUTER_RENORMALIZE[architecture])
        return ModelConfig(
            architecture=architecture, vocab_size=int(vocab), d_model=d_model,
            n_layers=n_layers, n_heads=n_heads,
            n_kv_heads=int(self.field(f"{arch}.attention.head_count_kv") or n_heads), head_dim=head_dim,
            d_ffn=d_ffn, max_position=max_position,
            norm="rms", norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            qkv_bias="blk.0.attn_q.bias" in self._tensors, o_bias="blk.0.attn_output.bias" in self._tensors,
            tie_embeddings="output.weight" not in self._tensors,
            rope_theta=float(self.field(f"{arch}.rope.freq_base") or 10000.0), rope_scaling=scaling,
            bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids, **extra)
