"""Mixtures of experts from GGUF files written as llama.cpp's converter writes them, and quantized.

llama.cpp's convert_hf_to_gguf.py stacks a layer's per-expert tensors into one 3-D tensor each,
blk.{i}.ffn_gate_exps / ffn_up_exps [E, F, D] and ffn_down_exps [E, D, F] (numpy order), and stores
the router as blk.{i}.ffn_gate_inp [E, D]. Per architecture:

- Mixtral: its Llama converter (LlamaModel), so general.architecture "llama" with llama.expert_count
  and llama.expert_used_count, the q/k rows interleaved as for Llama, feed_forward_length the expert's
  size. llama.cpp's llama graph always renormalizes the top-k weights.
- OLMoE (OlmoeModel): "olmoe", q/k norms over the whole projection (attn_q_norm [n_heads * head_dim]),
  rotary halves as Hugging Face has them, rms epsilon written as 1e-5 whatever the config says (the
  tiny model's is 1e-5 too), feed_forward_length the expert's size. llama.cpp's olmoe graph never
  renormalizes (norm_topk_prob false, as the released model).
- Qwen3-MoE (Qwen3MoeModel < Qwen2MoeModel): "qwen3moe", per-head q/k norms, feed_forward_length the
  config's dense intermediate_size (unused) and expert_feed_forward_length the expert's. llama.cpp's
  qwen3moe graph always renormalizes (norm_topk_prob true, as the released models).

transformers' GGUF loader does not read these MoE files, so the reference is the Hugging Face model
the file was written from; test_moe_parity.py checks that model against flashjax from its safetensors.
"""

import dataclasses
import json

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import flashjax
from conftest import random_ids
from flashjax.api import LLM
from flashjax.model.params import load_params
from flashjax.quant import QuantizedMatrix
from flashjax.store import convert, open_model_source
from test_gguf_parity import _add_tokenizer, llama_cpp_permute
from test_moe_parity import EXPERT_FFN, MOE_TINY, N_EXPERTS, build_moe

TOL = 1e-4
GGUF_ARCH = {"mixtral": "llama", "olmoe": "olmoe", "qwen3_moe": "qwen3moe"}


