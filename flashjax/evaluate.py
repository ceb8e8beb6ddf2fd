"""Measuring a loaded model: perplexity over a text and multiple-choice accuracy by log-likelihood.

Both go through the engine the model was loaded with, so a sparse mode or a memory budget is
measured as it runs:

    import flashjax
    from flashjax.evaluate import perplexity, multiple_choice, load_tasks
    llm = flashjax.load("model-flash", sparsity="oracle", memory_budget="50%")
    print(perplexity(llm, open("text.txt").read(), context=512, stride=256)["ppl"])
    print(multiple_choice(llm, load_tasks("tasks.jsonl"))["accuracy"])

Scoring is teacher-forced: the engine is fed the text's true next token, never a sampled one, and
the log-probability of each token is read from the logits it returns (log-softmax in float64 on the
host). The dense engine can instead score a whole sequence in one forward pass (the default for it;
both give the same numbers). With a flash runner every scored token is predicted by a decode step,
where sparsity acts, except the second token of a sequence (its only context is the first token,
which the runner must prefill).

Perplexity uses sliding windows, as in the Hugging Face guide "Perplexity of fixed-length models":
windows of `context` tokens start every `stride` tokens; the first window scores every token but its
first, each later one only the tokens no earlier window scored (its last `stride`), so each token is
scored once, with at least `context - stride` tokens of context once past the first window. (With
`stride == context` the windows do not overlap and each one's first token, having no context in it,
is not scored: the guide's loop does the same.)

Multiple choice follows lm-evaluation-harness (ARC, HellaSwag, PIQA): the context is the question,
each continuation is " " + option, and an option's score is the sum of its tokens' log-probabilities.
`accuracy` takes the highest sum, `accuracy_norm` the highest sum per character of the option
(lm-eval's acc_norm).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from typing import Iterable, Sequence

import numpy as np

from flashjax.engine import cache_capacity, context_limit
from flashjax.sampling import SamplingParams


class TaskFileError(ValueError):
    """A multiple-choice task (file) is malformed: the message names the file and line, or the task."""


# ---- token level --------------------------------------------------------------------------------

def _logprob_of(logits: np.ndarray, token: int) -> float:
    """log softmax(logits)[token], in float64."""
    x = np.asarray(logits, np.float64).reshape(-1)
    m = x.max()
    return float(x[token] - m - math.log(np.exp(x - m).sum()))


def _logprobs_of_rows(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Row-wise log softmax(logits[i])[tokens[i]], in float64. logits [N, V], tokens [N]."""
    x = np.asarray(logits, np.float64)
    m = x.max(axis=-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=-1))
    return x[np.arange(len(tokens)), tokens] - lse


def _check_ids(llm, ids, start_scoring_at: int) -> np.ndarray:
    ids = np.asarray(ids, np.int32).reshape(-1)
    if not 1 <= start_scoring_at <= len(ids):
        raise ValueError(f"start_scoring_at must be in [1, {len(ids)}] for {len(ids)} tokens, "
                         f"got {start_scoring_at} (the first token has no context to be scored in)")
    limit = context_limit(llm.config, llm.engine_config)
    if len(ids) > limit:
        raise ValueError(f"{len(ids)} tokens do not fit in the model's context of {limit} tokens")
    vocab = llm.config.vocab_size
    if len(ids) and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"token ids must be in [0, {vocab}); got {ids.min()}..{ids.max()}")
    return ids


def uses_one_pass(llm, step_by_step: bool | None = None) -> bool:
    """Whether scoring runs one forward pass over the sequence (the default where the runner can:
    the dense runner) or the runner's own prefill/decode steps (the only way for a flash runner)."""
    one_pass = llm.runner.one_pass_logits
    if step_by_step is None:
        return one_pass
    if not step_by_step and not one_pass:
        raise ValueError("one-pass scoring needs every weight resident (the dense engine); "
                         "the flash engine scores step by step")
    return not step_by_step


def token_logprobs(llm, ids: Sequence[int], start_scoring_at: int = 1, *,
                   step_by_step: bool | None = None) -> np.ndarray:
    """Log-probability (float64, natural log) of each `ids[i]`, i >= start_scoring_at, given ids[:i].

    `step_by_step`: None picks one forward pass for the dense runner and prefill + teacher-forced
    decode steps for any other; True forces the steps (dense too, e.g. to check that both agree).
    """
    ids = _check_ids(llm, ids, start_scoring_at)
    if start_scoring_at == len(ids):
        return np.zeros(0, np.float64)
    if uses_one_pass(llm, step_by_step):
        logits = llm.logits(ids[:-1])
        return _logprobs_of_rows(logits[start_scoring_at - 1:], ids[start_scoring_at:])
    return _stepwise_logprobs(llm, ids, start_scoring_at)


