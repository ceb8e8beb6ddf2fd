"""GGUF files of every supported GGUF architecture against transformers' own GGUF loader.

Tiny random Hugging Face models are written as GGUF the way llama.cpp's converter
(convert_hf_to_gguf.py) writes them: llama.cpp tensor names and metadata, float32
tensors, and - for GGUF architecture "llama" only (Llama, Mistral) - the two
rotary halves of each head's attn_q/attn_k rows interleaved by its
`LlamaModel.permute`. Qwen2 is stored as Hugging Face stores it.

transformers' GGUF loader reverses that permutation for "llama" only, so it is a
reference independent of flashjax's own reading of the layout. Each case also
checks that transformers gives back the source model (so the files are laid out
as llama.cpp and transformers agree) and that reading q/k in the other layout
moves the logits far outside the tolerance (so these tests can fail).
"""

import dataclasses

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import TINY_COMMON, build_tiny, random_ids, sharpen_for_parity
from flashjax.api import LLM
from flashjax.model.params import load_params, set_path
from flashjax.store import open_model_source

TOL = 1e-4
# Reading q/k in the wrong layout must move the logits by far more than TOL.
WRONG_LAYOUT_MIN_DIFF = 1e-2


@dataclasses.dataclass(frozen=True)
class Case:
    build: str  # a name in conftest's TINY, or one of BUILDS (built here)
    arch: str  # GGUF general.architecture
    name: str  # GGUF general.name
    interleaved: bool  # whether llama.cpp's converter permutes attn_q/attn_k for this model
    # Whether transformers' GGUF loader reads every detail of this model back. Where it does not (it
    # ignores Phi-3's rope.dimension_count and LongRoPE factor tensors), the reference is the source
    # model itself, which the file was written from.
    transformers_reads: bool = True


CASES = {
    "llama_gqa": Case("llama_gqa", "llama", "tiny llama", True),  # GQA, tied embeddings (no output.weight)
    "llama_mha": Case("llama_mha", "llama", "tiny llama", True),  # untied embeddings
    # llama.cpp converts MistralForCausalLM with its Llama converter: GGUF architecture "llama", q/k
    # interleaved. transformers reads it as a LlamaForCausalLM (the same model without a sliding
    # window). Its Mistral path (general.name exactly "mistral", or general.architecture "mistral",
    # which llama.cpp never writes) fails: gguf-py has no "mistral" tensor-name map.
    "mistral": Case("mistral_gguf", "llama", "Mistral 7B Instruct v0.3", True),
    "qwen2": Case("qwen2", "qwen2", "tiny qwen2", False),  # GQA, q/k/v biases, tied
    "qwen3": Case("qwen3_gguf", "qwen3", "tiny qwen3", False),  # q/k norms
    "gemma3": Case("gemma3_gguf", "gemma3", "tiny gemma3", False),  # norms stored as 1 + weight, 5 sliding + 1 global
    "phi3": Case("phi3_gguf", "phi3", "tiny phi3", False),  # fused qkv and gate_up
    "phi3_longrope": Case("phi3", "phi3", "tiny phi3", False, transformers_reads=False),  # partial rotary, LongRoPE
}


def _build(directory, config_cls, model_cls, seed, **kwargs):
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**dict(TINY_COMMON, **kwargs))).eval()
    sharpen_for_parity(model)  # as build_tiny: perturbed norms, peaked attention
    model.save_pretrained(directory)
    return model


# Tiny models shaped for what transformers' GGUF loader assumes of each architecture: Qwen3's head_dim
# defaults to 128 (it does not read attention.key_length), Gemma 3's query scale to 1/sqrt(256) and its
# layers to llama.cpp's pattern (every sixth global), Phi-3's rotary to the whole head.
BUILDS = {
    "mistral_gguf": lambda d: build_mistral(d),
    "qwen3_gguf": lambda d: _build(d, "Qwen3Config", "Qwen3ForCausalLM", 3, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=128, tie_word_embeddings=True),
    "gemma3_gguf": lambda d: _build(d, "Gemma3TextConfig", "Gemma3ForCausalLM", 5, num_hidden_layers=6,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                                    query_pre_attn_scalar=256, sliding_window=6, bos_token_id=1, eos_token_id=2,
                                    pad_token_id=0),
    "phi3_gguf": lambda d: _build(d, "Phi3Config", "Phi3ForCausalLM", 9, num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0),
}


