"""Every architecture against Hugging Face transformers, with copied random weights (float32)."""

import jax
import numpy as np
import pytest
import torch

from conftest import random_ids
from flashjax.config import EngineConfig
from flashjax.engine import DenseRunner
from flashjax.model.params import load_params
from flashjax.sampling import SamplingParams
from flashjax.store import open_model_source

TOL = 1e-4


def _reference_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids[None].astype(np.int64))).logits[0].numpy()


def _load(directory):
    source = open_model_source(directory)
    return source.config, load_params(source, progress=False)


def test_full_prompt_logits_match(tiny_model):
    from flashjax.api import LLM

    name, directory, reference = tiny_model
    cfg, params = _load(directory)
    ids = random_ids(24, cfg.vocab_size, seed=1)
    ours = LLM(cfg, params, None).logits(ids)
    assert ours.shape == (24, cfg.vocab_size)
    np.testing.assert_allclose(ours, _reference_logits(reference, ids), atol=TOL, rtol=0)


def _reference_stepwise_logits(model, ids, prompt_len):
    """transformers with its own KV cache: logits [len(ids), V] where row p is the logits after
    position p, from a prefill of ids[:prompt_len] and then one token per call. Not the full-sequence
    forward: LongRoPE (Phi-3) rotates a call's positions by the call's length, so a model stepped with
    a cache differs from one run over the whole sequence, and the cached run is what decoding does."""
    out = np.zeros((len(ids), model.config.vocab_size), np.float32)
    with torch.no_grad():
        result = model(torch.tensor(ids[None, :prompt_len].astype(np.int64)), use_cache=True)
        out[:prompt_len] = result.logits[0].numpy()
        cache = result.past_key_values
        for pos in range(prompt_len, len(ids)):
            result = model(torch.tensor([[int(ids[pos])]]), past_key_values=cache, use_cache=True)
            out[pos], cache = result.logits[0, -1].numpy(), result.past_key_values
    return out


def test_step_by_step_decode_with_cache_matches(tiny_model):
    name, directory, reference = tiny_model
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


def test_greedy_tokens_match_transformers_generate(tiny_model):
    from flashjax.api import LLM

    name, directory, reference = tiny_model
    cfg, params = _load(directory)
    prompt = random_ids(6, cfg.vocab_size, seed=3)
    from test_default_model import reference_greedy

    expected = reference_greedy(reference, prompt.tolist(), 16)
    llm = LLM(cfg, params, None)
    gen = llm.generate_ids(prompt, max_tokens=16, stop_at_eos=False)
    assert list(gen) == expected


def test_no_recompile_per_token(tiny_model):
    from flashjax.api import LLM

    name, directory, _ = tiny_model
    cfg, params = _load(directory)
    llm = LLM(cfg, params, None, EngineConfig(cache_block=64))
    prompt = random_ids(5, cfg.vocab_size)
    list(llm.generate_ids(prompt, max_tokens=4, stop_at_eos=False))
    warm = llm.runner.compile_count()
    # More tokens, a different prompt of the same padded length, and sampling settings that are traced.
    list(llm.generate_ids(random_ids(7, cfg.vocab_size, 9), max_tokens=40, stop_at_eos=False))
    assert llm.runner.compile_count() == warm
    sampled = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=1)
    list(llm.generate_ids(prompt, max_tokens=10, sampling=sampled, stop_at_eos=False))
    after_sampling = llm.runner.compile_count()
    list(llm.generate_ids(prompt, max_tokens=30, sampling=SamplingParams(temperature=1.3, top_k=0, seed=4),
                          stop_at_eos=False))
    assert llm.runner.compile_count() == after_sampling


def test_tiny_models_attend_sharply(tiny_model):
    """Near-uniform attention would hide RoPE, scaling and norm mistakes under the tolerance."""
    from conftest import attention_peak

    name, _, reference = tiny_model
    reference.config._attn_implementation = "eager"  # the attention probabilities are only returned by eager
    peak = attention_peak(reference, random_ids(24, reference.config.vocab_size, seed=1))
    # Uniform attention over the 5th..24th positions would give a peak of about 0.07.
    assert peak > 0.3, f"{name}: mean largest attention probability {peak:.3f}"


@pytest.mark.parametrize("wrong", ["rope_theta", "norm_eps"])
def test_parity_fails_for_a_wrong_model_detail(tiny_model, wrong):
    """The parity comparison is sharp: a RoPE base off by 2x, or a norm epsilon off by 1000x, fails it
    by at least ten times the tolerance."""
    import dataclasses

    from flashjax.api import LLM

    name, directory, reference = tiny_model
    cfg, params = _load(directory)
    if wrong == "rope_theta" and not cfg.uses_rope:
        pytest.skip("OPT has learned positions, no RoPE")
    if wrong == "rope_theta":
        cfg = dataclasses.replace(cfg, rope_theta=cfg.rope_theta * 2)
    else:
        cfg = dataclasses.replace(cfg, norm_eps=cfg.norm_eps * 1e3)
    ids = random_ids(24, cfg.vocab_size, seed=1)
    error = np.abs(LLM(cfg, params, None).logits(ids) - _reference_logits(reference, ids)).max()
    assert error > 10 * TOL, f"{name}: a wrong {wrong} moved logits by only {error:.2e}"


def test_gemma3_image_text_checkpoint_runs_its_language_model(tmp_path):
    """Gemma 3 4B-27B are image-text checkpoints (Gemma3ForConditionalGeneration: model_type "gemma3",
    the language model's config as text_config, its tensors under language_model.): flashjax runs
    the language model, with the logits transformers gives the whole model for text."""
    import transformers

    from conftest import TINY, TINY_COMMON, sharpen_for_parity
    from flashjax.api import LLM

    torch.manual_seed(13)
    text = dict(TINY_COMMON, **TINY["gemma3"][2])
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=127, boi_token_index=125, eoi_token_index=126)
    reference = transformers.Gemma3ForConditionalGeneration(config).eval()
    sharpen_for_parity(reference)
    reference.save_pretrained(tmp_path)
    cfg, params = _load(tmp_path)
    assert cfg.architecture == "gemma3" and cfg.layer_types == ("sliding", "full")
    ids = random_ids(20, 120, seed=4)
    ours = LLM(cfg, params, None).logits(ids)
    # The image-text model's text path rounds a little differently: transformers' own
    # Gemma3ForCausalLM with these weights is 1.4e-4 from it at most, as flashjax is (which equals
    # Gemma3ForCausalLM to 1e-4 above); a misread tensor moves logits by orders of magnitude more.
    np.testing.assert_allclose(ours, _reference_logits(reference, ids), atol=2 * TOL, rtol=0)