def _stepwise_logprobs(llm, ids: np.ndarray, start_scoring_at: int, progress=None) -> np.ndarray:
    """Prefill the unscored prefix (but its last token), then decode the true tokens one by one.

    Decoding the prefix's last token, rather than prefilling it, makes the first scored token come
    from a decode step too (sparse modes act in decode; the flash runner's prefill reads everything).
    """
    import jax

    runner, sampling = llm.runner, SamplingParams()  # greedy: the sampled token is never used
    key = jax.random.PRNGKey(0)
    runner.start(cache_capacity(len(ids), llm.config, llm.engine_config))
    runner.warm_up(sampling, key)
    n_prefill = max(1, start_scoring_at - 1)
    _, logits = runner.prefill(ids[:n_prefill], sampling, key)
    out = np.empty(len(ids) - start_scoring_at, np.float64)
    # logits in hand predict ids[i]. The next step is dispatched before these logits are read back,
    # so the host's log-softmax overlaps the device's work (the next true token is already known).
    for i in range(n_prefill, len(ids)):
        next_logits = None
        if i + 1 < len(ids):
            _, next_logits = runner.decode(np.array([ids[i]], np.int32), i, sampling, key)
        if i >= start_scoring_at:
            out[i - start_scoring_at] = _logprob_of(np.asarray(logits), int(ids[i]))
            if progress is not None:
                progress.update(1)
        logits = next_logits
    return out


# ---- runner statistics --------------------------------------------------------------------------

# Per-token means in a runner's stats(), averaged over runs weighted by their decode steps.
def _is_per_token_mean(key: str) -> bool:
    return key.endswith(("_ms", "_per_token", "_rate")) and key != "compile_ms"


class _StatsAccumulator:
    """Merges a runner's stats() over many start() calls (each start resets its figures)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.last: dict = {}
        self.steps = 0

    def add(self, stats: dict, steps: int) -> None:
        self.steps += steps
        for key, value in stats.items():
            if _is_per_token_mean(key):
                if value is not None and steps:
                    self.sums[key] = self.sums.get(key, 0.0) + float(value) * steps
                    self.weights[key] = self.weights.get(key, 0.0) + steps
            elif key != "tokens_per_s":
                self.last[key] = value

    def result(self) -> dict:
        out = dict(self.last)
        for key, total in self.sums.items():
            out[key] = total / self.weights[key] if self.weights[key] else None
        if out.get("decode_ms_per_token"):
            out["tokens_per_s"] = 1e3 / out["decode_ms_per_token"]
        out["decode_steps"] = self.steps
        return out


class _Scorer:
    """Scores sequences with one LLM, keeping the runner's per-step statistics across sequences when
    it scores step by step."""

    def __init__(self, llm, step_by_step: bool | None):
        self.llm = llm
        self.one_pass = uses_one_pass(llm, step_by_step)
        self.stats = _StatsAccumulator()

    def __call__(self, ids: np.ndarray, start_scoring_at: int, progress=None) -> np.ndarray:
        ids = _check_ids(self.llm, ids, start_scoring_at)
        if self.one_pass:
            out = token_logprobs(self.llm, ids, start_scoring_at, step_by_step=False)
            if progress is not None:
                progress.update(len(out))
            return out
        out = _stepwise_logprobs(self.llm, ids, start_scoring_at, progress)
        self.stats.add(self.llm.runner.stats(), len(ids) - max(1, start_scoring_at - 1) - 1)
        return out

    def describe(self) -> dict:
        # "sparsity" names the engine: "dense", or the flash engine's mode.
        info = {"engine": self.llm.runner.stats()["sparsity"],
                "method": "one-pass" if self.one_pass else "step-by-step"}
        if not self.one_pass:
            stats = self.stats.result()
            info["engine_stats"] = stats
            for key in ("bytes_read_per_token", "neurons_read_per_token", "cache_hit_rate", "memory_budget_bytes",
                        "weights_bytes"):
                if key in stats:
                    info[key] = stats[key]
        return info


def _progress(total: int, enabled: bool, unit: str, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, disable=not enabled, leave=False)


# ---- text ---------------------------------------------------------------------------------------

def _special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts in front of a text with add_special_tokens (a BOS, or nothing);
    special tokens it would add at the end (an EOS) are left out."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    special = tokenizer.encode("a", add_special_tokens=True)
    n = len(special) - len(plain)
    if n > 0 and special[n:] == plain:
        return list(special[:n])
    return []


def encode_text(llm, text: str) -> list[int]:
    """The text's token ids as the model reads a document: its BOS (if it adds one) + the text."""
    tokenizer = llm._require_tokenizer()
    return _special_prefix(tokenizer) + list(tokenizer.encode(text, add_special_tokens=False))


