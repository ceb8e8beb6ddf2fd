"""Evaluation: sliding-window perplexity and multiple-choice log-likelihood, checked against transformers."""

import json
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from conftest import build_tiny, random_ids

import flashjax
from flashjax import cli
from flashjax.evaluate import (TaskFileError, encode_pair, encode_text, load_tasks, multiple_choice, perplexity,
                               sliding_windows, token_logprobs)

WORDS = ("the cat sat on a mat and the dog ran to the red box while a bird sang over the tall green tree "
         "then one fox hid under an old log near the cold river bank").split()


def _corpus(n_words: int, seed: int) -> str:
    rng = np.random.RandomState(seed)
    return " ".join(rng.choice(WORDS, n_words))


def _write_tokenizer(directory, vocab_size: int = 60) -> None:
    """A tiny byte-level BPE trained on the test words: its alphabet is only the bytes it saw, so the
    whole vocabulary stays under the tiny models' 128 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([_corpus(400, s) for s in range(20)],
                            trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False))
    assert tok.get_vocab_size() <= 128
    tok.save(str(directory / "tokenizer.json"))


@pytest.fixture(scope="module", params=["llama_gqa", "opt"])
def tiny(request, tmp_path_factory):
    """(name, hf dir, transformers model, flash dir): a tiny model with a tokenizer, and its conversion."""
    from flashjax.store import convert

    root = tmp_path_factory.mktemp("eval-" + request.param)
    model = build_tiny(request.param, root / "hf")
    _write_tokenizer(root / "hf")
    convert(str(root / "hf"), str(root / "flash"), dtype="float32", progress=False)
    return request.param, root / "hf", model, root / "flash"


@pytest.fixture(scope="module")
def tiny_llm(tiny):
    return flashjax.load(str(tiny[1]), progress=False)


# ---- reference: transformers ----------------------------------------------------------------------

def _hf_logprobs(model, ids) -> np.ndarray:
    """log p(ids[i] | ids[:i]) for i >= 1 from one transformers forward pass, [len(ids) - 1]."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([list(ids)])).logits[0].double()
    logp = torch.log_softmax(logits[:-1], dim=-1)
    return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()


def _hf_perplexity(model, ids, context, stride):
    """The loop of the Hugging Face guide "Perplexity of fixed-length models" (labels -100 outside
    the target span, the loss averaged by the model), counting the tokens the shifted loss covers."""
    import torch

    seq = torch.tensor([list(ids)])
    nll_sum, n_tokens, prev_end, windows = 0.0, 0, 0, 0
    for begin in range(0, seq.size(1), stride):
        end = min(begin + context, seq.size(1))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target).loss.double().item()
        counted = int((target[:, 1:] != -100).sum())  # the labels the shift leaves in the loss
        nll_sum += loss * counted
        n_tokens += counted
        windows += 1
        prev_end = end
        if end == seq.size(1):
            break
    return math.exp(nll_sum / n_tokens), n_tokens, windows


# ---- windows and token log-probabilities -----------------------------------------------------------

@pytest.mark.parametrize("n,context,stride", [(100, 32, 16), (100, 32, 32), (100, 32, 1), (20, 32, 16),
                                              (33, 32, 16), (64, 32, 16), (2, 8, 4), (50, 7, 3)])
def test_windows_score_every_token_but_the_first_once(n, context, stride):
    windows = sliding_windows(n, context, stride)
    scored = [i for w in windows for i in range(w.score_from, w.end)]
    if stride < context:
        assert scored == list(range(1, n))
    else:  # windows without overlap: each one's first token has no context and is not scored
        assert scored == [i for i in range(1, n) if i % context]
    for k, w in enumerate(windows):
        assert w.begin == k * stride and w.end - w.begin <= context and w.score_from > w.begin
        if k:  # after the first window, only its last `stride` tokens (at most) are scored
            assert w.scored <= stride
    assert windows[-1].end == n


def test_window_arguments_are_checked():
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(100, 32, 33)
    with pytest.raises(ValueError, match="stride"):
        sliding_windows(100, 32, 0)
    with pytest.raises(ValueError, match="context"):
        sliding_windows(100, 1, 1)


def test_step_by_step_equals_one_pass(tiny, tiny_llm):
    ids = random_ids(40, tiny_llm.config.vocab_size, seed=11)
    for start in (1, 2, 17, 39):
        one_pass = token_logprobs(tiny_llm, ids, start)
        steps = token_logprobs(tiny_llm, ids, start, step_by_step=True)
        assert one_pass.shape == steps.shape == (len(ids) - start,)
        np.testing.assert_allclose(steps, one_pass, rtol=0, atol=2e-5)
        assert np.all(one_pass <= 0)


