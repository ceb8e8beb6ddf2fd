"""The real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers loading the same file."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
    "Photosynthesis is the process by which",
]
N_TOKENS = 40


def reference_greedy(model, ids, n):
    """Plain greedy decoding with transformers' own KV cache and no logits processors
    (generate(min_new_tokens=...) would suppress end-of-sequence tokens and change the argmax)."""
    tokens, past, inputs = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            out = model(inputs, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tokens.append(int(out.logits[0, -1].argmax()))
            inputs = torch.tensor([[tokens[-1]]])
    return tokens


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_continuation_matches_transformers(default_llm, reference_default, prompt):
    model, tokenizer = reference_default
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    expected = reference_greedy(model, ids, N_TOKENS)
    ours = list(default_llm.generate_ids(ids, max_tokens=N_TOKENS, stop_at_eos=False))
    assert ours == expected


def test_prompt_logits_match_transformers(default_llm, reference_default):
    model, tokenizer = reference_default
    ids = tokenizer(PROMPTS[2])["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    # Logits reach ~40 in magnitude here; float32 summation order differs between XLA and PyTorch.
    np.testing.assert_allclose(default_llm.logits(ids), expected, atol=2e-3, rtol=0)


def test_chat_reply_matches_transformers(default_llm, reference_default):
    model, tokenizer = reference_default
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
    expected = out[0, len(ids):].tolist()
    result = default_llm.chat(messages, max_tokens=32)
    assert result.prompt_tokens == list(ids)
    assert result.tokens == expected[:len(result.tokens)]
    assert "Paris" in result.text


def test_streaming_equals_whole_result(default_llm):
    chunks = list(default_llm.stream("List three colors:", max_tokens=24))
    result = chunks[-1].result
    assert "".join(c.text for c in chunks) == result.text
    assert result.stats["decode_ms_per_token"] > 0 and result.stats["tokens_per_s"] > 0


def test_seeded_sampling_is_reproducible(default_llm):
    options = dict(max_tokens=16, temperature=0.8, top_k=40, top_p=0.95, stop_at_eos=False)
    a = default_llm.generate("Tell me a story:", seed=7, **options)
    b = default_llm.generate("Tell me a story:", seed=7, **options)
    c = default_llm.generate("Tell me a story:", seed=8, **options)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_cli_generate_json(default_gguf):
    out = subprocess.run([sys.executable, "-m", "flashjax.cli", "generate", "--model", str(default_gguf),
                          "--prompt", "The capital of France is", "--max-tokens", "8", "--json"],
                         capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(report) >= {"text", "prompt_tokens", "tokens", "stats"}
    assert len(report["tokens"]) <= 8 and "Paris" in report["text"]
    assert {"prefill_ms", "decode_ms_per_token", "tokens_per_s"} <= set(report["stats"])


def test_prompt_longer_than_context_is_a_clear_error(default_gguf):
    import flashjax
    from flashjax.engine import ContextLengthError

    llm = flashjax.load(str(default_gguf), max_context=16, progress=False)
    with pytest.raises(ContextLengthError, match="16"):
        llm.generate(list(range(100, 120)), max_tokens=4)
