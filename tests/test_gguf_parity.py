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
from flashjax.weights.gguf_reader import GGUFFile

TOL = 1e-4
# Reading q/k in the wrong layout must move the logits by far more than TOL.
WRONG_LAYOUT_MIN_DIFF = 1e-2


@dataclasses.dataclass(frozen=True)
class Case:
    build: str  # a name in conftest's TINY, or "mistral_gguf" (built here)
    arch: str  # GGUF general.architecture
    name: str  # GGUF general.name
    interleaved: bool  # whether llama.cpp's converter permutes attn_q/attn_k for this model


CASES = {
    "llama_gqa": Case("llama_gqa", "llama", "tiny llama", True),  # GQA, tied embeddings (no output.weight)
    "llama_mha": Case("llama_mha", "llama", "tiny llama", True),  # untied embeddings
    # llama.cpp converts MistralForCausalLM with its Llama converter: GGUF architecture "llama", q/k
    # interleaved. transformers reads it as a LlamaForCausalLM (the same model without a sliding
    # window). Its Mistral path (general.name exactly "mistral", or general.architecture "mistral",
    # which llama.cpp never writes) fails: gguf-py has no "mistral" tensor-name map.
    "mistral": Case("mistral_gguf", "llama", "Mistral 7B Instruct v0.3", True),
    "qwen2": Case("qwen2", "qwen2", "tiny qwen2", False),  # GQA, q/k/v biases, tied
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
    head_dim = cfg.hidden_size // n_heads
    writer = gguf.GGUFWriter(str(path), case.arch)
    writer.add_name(case.name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if case.arch == "llama":  # LlamaModel.set_gguf_parameters adds these two; Qwen2Model does not
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_rope_dimension_count(head_dim)
    _add_tokenizer(writer, cfg.vocab_size)

    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight", "self_attn.o_proj.weight": "attn_output.weight",
    }
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
    build = build_mistral if case.build == "mistral_gguf" else lambda d: build_tiny(case.build, d)
    source = build(directory / "hf")
    path = directory / f"{request.param}.gguf"
    write_gguf(source, path, case)
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
    _, _, source, reference = gguf_case
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
    cfg, raw = src.config, GGUFFile(path)
    for i in range(cfg.n_layers):
        for ours, theirs, heads in (("wq", "attn_q.weight", cfg.n_heads), ("wk", "attn_k.weight", cfg.n_kv_heads),
                                    ("bq", "attn_q.bias", cfg.n_heads), ("bk", "attn_k.bias", cfg.n_kv_heads)):
            if f"blk.{i}.{theirs}" not in raw.names():
                continue
            stored = raw.read(f"blk.{i}.{theirs}")
            # The file's stored rows as they are (an interleaved file read as halves), or unpermuted as
            # if llama.cpp had interleaved them (a file stored as halves read as interleaved).
            wrong = stored if case.interleaved else llama_cpp_unpermute(stored, heads)
            set_path(params, f"layers.{i}.attn.{ours}", jnp.asarray(wrong))
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