def test_token_logprobs_equal_transformers(tiny, tiny_llm):
    ids = random_ids(50, tiny_llm.config.vocab_size, seed=12)
    np.testing.assert_allclose(token_logprobs(tiny_llm, ids, 1), _hf_logprobs(tiny[2], ids), rtol=0, atol=2e-5)


def test_token_logprobs_checks_its_input(tiny_llm):
    ids = random_ids(10, tiny_llm.config.vocab_size)
    with pytest.raises(ValueError, match="start_scoring_at"):
        token_logprobs(tiny_llm, ids, 0)
    with pytest.raises(ValueError, match="context"):
        token_logprobs(tiny_llm, random_ids(65, tiny_llm.config.vocab_size), 1)
    with pytest.raises(ValueError, match="token ids"):
        token_logprobs(tiny_llm, [1, 2, 500], 1)


# ---- perplexity -----------------------------------------------------------------------------------

@pytest.mark.parametrize("context,stride", [(32, 16), (32, 32), (64, 24), (16, 5)])
def test_perplexity_equals_transformers(tiny, tiny_llm, context, stride):
    text = _corpus(100, seed=99)
    ids = encode_text(tiny_llm, text)
    assert len(ids) > 64  # several windows
    result = perplexity(tiny_llm, text, context=context, stride=stride)
    ppl, n_tokens, windows = _hf_perplexity(tiny[2], ids, context, stride)
    assert result["n_tokens"] == n_tokens == (len(ids) - 1 if stride < context else len(ids) - windows)
    assert result["windows"] == windows
    assert (result["context"], result["stride"]) == (context, stride)
    assert result["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(result["nll"]), rel=1e-12)
    assert result["engine"] == "dense" and result["method"] == "one-pass"


def test_perplexity_step_by_step_and_token_ids(tiny_llm):
    text = _corpus(40, seed=5)
    ids = encode_text(tiny_llm, text)
    one_pass = perplexity(tiny_llm, text, context=32, stride=16)
    steps = perplexity(tiny_llm, ids, context=32, stride=16, step_by_step=True)
    assert steps["method"] == "step-by-step"
    assert steps["ppl"] == pytest.approx(one_pass["ppl"], rel=1e-5)
    short = perplexity(tiny_llm, text, context=32, stride=16, max_tokens=20)
    assert short["n_tokens"] == 19 and short["text_tokens"] == 20 and short["windows"] == 1


def test_perplexity_arguments_are_checked(tiny_llm):
    with pytest.raises(ValueError, match="model's context of 64"):
        perplexity(tiny_llm, _corpus(40, 1), context=128, stride=64)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(tiny_llm, "a", context=32, stride=16)


def test_flash_perplexity_equals_dense(tiny, tiny_llm):
    text = _corpus(50, seed=7)
    dense = perplexity(tiny_llm, text, context=32, stride=16)
    llm = flashjax.load(str(tiny[3]), sparsity="oracle", window=2, scratch_rows=16)
    try:
        flash = perplexity(llm, text, context=32, stride=16)
    finally:
        llm.runner.close()
    assert flash["engine"] == "oracle" and flash["method"] == "step-by-step"
    assert flash["ppl"] == pytest.approx(dense["ppl"], rel=1e-4)
    assert flash["n_tokens"] == dense["n_tokens"] and flash["windows"] == dense["windows"]
    assert flash["bytes_read_per_token"] > 0
    stats = flash["engine_stats"]
    # Every scored token but the text's second is a decode step.
    assert stats["decode_steps"] == flash["n_tokens"] - 1
    assert 0 <= stats["cache_hit_rate"] <= 1


# ---- multiple choice ------------------------------------------------------------------------------

QUESTIONS = [
    ("the cat sat on", ["a mat", "the river", "one fox hid"]),
    ("a bird sang over the", ["tall green tree", "cold box", "dog"]),
    ("then one fox hid under", ["an old log", "the red box", "a mat and the dog"]),
    ("the dog ran to", ["the red box", "a bird", "the bank", "green"]),
    ("near the cold", ["river bank", "tree", "mat"]),
]


def _hf_option_logliks(llm, model, question, options):
    out = []
    for option in options:
        context_ids, continuation_ids = encode_pair(llm, question, " " + option)
        lp = _hf_logprobs(model, context_ids + continuation_ids)
        out.append(float(lp[len(context_ids) - 1:].sum()))
    return np.array(out)


def _all_logliks(result):
    return [ll for item in result["items"] for ll in item["logliks"]]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_multiple_choice_accuracy(tiny, tiny_llm, tmp_path):
    model = tiny[2]
    rows, best, best_norm = [], [], []
    for question, options in QUESTIONS:
        ll = _hf_option_logliks(tiny_llm, model, question, options)
        best.append(int(np.argmax(ll)))
        best_norm.append(int(np.argmax(ll / np.array([len(o) for o in options]))))
        rows.append({"question": question, "options": options, "answer": best[-1]})
    # The first three answers are the model's choice; the last two are not (so 3/5 are right).
    for row, b in zip(rows[3:], best[3:]):
        row["answer"] = (b + 1) % len(row["options"])
    rows[1]["answer"] = rows[1]["options"][rows[1]["answer"]]  # an answer given as the option's text
    tasks = load_tasks(_write_jsonl(tmp_path / "tasks.jsonl", rows))
    result = multiple_choice(tiny_llm, tasks)

    assert result["n"] == 5
    assert [it["pred"] for it in result["items"]] == best
    assert [it["pred_norm"] for it in result["items"]] == best_norm
    assert result["accuracy"] == pytest.approx(3 / 5) and result["correct"] == 3
    answers = [t["answer"] for t in tasks]
    assert result["accuracy_norm"] == pytest.approx(np.mean([p == a for p, a in zip(best_norm, answers)]))
    for item, (question, options) in zip(result["items"], QUESTIONS):
        np.testing.assert_allclose(item["logliks"], _hf_option_logliks(tiny_llm, model, question, options),
                                   rtol=0, atol=1e-4)
    normalized = multiple_choice(tiny_llm, tasks[:2], normalize="length")
    assert [it["prediction"] for it in normalized["items"]] == best_norm[:2]

    steps = multiple_choice(tiny_llm, tasks, step_by_step=True)
    np.testing.assert_allclose(_all_logliks(steps), _all_logliks(result), rtol=0, atol=1e-4)


def test_multiple_choice_on_the_flash_engine(tiny, tiny_llm):
    tasks = [{"question": q, "options": o, "answer": 0} for q, o in QUESTIONS]
    dense = multiple_choice(tiny_llm, tasks)
    llm = flashjax.load(str(tiny[3]), sparsity="oracle", window=2, scratch_rows=16)
    try:
        flash = multiple_choice(llm, tasks)
    finally:
        llm.runner.close()
    np.testing.assert_allclose(_all_logliks(flash), _all_logliks(dense), rtol=0, atol=1e-4)
    assert flash["accuracy"] == dense["accuracy"] and flash["bytes_read_per_token"] > 0


def test_continuation_tokens_follow_the_context(tiny_llm):
    tok = tiny_llm.tokenizer
    context_ids, continuation_ids = encode_pair(tiny_llm, "the cat sat on", " a mat")
    assert context_ids + continuation_ids == tok.encode("the cat sat on a mat", add_special_tokens=False)
    # A trailing space moves to the continuation, as lm-eval does.
    assert encode_pair(tiny_llm, "the cat sat on ", "a mat") == (context_ids, continuation_ids)


@pytest.mark.parametrize("line,message", [
    ('{"question": "q", "options": ["a", "b"], "answer": 0', "invalid JSON"),
    ('{"question": "q", "options": ["a", "b"]}', "missing key 'answer'"),
    ('{"options": ["a", "b"]}', "missing keys 'question', 'answer'"),
    ('{"question": "q", "options": ["a", "b"], "answer": 2}', "answer 2 is out of range for 2 options"),
    ('{"question": "q", "options": ["a", "b"], "answer": -1}', "out of range"),
    ('{"question": "q", "options": ["a", "b"], "answer": "c"}', "'c' is not one of the options"),
    ('{"question": "q", "options": ["a"], "answer": 0}', "at least 2"),
    ('{"question": "q", "options": "ab", "answer": 0}', "list"),
    ('{"question": 3, "options": ["a", "b"], "answer": 0}', "question must be a string"),
    ('{"question": "q", "options": ["a", "b"], "answer": true}', "index or its text"),
    ('["q", ["a", "b"], 0]', "JSON object"),
])
def test_bad_task_lines_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"question": "q", "options": ["a", "b"], "answer": 1})
    path = tmp_path / "tasks.jsonl"
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(TaskFileError, match=rf"tasks\.jsonl:3: .*{_escape(message)}"):
        load_tasks(path)
    assert len(load_tasks(path, limit=1)) == 1  # the bad line is past the limit