@dataclasses.dataclass(frozen=True)
class Window:
    begin: int  # the window is ids[begin:end]
    end: int
    score_from: int  # tokens [score_from, end) are scored in this window

    @property
    def scored(self) -> int:
        return self.end - self.score_from


def check_perplexity_arguments(context: int, stride: int, max_tokens: int | None = None) -> None:
    """The window and length arguments of `perplexity`, checked before any weight is read."""
    if context < 2:
        raise ValueError(f"context must be at least 2 tokens, got {context}")
    if not 1 <= stride <= context:
        raise ValueError(f"stride must be between 1 and the context ({context}), got {stride}")
    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2, got {max_tokens}")


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The Hugging Face sliding-window scheme: windows begin every `stride` tokens, each at most
    `context` long, and score the tokens not scored before (never a window's own first token, so with
    stride < context every token but the text's first is scored exactly once)."""
    check_perplexity_arguments(context, stride)
    windows, prev_end = [], 0
    for begin in range(0, max(n_tokens - 1, 0), stride):
        end = min(begin + context, n_tokens)
        score_from = max(prev_end, begin + 1)
        if end > score_from:
            windows.append(Window(begin, end, score_from))
        prev_end = end
        if end == n_tokens:
            break
    return windows


def perplexity(llm, text: str | Sequence[int], context: int = 512, stride: int = 256,
               max_tokens: int | None = None, *, step_by_step: bool | None = None,
               progress: bool = False) -> dict:
    """Sliding-window perplexity of `text` (a string, or token ids) under the loaded engine.

    `max_tokens` keeps the first N tokens of the text. Returns ppl = exp(nll), nll (mean negative
    log-likelihood per scored token, nats), n_tokens (tokens scored: all but the first), the text's
    token count, context, stride, windows, engine and method, the scoring time, and for a flash
    runner its per-token figures (bytes_read_per_token, ..., and all of them under engine_stats).
    """
    if isinstance(text, str):
        ids = encode_text(llm, text)
    else:
        ids = [int(t) for t in text]
    check_perplexity_arguments(context, stride, max_tokens)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"perplexity needs at least 2 tokens; the text has {len(ids)}")
    limit = context_limit(llm.config, llm.engine_config)
    if context > limit:
        raise ValueError(f"context {context} is longer than the model's context of {limit} tokens: "
                         f"pass a context of at most {limit}")
    windows = sliding_windows(len(ids), context, stride)
    ids_array = np.asarray(ids, np.int32)
    scorer = _Scorer(llm, step_by_step)
    nll_sum, n_scored = 0.0, 0
    bar = _progress(len(ids) - 1, progress, "tok", "perplexity")
    t0 = time.perf_counter()
    try:
        for w in windows:
            logprobs = scorer(ids_array[w.begin:w.end], w.score_from - w.begin, bar)
            nll_sum -= float(logprobs.sum())
            n_scored += len(logprobs)
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    nll = nll_sum / n_scored
    return {
        "ppl": math.exp(nll), "nll": nll, "n_tokens": n_scored, "text_tokens": len(ids),
        "context": context, "stride": stride, "windows": len(windows),
        **scorer.describe(),
        "seconds": seconds, "scored_tokens_per_s": n_scored / seconds if seconds else None,
    }


# ---- multiple choice ----------------------------------------------------------------------------

def _validate_task(task, where: str) -> dict:
    """Checks one task; returns it with `answer` as an index. Errors start with `where`."""
    if not isinstance(task, dict):
        raise TaskFileError(f"{where}: expected a JSON object with question, options, answer; "
                            f"got {type(task).__name__}")
    missing = [k for k in ("question", "options", "answer") if k not in task]
    if missing:
        raise TaskFileError(f"{where}: missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))} "
                            f"(each line needs question, options and answer)")
    question, options, answer = task["question"], task["options"], task["answer"]
    if not isinstance(question, str):
        raise TaskFileError(f"{where}: question must be a string, got {type(question).__name__}")
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o for o in options):
        raise TaskFileError(f"{where}: options must be a list of at least 2 non-empty strings")
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        raise TaskFileError(f"{where}: answer must be an option's index or its text, got {answer!r}")
    if isinstance(answer, int):
        if not 0 <= answer < len(options):
            raise TaskFileError(f"{where}: answer {answer} is out of range for {len(options)} options "
                                f"(indices start at 0)")
        index = answer
    else:
        if answer not in options:
            raise TaskFileError(f"{where}: answer {answer!r} is not one of the options")
        index = options.index(answer)
    return {**task, "answer": index}


