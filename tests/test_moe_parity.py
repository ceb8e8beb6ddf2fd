"""Mixtures of experts (Mixtral, OLMoE, Qwen3-MoE) in the dense engine against Hugging Face transformers.

Tiny random models are saved with transformers' save_pretrained, which writes one tensor per expert
(model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight, model.layers.{i}.mlp.experts.{e}.gate_proj.weight),
as the Hub's checkpoints are; flashjax joins them into one FFN of n_experts * expert_ffn neurons.

A random init leaves the router near-uniform (every expert's softmax weight about 1/8), where the
top-k choice hangs on tiny logit gaps and renormalizing the top-k weights changes them little: a
routing mistake could then hide under the tolerance. So the router's weights are scaled up
(ROUTER_SCALE) and `test_router_is_peaked_and_chooses_many_experts` checks what that buys: a clear
top-k choice for every token that differs across tokens. The two settings a routing mistake would
get wrong are covered both ways: OLMoE keeps its softmax top-k weights as they are
(norm_topk_prob False, as the released OLMoE), Qwen3-MoE and Mixtral renormalize them; and
`test_wrong_routing_breaks_parity` shows that flipping the renormalization, or taking one expert
fewer, moves the logits far outside the tolerance.
"""

import dataclasses

import jax
import numpy as np
import pytest
import torch
import transformers

from conftest import random_ids, sharpen_for_parity
from flashjax.api import LLM
from flashjax.config import EngineConfig
from flashjax.engine import DenseRunner
from flashjax.model.params import load_params
from flashjax.sampling import SamplingParams
from flashjax.store import open_model_source
from test_parity_tiny import _reference_stepwise_logits

TOL = 1e-4
N_EXPERTS = 8
EXPERTS_PER_TOKEN = 2
EXPERT_FFN = 32
# d_model and an expert's size are multiples of 32, so test_moe_gguf.py can write the experts in
# quantized blocks (and quantize them with convert --quant) from these same models.
MOE_COMMON = dict(hidden_size=64, num_hidden_layers=2, vocab_size=128, max_position_embeddings=64,
                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=EXPERTS_PER_TOKEN)
MOE_TINY = {
    # The top-k weights always renormalized; a sliding window (6) the 20-24 token prompts outrun.
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_local_experts=N_EXPERTS, intermediate_size=EXPERT_FFN, sliding_window=6, tie_word_embeddings=False)),
    # Top-k weights as the softmax gives them; q/k norms over the whole projection (every head at once).
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        num_experts=N_EXPERTS, intermediate_size=EXPERT_FFN, norm_topk_prob=False, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=127, pad_token_id=1)),
    # Top-k weights renormalized; per-head q/k norms; a head_dim (16) that is not d_model / heads; the
    # dense intermediate_size (unused by the experts) unlike moe_intermediate_size; tied embeddings.
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_experts=N_EXPERTS, moe_intermediate_size=EXPERT_FFN, intermediate_size=96, head_dim=16,
        norm_topk_prob=True, tie_word_embeddings=True)),
}
# Router logits of random init have a spread of about 0.3 across experts. Scaled by 20 the average
# token puts about 0.7 of its softmax weight on its first expert: the choice is clear (see
# MIN_ROUTER_GAP), yet the second expert still weighs enough for renormalizing to matter (a router
# saturated at 1.0 would make renormalization a no-op).
ROUTER_SCALE = 20.0
# Smallest gap between the k-th and the (k+1)-th router logit of any token: float32 rounding (1e-6
# here) cannot flip the top-k choice, so flashjax and transformers choose the same experts.
MIN_ROUTER_GAP = 1e-3


def build_moe(name: str, directory, **overrides):
    """Saves a tiny random mixture-of-experts model of the named kind (MOE_TINY, keyword overrides
    on top); returns the transformers model (float32, eval)."""
    config_cls, model_cls, extra = MOE_TINY[name]
    torch.manual_seed(sum(map(ord, name)))
    config = getattr(transformers, config_cls)(**{**MOE_COMMON, **extra, **overrides})
    model = getattr(transformers, model_cls)(config).eval()
    sharpen_for_parity(model)  # perturbed norms, peaked attention (conftest)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("mlp.gate.weight"):  # the router [E, D] (transformers' name in all three)
                p.mul_(ROUTER_SCALE)
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="session", params=sorted(MOE_TINY))
def moe_model(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(f"moe_{request.param}")
    return request.param, directory, build_moe(request.param, directory)


def _load(directory):
    source = open_model_source(directory)
    return source.config, load_params(source, progress=False)


def _reference_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids[None].astype(np.int64))).logits[0].numpy()


def router_logits(model, ids) -> list[np.ndarray]:
    """transformers' router logits [T, E] of each layer for the prompt `ids`."""
    with torch.no_grad():
        out = model(torch.tensor(np.asarray(ids)[None].astype(np.int64)), output_router_logits=True)
    return [np.asarray(r.float().numpy()).reshape(len(ids), -1) for r in out.router_logits]


