"""GGUF files: model config from the metadata, tensors dequantized one at a time."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from flashjax.config import ModelConfig, UnsupportedModelError
from flashjax.weights.errors import CheckpointError

# GGUF architecture name -> flashjax architecture. Mistral GGUFs say "llama".
_GGUF_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}


class GGUFFile:
    """A GGUF file opened with the `gguf` package (memory-mapped; tensors read lazily)."""

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: file not found")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the gguf package raises bare ValueError/IndexError on truncation
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        self._tensors = {t.name: t for t in self._reader.tensors}
        size = os.path.getsize(self.path)
        for t in self._reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise CheckpointError(f"{self.path}: truncated file: tensor {t.name!r} ends at byte "
                                      f"{t.data_offset + t.n_bytes} but the file has {size} bytes")

    def field(self, key: str, default=None):
        f = self._reader.fields.get(key)
        return default if f is None else f.contents()

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions fastest-first; numpy order is the reverse.
        return tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))

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
        own dequantized values; None otherwise (the caller then reads floats)."""
        from flashjax.quant import relative_rms_error
        from flashjax.weights.gguf_blocks import read_blocks

        t = self._tensors[name]
        shape = self.shape(name)
        if len(shape) != 2:
            return None
        try:
            rows = read_blocks(t.tensor_type.name, np.asarray(t.data).reshape(shape[0], -1), shape[1])
        except ValueError as e:
            raise CheckpointError(f"{self.path}: cannot read the blocks of tensor {name!r} "
                                  f"({t.tensor_type.name}): {e}") from None
        if rows is None:
            return None
        # Only Q4_K's scales change (rounded to float16); the other direct types copy exactly.
        error = relative_rms_error(rows.dequantize(), self.read(name)) if t.tensor_type.name == "Q4_K" else 0.0
        return dataclasses.replace(rows, origin=t.tensor_type.name, origin_error=error)

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
            if "tokenizer.ggml.tokens" not in self._reader.fields:
                raise CheckpointError(f"{self.path}: GGUF metadata has neither {arch}.vocab_size nor "
                                      f"tokenizer.ggml.tokens, so the vocabulary size is unknown")
            vocab = len(self._reader.fields["tokenizer.ggml.tokens"].data)
        head_dim = int(self.field(f"{arch}.attention.key_length") or d_model // n_heads)
        scaling = None
        if self.field(f"{arch}.rope.scaling.type") == "linear":
            scaling = ("linear", float(self.field(f"{arch}.rope.scaling.factor")))
        eos = self.field("tokenizer.ggml.eos_token_id")
        eot = self.field("tokenizer.ggml.eot_token_id")
        eos_ids = tuple(dict.fromkeys(int(i) for i in (eos, eot) if i is not None))
        bos = self.field("tokenizer.ggml.bos_token_id")
        return ModelConfig(
            architecture=_GGUF_ARCHS[arch], vocab_size=int(vocab), d_model=d_model,
            n_layers=int(need("block_count")), n_heads=n_heads,
            n_kv_heads=int(self.field(f"{arch}.attention.head_count_kv") or n_heads), head_dim=head_dim,
            d_ffn=int(need("feed_forward_length")), max_position=int(need("context_length")),
            norm="rms", norm_eps=float(need("attention.layer_norm_rms_epsilon")), ffn_activation="silu_glu",
            qkv_bias="blk.0.attn_q.bias" in self._tensors, o_bias="blk.0.attn_output.bias" in self._tensors,
            tie_embeddings="output.weight" not in self._tensors,
            rope_theta=float(self.field(f"{arch}.rope.freq_base") or 10000.0), rope_scaling=scaling,
            bos_token_id=None if bos is None else int(bos), eos_token_ids=eos_ids)