def _escape(text):
    import re
    return re.escape(text)


def test_task_files_load(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", [{"question": "q", "options": ["a", "b", "c"], "answer": "c"},
                                               {"question": "r", "options": ["x", "y"], "answer": 0, "id": 7}])
    tasks = load_tasks(path)
    assert [t["answer"] for t in tasks] == [2, 0] and tasks[1]["id"] == 7
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TaskFileError, match="empty.jsonl: no tasks"):
        load_tasks(tmp_path / "empty.jsonl")
    with pytest.raises(TaskFileError, match="task 0: missing key 'answer'"):
        multiple_choice(None, [{"question": "q", "options": ["a", "b"]}])


# ---- command line ---------------------------------------------------------------------------------

def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_cli_eval_on_a_tiny_model(tiny, capsys, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(_corpus(40, seed=3))
    assert cli.main(["eval", "ppl", "--model", str(tiny[1]), "--text", str(text), "--context", "32",
                     "--stride", "16", "--json"]) == 0
    result = _last_json(capsys.readouterr().out)
    assert result["context"] == 32 and result["stride"] == 16 and result["ppl"] > 1

    assert cli.main(["eval", "ppl", "--model", str(tiny[3]), "--sparsity", "oracle", "--window", "3",
                     "--text", str(text), "--context", "32", "--stride", "16", "--json"]) == 0
    flash = _last_json(capsys.readouterr().out)
    assert flash["ppl"] == pytest.approx(result["ppl"], rel=1e-4) and flash["engine"] == "oracle"

    tasks = _write_jsonl(tmp_path / "tasks.jsonl", [{"question": q, "options": o, "answer": 0} for q, o in QUESTIONS])
    assert cli.main(["eval", "choice", "--model", str(tiny[1]), "--tasks", str(tasks), "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "/3)" in out
    assert cli.main(["eval", "choice", "--model", str(tiny[1]), "--tasks", str(tasks), "--json"]) == 0
    assert _last_json(capsys.readouterr().out)["n"] == len(QUESTIONS)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "options": ["a", "b"], "answer": 5}\n')
    assert cli.main(["eval", "choice", "--model", str(tiny[1]), "--tasks", str(bad)]) == 2
    assert f"{bad}:1: answer 5 is out of range" in capsys.readouterr().err


# ---- the real default model -----------------------------------------------------------------------

PROSE = ("The Python standard library is very extensive, offering a wide range of facilities. The library "
         "contains built-in modules, written in C, that provide access to system functionality such as file "
         "I/O that would otherwise be inaccessible to Python programmers, as well as modules written in Python "
         "that provide standardized solutions for many problems that occur in everyday programming.")


@pytest.mark.slow
def test_cli_eval_ppl_default_model_json(default_gguf, default_llm, reference_default):
    """`flashjax eval ppl --json` on the real default model, at the default context (512) and stride
    (256), equals transformers' sliding-window perplexity (the same GGUF, the Hugging Face guide's
    loop) over the same tokens and windows: the first 600 tokens of the repository's README, so two
    windows. The ids are flashjax's own (encode_text): its tokenizer deliberately follows SmolLM2's
    original digit splitting where transformers' GGUF conversion does not (see test_tokenizer)."""
    text = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    run = subprocess.run([sys.executable, "-m", "flashjax.cli", "eval", "ppl", "--model", str(default_gguf),
                          "--text", str(text), "--max-tokens", "600", "--json"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    ids = encode_text(default_llm, text.read_text(encoding="utf-8"))[:600]
    assert len(ids) == result["text_tokens"] == 600
    ppl, n_tokens, windows = _hf_perplexity(reference_default[0], ids, 512, 256)
    assert (result["context"], result["stride"]) == (512, 256)
    assert result["n_tokens"] == n_tokens == 599 and result["windows"] == windows == 2
    assert result["ppl"] == pytest.approx(ppl, rel=1e-3)


@pytest.mark.slow
def test_default_model_prefers_the_sensible_option(default_llm):
    tasks = [{"question": "The capital of France is", "options": ["Paris.", "a banana.", "blue seven."], "answer": 0},
             {"question": "Water freezes at zero degrees", "options": ["Celsius.", "guitar.", "happily."],
              "answer": "Celsius."}]
    result = multiple_choice(default_llm, tasks)
    assert result["accuracy"] == 1.0
    ppl = perplexity(default_llm, PROSE, context=32, stride=16)
    steps = perplexity(default_llm, PROSE, context=32, stride=16, step_by_step=True)
    assert steps["ppl"] == pytest.approx(ppl["ppl"], rel=1e-4)