def test_config_lays_the_experts_end_to_end(moe_model):
    name, directory, reference = moe_model
    cfg = open_model_source(directory).config
    assert cfg.architecture == name
    assert (cfg.n_experts, cfg.experts_per_token, cfg.expert_ffn) == (N_EXPERTS, EXPERTS_PER_TOKEN, EXPERT_FFN)
    assert cfg.d_ffn == N_EXPERTS * EXPERT_FFN
    assert cfg.router_renormalize == {"mixtral": True, "olmoe": False, "qwen3_moe": True}[name]
    assert (cfg.qk_norm, cfg.qk_norm_whole) == {"mixtral": (False, False), "olmoe": (True, True),
                                                "qwen3_moe": (True, False)}[name]


def test_router_is_peaked_and_chooses_many_experts(moe_model):
    """What makes the parity tests below sharp for routing: every token's top-k experts are clear of
    the rest by MIN_ROUTER_GAP, and the tokens of a prompt choose among most of the experts (a
    router that sent every token to the same experts could not show a routing mistake)."""
    name, _, reference = moe_model
    for layer, logits in enumerate(router_logits(reference, random_ids(24, 128, seed=1))):
        ranked = np.sort(logits, axis=-1)[:, ::-1]
        gap = ranked[:, EXPERTS_PER_TOKEN - 1] - ranked[:, EXPERTS_PER_TOKEN]
        assert gap.min() > MIN_ROUTER_GAP, f"{name} layer {layer}: top-k gap {gap.min():.2e}"
        first = np.argmax(logits, axis=-1)
        chosen = np.argsort(-logits, axis=-1)[:, :EXPERTS_PER_TOKEN]
        assert len(set(first.tolist())) >= N_EXPERTS // 2, f"{name} layer {layer}: first choices {first}"
        assert len(set(chosen.ravel().tolist())) >= N_EXPERTS - 2, f"{name} layer {layer}: chosen {chosen}"
        probs = np.exp(ranked - ranked[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        # Peaked, not saturated: the second expert keeps a share, so renormalizing changes the weights.
        assert 0.4 < probs[:, 0].mean() < 0.95 and probs[:, 1].mean() > 0.05, f"{name} layer {layer}"


def test_full_prompt_logits_match(moe_model):
    name, directory, reference = moe_model
    cfg, params = _load(directory)
    ids = random_ids(24, cfg.vocab_size, seed=1)
    ours = LLM(cfg, params, None).logits(ids)
    assert ours.shape == (24, cfg.vocab_size)
    np.testing.assert_allclose(ours, _reference_logits(reference, ids), atol=TOL, rtol=0)


def test_step_by_step_decode_with_cache_matches(moe_model):
    """Prefill then one token per step (each step routes its one token): every step's logits equal
    transformers' with its own KV cache."""
    name, directory, reference = moe_model
    cfg, params = _load(directory)
    ids = random_ids(20, cfg.vocab_size, seed=2)
    prompt_len = 5
    expected = _reference_stepwise_logits(reference, ids, prompt_len)
    runner = DenseRunner(cfg, params, EngineConfig(cache_block=32, prefill_block=8))
    runner.start(32)
    greedy, key = SamplingParams(), jax.random.PRNGKey(0)
    _, logits = runner.prefill(ids[:prompt_len], greedy, key)
    np.testing.assert_allclose(np.asarray(logits[0]), expected[prompt_len - 1], atol=TOL, rtol=0)
    for pos in range(prompt_len, len(ids)):
        _, logits = runner.decode(np.array([ids[pos]], np.int32), pos, greedy, key)
        np.testing.assert_allclose(np.asarray(logits[0]), expected[pos], atol=TOL, rtol=0,
                                   err_msg=f"{name}: decode step at position {pos}")


def test_greedy_tokens_match_transformers(moe_model):
    from test_default_model import reference_greedy

    name, directory, reference = moe_model
    cfg, params = _load(directory)
    prompt = random_ids(6, cfg.vocab_size, seed=3)
    expected = reference_greedy(reference, prompt.tolist(), 16)
    assert list(LLM(cfg, params, None).generate_ids(prompt, max_tokens=16, stop_at_eos=False)) == expected


@pytest.mark.parametrize("wrong", ["renormalize_flipped", "one_expert_fewer"])
def test_wrong_routing_breaks_parity(moe_model, wrong):
    """The comparison is sharp for routing: the router's top-k weights renormalized where the model
    does not (or not where it does), or the top k-1 experts taken instead of the top k, move the
    logits by at least twenty times the tolerance."""
    name, directory, reference = moe_model
    cfg, params = _load(directory)
    if wrong == "renormalize_flipped":
        cfg = dataclasses.replace(cfg, router_renormalize=not cfg.router_renormalize)
    else:
        cfg = dataclasses.replace(cfg, experts_per_token=cfg.experts_per_token - 1)
    ids = random_ids(24, cfg.vocab_size, seed=1)
    error = np.abs(LLM(cfg, params, None).logits(ids) - _reference_logits(reference, ids)).max()
    assert error > 20 * TOL, f"{name}: {wrong} moved logits by only {error:.2e}"