def build_mistral(directory):
    """A tiny Mistral without a sliding window: GGUF has no field for it, so the reference read back
    from GGUF (window 4096) could not equal a source model whose window matters at 40 tokens."""
    kwargs = dict(TINY_COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=None,
                  tie_word_embeddings=False)
    torch.manual_seed(7)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**kwargs)).eval()
    sharpen_for_parity(model)  # as build_tiny: perturbed norms, peaked attention so q/k layout mistakes show
    model.save_pretrained(directory)
    return model


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py `LlamaModel.permute`: interleaves the rotary halves of each head."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `llama_cpp_permute`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _byte_level_tokens() -> list[str]:
    """GPT-2's byte-to-unicode table (bytes that print stand for themselves, the rest are shifted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return [table[b] for b in range(256)]


def _add_tokenizer(writer: gguf.GGUFWriter, vocab_size: int):
    # A minimal GPT-2 style byte-level BPE (as llama.cpp writes for Qwen2 and SmolLM2): the first
    # bytes as single-byte tokens, one merge, and an end-of-text control token.
    tokens = _byte_level_tokens()[:vocab_size - 2] + ["\u0120t", "<|endoftext|>"]
    types = [gguf.TokenType.NORMAL] * (vocab_size - 1) + [gguf.TokenType.CONTROL]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["\u0120 t"])
    writer.add_bos_token_id(vocab_size - 1)
    writer.add_eos_token_id(vocab_size - 1)
    writer.add_add_bos_token(False)


def write_gguf(model, path, case: Case):
    """Writes `model` as llama.cpp's converter would for `case.arch`, with float32 tensors."""
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    writer = gguf.GGUFWriter(str(path), case.arch)
    writer.add_name(case.name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)  # Gemma 3: the global layers' base
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if case.arch == "llama":  # LlamaModel.set_gguf_parameters adds these two; Qwen2Model does not
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    if getattr(cfg, "head_dim", None):  # TextModel.set_gguf_parameters, for configs that give head_dim
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if case.arch == "gemma3":
        writer.add_sliding_window(cfg.sliding_window)
    if case.arch == "phi3":  # Phi3MiniModel: the rotary width, and LongRoPE's factors as tensors
        rope = cfg.rope_parameters
        writer.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 1.0)))
        if rope.get("rope_type") == "longrope":
            writer.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
            writer.add_tensor("rope_factors_long.weight", np.asarray(rope["long_factor"], np.float32))
            writer.add_tensor("rope_factors_short.weight", np.asarray(rope["short_factor"], np.float32))
    _add_tokenizer(writer, cfg.vocab_size)
    if case.arch == "phi3":  # else transformers keeps Phi3Config's pad id (32000), outside a tiny vocabulary
        writer.add_pad_token_id(cfg.pad_token_id)

    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    if case.arch == "gemma3":  # Gemma3Model.modify_tensors: norms stored as the multiplier 1 + weight
        state = {k: v + 1.0 if k.endswith("norm.weight") else v for k, v in state.items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight", "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
        # Phi-3's fused projections keep their fused layout (gate_up as ffn_up of twice the width)
        "self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight",
    }
    if case.arch == "gemma3":  # four norms: after attention, and before and after the FFN
        per_layer.update({"post_attention_layernorm.weight": "post_attention_norm.weight",
                          "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                          "post_feedforward_layernorm.weight": "post_ffw_norm.weight"})
    for proj, short in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v")):
        for kind in ("weight", "bias"):
            per_layer[f"self_attn.{proj}.{kind}"] = f"{short}.{kind}"
    for i in range(cfg.num_hidden_layers):
        for hf, ours in per_layer.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{ours}"

    for hf, ours in names.items():
        if hf not in state:  # biases of models without them
            continue
        array = state[hf]
        if case.interleaved and ".attn_q." in ours:
            array = llama_cpp_permute(array, n_heads)
        elif case.interleaved and ".attn_k." in ours:
            array = llama_cpp_permute(array, n_kv)
        writer.add_tensor(ours, np.ascontiguousarray(array))
    assert set(state) - set(names) <= {"lm_head.weight"}, f"tensors not written: {set(state) - set(names)}"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=sorted(CASES))
def gguf_case(request, tmp_path_factory):
    """(case, GGUF path, source transformers model, transformers model read back from the GGUF)."""
    case = CASES[request.param]
    directory = tmp_path_factory.mktemp(f"gguf_{request.param}")
    build = BUILDS.get(case.build) or (lambda d: build_tiny(case.build, d))
    source = build(directory / "hf")
    path = directory / f"{request.param}.gguf"
    write_gguf(source, path, case)
    reference = source
    if case.transformers_reads:
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            directory, gguf_file=path.name, dtype=torch.float32).eval()
    return case, path, source, reference