def load_tasks(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Reads a JSONL file of {"question": str, "options": [str, ...], "answer": index or option text}.

    Blank lines are skipped. A bad line raises TaskFileError naming the file and line number.
    """
    path = os.fspath(path)
    tasks = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(tasks) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                task = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskFileError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
            tasks.append(_validate_task(task, where))
    if not tasks:
        raise TaskFileError(f"{path}: no tasks (expected one JSON object per line)")
    return tasks


def encode_pair(llm, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's encoding: trailing spaces move from the context to the continuation, the whole text
    is encoded and the continuation is what follows the context's own tokens. An empty context is
    replaced by the BOS (or end-of-text) token, as lm-eval does."""
    tokenizer = llm._require_tokenizer()
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    prefix = _special_prefix(tokenizer)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_ids = tokenizer.encode(context, add_special_tokens=False) if context else []
    continuation_ids = whole[len(context_ids):]
    context_ids = prefix + context_ids
    if not context_ids:
        fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else (llm.eos_token_ids or (None,))[0]
        if fallback is None:
            raise ValueError("the question is empty and the model has no BOS or end-of-text token to stand for it")
        context_ids = [fallback]
    return list(context_ids), list(continuation_ids)


def multiple_choice(llm, tasks: Iterable[dict], normalize: str = "none", *, target_delimiter: str = " ",
                    step_by_step: bool | None = None, progress: bool = False) -> dict:
    """Multiple-choice accuracy by log-likelihood (lm-eval's `acc` and `acc_norm`).

    Each option is scored as the summed log-probability of " " + option given the question.
    `normalize` says which rule each item's `prediction` follows: "none" (highest sum) or "length"
    (highest sum per character of the option); both accuracies are reported either way.
    """
    if normalize not in ("none", "length"):
        raise ValueError(f"normalize must be 'none' or 'length', got {normalize!r}")
    tasks = [_validate_task(t, f"task {i}") for i, t in enumerate(tasks)]
    if not tasks:
        raise ValueError("no tasks to score")
    scorer = _Scorer(llm, step_by_step)
    items = []
    bar = _progress(sum(len(t["options"]) for t in tasks), progress, "option", "multiple choice")
    t0 = time.perf_counter()
    try:
        for i, task in enumerate(tasks):
            logliks, n_tokens = [], []
            for option in task["options"]:
                context_ids, continuation_ids = encode_pair(llm, task["question"], target_delimiter + option)
                if not continuation_ids:
                    raise ValueError(f"task {i}: option {option!r} encodes to no tokens")
                logprobs = scorer(np.asarray(context_ids + continuation_ids, np.int32), len(context_ids))
                logliks.append(float(logprobs.sum()))
                n_tokens.append(len(continuation_ids))
                bar.update(1)
            lengths = np.array([len(o) for o in task["options"]], np.float64)
            pred = int(np.argmax(logliks))
            pred_norm = int(np.argmax(np.array(logliks) / lengths))
            items.append({
                "index": i, "answer": task["answer"], "pred": pred, "pred_norm": pred_norm,
                "prediction": pred_norm if normalize == "length" else pred,
                "correct": pred == task["answer"], "correct_norm": pred_norm == task["answer"],
                "logliks": logliks, "option_tokens": n_tokens,
            })
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    n = len(items)
    correct = sum(it["correct"] for it in items)
    correct_norm = sum(it["correct_norm"] for it in items)
    return {
        "accuracy": correct / n, "accuracy_norm": correct_norm / n, "n": n,
        "correct": correct, "correct_norm": correct_norm,
        # Standard error of the mean over items (as lm-eval reports it).
        "accuracy_stderr": _stderr(correct, n), "accuracy_norm_stderr": _stderr(correct_norm, n),
        "normalize": normalize, **scorer.describe(), "seconds": seconds, "items": items,
    }


def _stderr(k: int, n: int) -> float | None:
    if n < 2:
        return None
    p = k / n
    return math.sqrt(p * (1 - p) / (n - 1))
