"""Calibration: run a converted model densely over calibration text, set each layer's threshold,
train its predictors, and store them with the model (`flashjax calibrate`).

    pred = calibrate("models/smollm2-flash")                           # self-written text
    pred = calibrate("models/smollm2-flash", texts=[open("notes.txt").read()])
    print(pred.summary())
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Sequence

import numpy as np

from flashjax.config import ModelConfig
from flashjax.sparsity.collect import collect_activations, generate_calibration_ids, token_sequences
from flashjax.sparsity.gate import gate_magnitudes
from flashjax.sparsity.predictor import Selection, TrainConfig, evaluate_predictor, selection_metrics, train_predictor
from flashjax.sparsity.storage import Predictors, format_metrics, save_predictors
from flashjax.sparsity.thresholds import activation_threshold, default_target_sparsity, quantile_threshold

N_LAST_LAYERS = 4  # the last layers are denser and get `rank_last` (the paper: the last 4 of OPT)


def default_rank(cfg: ModelConfig) -> int:
    """The paper's rank 128 (OPT 6.7B, d_model 4096) for large models; small models need a larger
    share of d_model to predict as well: d_model / 8, at least 32, at most 128."""
    return int(min(128, max(32, cfg.d_model // 8)))


def default_rank_last(cfg: ModelConfig, rank: int) -> int:
    """4x `rank` (the paper: 1024 for the last layers, but with d_model 4096), at most min(D, F)."""
    return int(min(4 * rank, cfg.d_model, cfg.d_ffn))


def layer_ranks(cfg: ModelConfig, rank: int, rank_last: int, n_last: int = N_LAST_LAYERS) -> tuple[int, ...]:
    return tuple(rank_last if l >= cfg.n_layers - n_last else rank for l in range(cfg.n_layers))


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    tokens: int = 8192  # token positions collected, held-out share included
    seq_len: int = 256
    rank: int | None = None  # None: default_rank
    rank_last: int | None = None  # None: default_rank_last
    target_sparsity: float | None = None  # None: the model's default (0.5 SwiGLU, exact zeros ReLU)
    epochs: int = 6
    batch_size: int = 512
    learning_rate: float = 1e-2
    holdout: float = 0.1
    kind: str = "lowrank"  # "lowrank" (trained predictors) | "gate" (SwiGLU gate thresholds only)
    lookahead: bool = True
    seed: int = 0


def calibrate(model_dir, texts: Sequence[str] | None = None, token_ids: Sequence[Sequence[int]] | None = None,
              tokens: int = 8192, rank: int | None = None, rank_last: int | None = None,
              target_sparsity: float | None = None, seq_len: int = 256, epochs: int = 6, kind: str = "lowrank",
              lookahead: bool = True, holdout: float = 0.1, seed: int = 0, selection: Selection = Selection(),
              progress: bool = True, save: bool = True) -> Predictors:
    """Calibrates the flash model in `model_dir` and stores its predictors there (`save`).

    Calibration text: `texts` (strings, tokenized with the model's tokenizer), else `token_ids`
    (lists of ids), else text the model writes itself from built-in seed prompts. `tokens` token
    positions are collected (`holdout` of the sequences held out for the precision/recall report),
    from sequences of `seq_len` tokens spread over the whole text. `target_sparsity`: share of
    neurons below the activation threshold (None: 0.5 for SwiGLU, positive-is-active for ReLU).
    Returns the Predictors; prints the per-layer table when `progress`.
    """
    from flashjax.model.params import load_params
    from flashjax.store import open_flash_model, open_flash_source

    t_start = time.perf_counter()
    cc = CalibrationConfig(tokens=tokens, seq_len=seq_len, rank=rank, rank_last=rank_last,
                           target_sparsity=target_sparsity, epochs=epochs, holdout=holdout, kind=kind,
                           lookahead=lookahead, seed=seed)
    model = open_flash_model(model_dir)
    cfg = model.config
    if kind not in ("lowrank", "gate"):
        raise ValueError(f"unknown predictor kind {kind!r}: 'lowrank' or 'gate'")
    if kind == "gate" and not cfg.is_glu:
        raise ValueError("the gate path is for SwiGLU models; this one uses ReLU: calibrate kind='lowrank'")
    target = default_target_sparsity(cfg) if target_sparsity is None else float(target_sparsity)
    seq_len = min(seq_len, cfg.max_position)
    n_seqs = max(2, math.ceil(tokens / max(1, seq_len - 1)))

    params = load_params(open_flash_source(model.path, verify=False), progress=progress)
    tokenizer = _tokenizer(model) if texts is not None or token_ids is None else None
    if texts is not None:
        if tokenizer is None:
            raise ValueError(f"{model_dir} has no tokenizer: pass token_ids instead of texts")
        token_lists, source = [tokenizer.encode(t, add_special_tokens=True) for t in texts], "texts"
    elif token_ids is not None:
        token_lists, source = [list(map(int, t)) for t in token_ids], "token_ids"
    else:
        token_lists = generate_calibration_ids(cfg, params, tokenizer, n_tokens=n_seqs * seq_len, seed=seed,
                                               progress=progress)
        source = "self-generated"
    seqs = token_sequences(token_lists, seq_len, max_sequences=n_seqs, seed=seed)
    t_text = time.perf_counter()

    acts = collect_activations(cfg, params, seqs, max_tokens=tokens, seed=seed, progress=progress)
    t_collect = time.perf_counter()
    train_rows, test_rows = _split(acts.sequence, holdout)

    thresholds, active_counts, gate_thr = [], [], None
    for l in range(cfg.n_layers):
        thresholds.append(activation_threshold(cfg, acts[l].a, target))
        active_counts.append(float((np.asarray(acts[l].a[train_rows], np.float32) > thresholds[-1]).sum(1).mean()))
    metrics: dict = {}
    if cfg.is_glu:
        gate_thr, metrics["gate"] = [], []
        for l in range(cfg.n_layers):
            ffn = params["layers"][l]["ffn"]
            g = gate_magnitudes(acts[l].x, ffn["w_gate"], cfg.ffn_activation, ffn.get("b_gate"))
            gate_thr.append(quantile_threshold(g, target) if target else 0.0)
            a = acts[l].a[test_rows]
            metrics["gate"].append(selection_metrics(g[test_rows] > gate_thr[l],
                                                     np.asarray(a, np.float32) > thresholds[l], a))
            del g
    del params

    layers = look = None
    ranks: tuple = ()
    tc = TrainConfig(epochs=cc.epochs, batch_size=cc.batch_size, learning_rate=cc.learning_rate, seed=seed)
    if kind == "lowrank":
        r = rank or default_rank(cfg)
        ranks = layer_ranks(cfg, r, rank_last or default_rank_last(cfg, r))
        layers, look = [], [] if lookahead else None
        metrics["predictor"] = []
        if lookahead:
            metrics["lookahead"] = []
        for l in range(cfg.n_layers):
            a = acts[l].a
            labels = np.asarray(a, np.float32) > thresholds[l]
            p, _ = train_predictor(acts[l].x[train_rows], labels[train_rows], ranks[l], tc,
                                   desc=f"layer {l} predictor (rank {ranks[l]})", progress=progress)
            m, chosen = evaluate_predictor(p, acts[l].x[test_rows], labels[test_rows], a[test_rows], selection,
                                           active_counts[l])
            layers.append(p)
            metrics["predictor"].append(m)
            if lookahead:
                q, _ = train_predictor(acts[l].x_prev[train_rows], labels[train_rows], ranks[l], tc,
                                       desc=f"layer {l} lookahead (rank {ranks[l]})", progress=progress)
                mq, ahead = evaluate_predictor(q, acts[l].x_prev[test_rows], labels[test_rows], a[test_rows],
                                               selection, active_counts[l])
                # What layer l then asks for (its own predictor's choice) that lookahead had already read.
                mq["covered"] = float((ahead & chosen).sum() / max(1, chosen.sum()))
                look.append(q)
                metrics["lookahead"].append(mq)
    t_train = time.perf_counter()

    info = {"source": source, "tokens": int(acts.n_tokens), "train_tokens": int(len(train_rows)),
            "heldout_tokens": int(len(test_rows)), "seq_len": int(seqs.shape[1]), "sequences": int(len(seqs)),
            "calibration": dataclasses.asdict(cc), "ranks": list(ranks),
            "seconds": {"text": t_text - t_start, "collect": t_collect - t_text, "train": t_train - t_collect}}
    pred = Predictors(config=cfg, kind=kind, thresholds=np.asarray(thresholds, np.float32),
                      active_counts=np.asarray(active_counts, np.float32), target_sparsity=target,
                      layers=layers, lookahead=look,
                      gate_thresholds=None if gate_thr is None else np.asarray(gate_thr, np.float32),
                      ranks=ranks, metrics=metrics, selection=selection, info=info)
    if save:
        save_predictors(model.path, pred)
    pred.info["seconds"]["total"] = time.perf_counter() - t_start
    if progress:
        print(format_metrics(pred), file=sys.stderr)
        print(f"flashjax: calibrated {model.path} on {acts.n_tokens} tokens ({source}) in "
              f"{pred.info['seconds']['total']:.0f} s", file=sys.stderr)
    return pred


def _tokenizer(model):
    from flashjax.tokenizer import TokenizerError

    try:
        return model.tokenizer()
    except (TokenizerError, OSError, ValueError):
        return None


def _split(sequence: np.ndarray, holdout: float) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, held out): whole sequences are held out (neighbouring tokens of one
    sequence are alike, so splitting inside one would flatter the held-out scores)."""
    rows = np.arange(len(sequence))
    seqs = np.unique(sequence)
    n_test = max(1, int(round(len(seqs) * holdout))) if holdout > 0 else 0
    if len(seqs) < 2 or n_test == 0:
        cut = len(rows) - max(1, int(len(rows) * holdout)) if holdout > 0 else len(rows)
        return rows[:cut], rows[cut:] if holdout > 0 else rows
    held = np.isin(sequence, seqs[-n_test:])
    return rows[~held], rows[held]
