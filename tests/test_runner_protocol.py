"""The runner contract (flashjax.runner_protocol.Runner): both engines implement it, callers rely on it
alone, and closing an LLM releases what its runner holds."""

import inspect
import os
import threading
import typing

import numpy as np
import pytest

from conftest import build_tiny, drain_tokens, random_ids

import flashjax
from flashjax.api import LLM
from flashjax.engine import DenseRunner
from flashjax.evaluate import perplexity, token_logprobs
from flashjax.flash.runner import FlashRunner
from flashjax.runner_protocol import Runner
from flashjax.store import convert

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(hf dir, flash dir) of a tiny Llama (GQA)."""
    root = tmp_path_factory.mktemp("protocol")
    build_tiny("llama_gqa", root / "hf")
    convert(str(root / "hf"), str(root / "flash"), dtype="float32", progress=False)
    return str(root / "hf"), str(root / "flash")


def _protocol_methods() -> dict[str, inspect.Signature]:
    return {name: inspect.signature(member) for name, member in vars(Runner).items()
            if callable(member) and not name.startswith("_")}


def _check_implements(runner) -> None:
    assert isinstance(runner, Runner)
    assert isinstance(runner.one_pass_logits, bool)
    assert set(typing.get_type_hints(Runner)) == {"one_pass_logits"}  # the one data member
    for name, expected in _protocol_methods().items():
        ours = inspect.signature(getattr(type(runner), name))
        # Same parameters, names and kinds (callers pass them positionally and by name).
        assert [(p.name, p.kind) for p in ours.parameters.values()] == \
               [(p.name, p.kind) for p in expected.parameters.values()], f"{type(runner).__name__}.{name}{ours}"


def test_protocol_lists_the_contract():
    assert set(_protocol_methods()) == {"start", "warm_up", "prefill", "decode", "sequence_logits", "stats",
                                        "compile_count", "close"}


def test_dense_runner_implements_the_protocol(tiny):
    llm = flashjax.load(tiny[0], progress=False)
    assert type(llm.runner) is DenseRunner
    _check_implements(llm.runner)
    assert llm.runner.one_pass_logits is True


def test_flash_runner_implements_the_protocol(tiny):
    with flashjax.load(tiny[1], sparsity="naive") as llm:
        assert type(llm.runner) is FlashRunner
        _check_implements(llm.runner)
        assert llm.runner.one_pass_logits is False
        with pytest.raises(NotImplementedError):
            llm.runner.sequence_logits(np.arange(4, dtype=np.int32))


def _open_files_under(path: str) -> list[str]:
    root, found = os.path.realpath(path), []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(root + os.sep):
            found.append(target)
    return found


def test_with_block_releases_the_flash_runner(tiny):
    before = set(threading.enumerate())
    prompt = random_ids(5, 128, seed=4)
    with flashjax.load(tiny[1], sparsity="naive", window=2) as llm:
        started = [t for t in threading.enumerate() if t not in before]
        assert any(t.name == "flashjax-prefetch" for t in started)
        tokens, _ = drain_tokens(llm, prompt, n=4)
    left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    assert left == [], f"threads left running: {left}"
    assert _open_files_under(tiny[1]) == []  # TensorStore opens a file per read today: a guard for later
    dense, _ = drain_tokens(flashjax.load(tiny[0], progress=False), prompt, n=4)
    assert tokens == dense
    llm.close()  # closing twice is harmless


def test_close_releases_the_dense_runner(tiny):
    llm = flashjax.load(tiny[0], progress=False)
    drain_tokens(llm, random_ids(5, 128, seed=5), n=3)
    assert llm.runner.cache is not None
    llm.close()
    assert llm.runner.cache is None
    llm.close()


class _Delegating:
    """A runner that is neither engine's class: it forwards every call to a dense runner, and says it
    can (or cannot) score in one pass. Callers that asked for a type would miss it."""

    def __init__(self, inner: DenseRunner, one_pass_logits: bool):
        self.inner, self.one_pass_logits = inner, one_pass_logits
        self.calls: list[str] = []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.inner, name)


def test_evaluate_asks_the_runner_not_its_type(tiny):
    llm = flashjax.load(tiny[0], progress=False)
    ids = random_ids(30, 128, seed=6)
    expected = token_logprobs(llm, ids, 3)
    reference = perplexity(llm, ids, context=16, stride=8)
    assert reference["method"] == "one-pass" and reference["engine"] == "dense"
    for one_pass in (True, False):
        wrapped = LLM(llm.config, llm.params, None, llm.engine_config, runner=_Delegating(llm.runner, one_pass))
        assert isinstance(wrapped.runner, Runner)
        wrapped.runner.calls.clear()
        np.testing.assert_allclose(token_logprobs(wrapped, ids, 3), expected, rtol=0, atol=2e-5)
        result = perplexity(wrapped, ids, context=16, stride=8)
        assert result["method"] == ("one-pass" if one_pass else "step-by-step")
        assert result["ppl"] == pytest.approx(reference["ppl"], rel=1e-5)
        used = set(wrapped.runner.calls)
        assert ("sequence_logits" in used) == one_pass and ("decode" in used) == (not one_pass)


def test_evaluate_on_the_flash_runner(tiny):
    ids = random_ids(30, 128, seed=7)
    dense = perplexity(flashjax.load(tiny[0], progress=False), ids, context=16, stride=8)
    with flashjax.load(tiny[1], sparsity="naive", window=2) as llm:
        flash = perplexity(llm, ids, context=16, stride=8)
    assert (flash["engine"], flash["method"]) == ("naive", "step-by-step")
    assert flash["ppl"] == pytest.approx(dense["ppl"], rel=1e-5)
    assert flash["engine_stats"]["decode_steps"] > 0