def write_moe_gguf(hf_dir, path, name: str, qtype: gguf.GGMLQuantizationType | None = None):
    """Writes the Hugging Face checkpoint in `hf_dir` (config.json, model.safetensors with one tensor
    per expert, as the Hub has them) as llama.cpp's converter would, float32; with `qtype`, every
    weight matrix (2-D and the 3-D experts) in that block type instead, as llama-quantize leaves a
    file: the router (ffn_gate_inp) and the norms stay float32 (llama.cpp never quantizes them)."""
    config = json.loads((hf_dir / "config.json").read_text())
    state = load_file(str(hf_dir / "model.safetensors"))
    arch = GGUF_ARCH[name]
    n_heads, n_kv, n_layers = config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny {name}")
    # TextModel.set_gguf_parameters
    writer.add_block_count(n_layers)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_freq_base(config.get("rope_theta") or config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(1e-5 if arch == "olmoe" else config["rms_norm_eps"])  # OlmoeModel: fixed 1e-5
    writer.add_expert_count(config.get("num_local_experts") or config["num_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    if config.get("head_dim"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype is None else gguf.LlamaFileType[f"MOSTLY_{qtype.name}"])
    if arch == "llama":  # LlamaModel.set_gguf_parameters
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(head_dim)
    if arch == "qwen3moe":  # Qwen2MoeModel.set_gguf_parameters
        writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    _add_tokenizer(writer, config["vocab_size"])

    moe = "block_sparse_moe" if arch == "llama" else "mlp"
    # The experts' projections as Hugging Face names them -> llama.cpp's stacked tensors.
    experts = ({"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"} if arch == "llama" else
               {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"})
    tensors = {"token_embd.weight": state.pop("model.embed_tokens.weight"),
               "output_norm.weight": state.pop("model.norm.weight")}
    if "lm_head.weight" in state:
        tensors["output.weight"] = state.pop("lm_head.weight")
    per_layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
                 "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
                 "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
                 f"{moe}.gate.weight": "ffn_gate_inp.weight"}
    for i in range(n_layers):
        for hf, ours in per_layer.items():
            if f"model.layers.{i}.{hf}" in state:
                array = state.pop(f"model.layers.{i}.{hf}")
                if arch == "llama" and ours == "attn_q.weight":
                    array = llama_cpp_permute(array, n_heads)
                elif arch == "llama" and ours == "attn_k.weight":
                    array = llama_cpp_permute(array, n_kv)
                tensors[f"blk.{i}.{ours}"] = array
        for hf, ours in experts.items():
            # LlamaModel / OlmoeModel / Qwen2MoeModel.modify_tensors: torch.stack over the experts
            tensors[f"blk.{i}.{ours}.weight"] = np.stack(
                [state.pop(f"model.layers.{i}.{moe}.experts.{e}.{hf}.weight") for e in range(N_EXPERTS)])
    assert not state, f"tensors not written: {sorted(state)}"
    for tensor_name, array in tensors.items():
        array = np.ascontiguousarray(array, np.float32)
        if qtype is not None and array.ndim >= 2 and "ffn_gate_inp" not in tensor_name:
            writer.add_tensor(tensor_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(tensor_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=sorted(MOE_TINY))
def moe_gguf(request, tmp_path_factory):
    """(name, Hugging Face directory, float32 GGUF written from it, the transformers model)."""
    name = request.param
    root = tmp_path_factory.mktemp(f"moe_gguf_{name}")
    # No sliding window: llama.cpp's llama GGUF has no field for one, so Mixtral's would be lost.
    model = build_moe(name, root / "hf", **({"sliding_window": None} if name == "mixtral" else {}))
    write_moe_gguf(root / "hf", root / f"{name}.gguf", name)
    return name, root / "hf", root / f"{name}.gguf", model


def _reference_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids[None].astype(np.int64))).logits[0].numpy()


def test_gguf_reads_as_the_checkpoint_it_was_written_from(moe_gguf):
    """The GGUF's config is the Hugging Face config's (experts, their size, the renormalization
    llama.cpp applies, the q/k norms) and every tensor, experts laid end to end and q/k unpermuted,
    is the safetensors' bit for bit."""
    name, hf_dir, path, _ = moe_gguf
    ours, theirs = open_model_source(path), open_model_source(hf_dir)
    assert ours.config.architecture == name
    assert ours.config.expert_ffn == EXPERT_FFN
    assert ours.config.norm_eps == pytest.approx(theirs.config.norm_eps, rel=1e-6)  # float32 in a GGUF
    # Token ids come from the tokenizer written to the GGUF, not the config.
    same = dict(bos_token_id=None, eos_token_ids=(), norm_eps=theirs.config.norm_eps)
    assert dataclasses.replace(ours.config, **same) == dataclasses.replace(theirs.config, **same)
    want = dict(theirs.iter_tensors())
    got = dict(ours.iter_tensors())
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_gguf_logits_match_the_source_model(moe_gguf):
    _, _, path, model = moe_gguf
    source = open_model_source(path)
    ids = random_ids(24, source.config.vocab_size, seed=1)
    ours = LLM(source.config, load_params(source, progress=False), None).logits(ids)
    np.testing.assert_allclose(ours, _reference_logits(model, ids), atol=TOL, rtol=0)


def test_q8_conversion_keeps_the_float_models_greedy_tokens(moe_gguf, tmp_path):
    """convert --quant q8 of the Hugging Face checkpoint (experts in 8-bit records, the router and
    attention resident), loaded by the dense engine: after every prefix of the float model's greedy
    continuation its most likely next token is the float model's, so greedy decoding gives the same
    tokens. (Checked on the whole sequence at once, one compile of the quantized model instead of
    a prefill and a decode step: on two cores that is 3 s instead of 10 per model. The float model is
    transformers', which test_moe_parity.py shows flashjax's float model matches.)"""
    from test_default_model import reference_greedy

    _, hf_dir, _, model = moe_gguf
    prompt = random_ids(6, 128, seed=3)
    greedy = reference_greedy(model, prompt.tolist(), 8)
    convert(str(hf_dir), str(tmp_path / "q8"), quant="q8", progress=False)
    with flashjax.load(str(tmp_path / "q8"), progress=False) as q8:
        ffn = q8.params["layers"][0]["ffn"]
        assert q8.config.is_moe and "router" in ffn
        assert isinstance(ffn["w_up"], QuantizedMatrix) and ffn["w_up"].kind == "q8"  # experts held as 8-bit
        logits = q8.logits(np.concatenate([prompt, greedy[:-1]]).astype(np.int32))
    assert np.argmax(logits[len(prompt) - 1:], axis=-1).tolist() == greedy


@pytest.mark.parametrize("type_name,kind", [("Q8_0", "q8"), ("Q4_0", "q4")])
def test_quantized_gguf_experts_are_copied_code_for_code(type_name, kind, tmp_path):
    """A GGUF whose expert tensors are quantized converts with their blocks copied as stored: each
    expert's gate and up rows, laid end to end, hold exactly the GGUF's values (a block moved to the
    wrong expert or row would not), the converter reports them as copied from the GGUF's type with no
    error, and only the down projection (regrouped per neuron through floats) changes, a little.
    Q4_0's codes do not survive a round trip through floats into q4 blocks (those have an offset), so
    zero error there shows the blocks were copied, not requantized."""
    qtype = gguf.GGMLQuantizationType[type_name]
    build_moe("qwen3_moe", tmp_path / "hf")
    path = tmp_path / "q.gguf"
    write_moe_gguf(tmp_path / "hf", path, "qwen3_moe", qtype)
    manifest = convert(str(path), str(tmp_path / kind), quant=kind, progress=False)
    report = {r["tensor"]: r for r in manifest.source["quantization"]}
    for tensor in ("ffn.w_gate", "ffn.w_up"):
        assert (report[tensor]["from"], report[tensor]["stored"], report[tensor]["max_error"]) == (type_name, kind, 0.0)
    assert 0 < report["ffn.w_down"]["max_error"] < 0.05

    gguf_floats = dict(open_model_source(path).iter_tensors())  # gguf's own dequantization, laid end to end
    stored = dict(open_model_source(str(tmp_path / kind)).iter_tensors())
    for layer in range(2):
        for part in ("w_gate", "w_up"):
            key = f"layers.{layer}.ffn.{part}"
            np.testing.assert_array_equal(stored[key], gguf_floats[key], err_msg=key)
        key = f"layers.{layer}.ffn.w_down"
        scale = np.abs(gguf_floats[key]).max()
        np.testing.assert_allclose(stored[key], gguf_floats[key], atol=0.02 * scale, rtol=0, err_msg=key)