def _reference_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids[None].astype(np.int64))).logits[0].numpy()


def _flashjax(path):
    source = open_model_source(path)
    return source, load_params(source, progress=False)


def test_transformers_reads_back_the_source_model(gguf_case):
    # The file is laid out as transformers (and llama.cpp) expect: reading it back gives the source model.
    case, _, source, reference = gguf_case
    if not case.transformers_reads:
        pytest.skip("transformers' GGUF loader does not read this model's rotary details back")
    ids = random_ids(24, source.config.vocab_size, seed=1)
    np.testing.assert_allclose(_reference_logits(reference, ids), _reference_logits(source, ids),
                               atol=1e-5, rtol=0)


def test_logits_match_transformers(gguf_case):
    _, path, _, reference = gguf_case
    src, params = _flashjax(path)
    ids = random_ids(24, src.config.vocab_size, seed=1)
    ours = LLM(src.config, params, None).logits(ids)
    assert ours.shape == (24, src.config.vocab_size)
    np.testing.assert_allclose(ours, _reference_logits(reference, ids), atol=TOL, rtol=0)


def test_greedy_tokens_match_transformers(gguf_case):
    from test_default_model import reference_greedy

    _, path, _, reference = gguf_case
    src, params = _flashjax(path)
    prompt = random_ids(6, src.config.vocab_size, seed=3)
    expected = reference_greedy(reference, prompt.tolist(), 16)
    assert list(LLM(src.config, params, None).generate_ids(prompt, max_tokens=16, stop_at_eos=False)) == expected


def test_other_rotary_layout_changes_logits(gguf_case):
    """q/k read in the layout the file does not have (interleaved read as halves, or the reverse) moves
    the logits far outside the tolerance: the parity tests above can tell the layouts apart."""
    case, path, _, reference = gguf_case
    src, params = _flashjax(path)
    cfg = src.config
    for i in range(cfg.n_layers):
        attn = params["layers"][i]["attn"]
        for name, heads in (("wq", cfg.n_heads), ("wk", cfg.n_kv_heads), ("bq", cfg.n_heads), ("bk", cfg.n_kv_heads)):
            if name not in attn:
                continue
            # As read (the file's layout undone): an interleaved file read as halves gets the rows as
            # stored, a file stored as halves read as if llama.cpp had interleaved them gets them unpermuted.
            ours = np.asarray(attn[name])
            wrong = llama_cpp_permute(ours, heads) if case.interleaved else llama_cpp_unpermute(ours, heads)
            set_path(params, f"layers.{i}.attn.{name}", jnp.asarray(wrong))
    ids = random_ids(24, cfg.vocab_size, seed=1)
    diff = np.abs(LLM(cfg, params, None).logits(ids) - _reference_logits(reference, ids)).max()
    assert diff > WRONG_LAYOUT_MIN_DIFF


def test_tokenizer_matches_transformers(gguf_case):
    # The minimal tokenizer is accepted by both loaders and encodes alike (one merge included).
    _, path, _, _ = gguf_case
    text = "def t(x): return x + 1\n\tat tea"
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = open_model_source(path).tokenizer()
    assert ours.encode(text) == theirs(text)["input_ids"]
