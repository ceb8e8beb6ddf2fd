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
from flashjax.weights import open_model_source

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


def test_step_by_step_decode_with_cache_matches(tiny_model):
    name, directory, reference = tiny_model
    cfg, params = _load(directory)
    ids = random_ids(20, cfg.vocab_size, seed=2)
    expected = _reference_logits(reference, ids)
    runner = DenseRunner(cfg, params, EngineConfig(cache_block=32, prefill_block=8))
    runner.start(32)
    greedy, key = SamplingParams(), jax.random.PRNGKey(0)
    prompt_len = 5
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
