"""The paper's low-rank predictor: which neurons of a layer a token will use, from the layer's FFN
input, before any FFN weight is read.

    scores = sigmoid(h @ a @ b + bias)        a [D, r], b [r, F], bias [F]

One per layer (rank `rank`, larger for the last layers, which are denser), trained with optax on a
binary cross-entropy balanced between active and inactive neurons, so that missing an active
neuron costs as much in total as reading an inactive one (the predictor errs towards reading).
The same structure serves the lookahead predictor (layer l+1's neurons from layer l's FFN input).

At run time a neuron is selected when its score clears a threshold (default 0.5), or the top-k
scores are (k = the layer's calibrated active count times an over-selection factor).
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How a predictor is trained (static under jit: a new value compiles anew)."""

    epochs: int = 6
    batch_size: int = 512
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Selection:
    """How scores become neuron ids, settable at run time.

    mode "threshold": neurons whose score > `threshold`. mode "topk": per token the
    `ceil(k * over_select)` best-scored neurons, k = `top_k`, or (None) the layer's mean active
    count on the calibration tokens. Over several tokens (prefill) the union is taken.
    """

    mode: str = "threshold"
    threshold: float = 0.5
    top_k: int | None = None
    over_select: float = 1.0

    def __post_init__(self):
        if self.mode not in ("threshold", "topk"):
            raise ValueError(f"selection mode must be 'threshold' or 'topk', got {self.mode!r}")
        if self.over_select <= 0:
            raise ValueError(f"over_select must be positive, got {self.over_select}")

    def k(self, d_ffn: int, active_count: float | None) -> int:
        base = self.top_k if self.top_k is not None else active_count
        if base is None:
            raise ValueError("top-k selection needs top_k (this layer has no calibrated active count)")
        return int(min(d_ffn, max(1, np.ceil(base * self.over_select))))


# -- the model ----------------------------------------------------------------------------------------


def init_predictor(key, d_model: int, rank: int, d_ffn: int, prior: np.ndarray | None = None) -> dict:
    """Random factors; the bias starts at the logit of each neuron's active frequency (`prior`)."""
    ka, kb = jax.random.split(key)
    a = jax.random.normal(ka, (d_model, rank), jnp.float32) / np.sqrt(d_model)
    b = jax.random.normal(kb, (rank, d_ffn), jnp.float32) / np.sqrt(rank) * 0.1
    if prior is None:
        bias = jnp.zeros((d_ffn,), jnp.float32)
    else:
        p = np.clip(np.asarray(prior, np.float64), 1e-3, 1 - 1e-3)
        bias = jnp.asarray(np.log(p / (1 - p)), jnp.float32)
    return {"a": a, "b": b, "bias": bias}


def predictor_logits(p: dict, h):
    """h [..., D] -> logits [..., F], computed in float32."""
    h = h.astype(jnp.float32)
    # [..., r] then [..., F]
    return jnp.einsum("...r,rf->...f", jnp.einsum("...d,dr->...r", h, p["a"]), p["b"]) + p["bias"]


@jax.jit
def predict_scores(p: dict, h):
    """The per-neuron sigmoid scores [B, T, F] (any leading axes) of one layer's predictor for h [B, T, D]."""
    return jax.nn.sigmoid(predictor_logits(p, h))


def predictor_threshold_mask(p: dict, h, threshold):
    """bool [F]: neurons whose score > threshold for any token of h [..., D] (the union a prefill
    step reads). Traceable: the flash step computes it inside its own jit."""
    scores = jax.nn.sigmoid(predictor_logits(p, h))
    return jnp.any(scores.reshape(-1, scores.shape[-1]) > threshold, axis=0)


_threshold_mask = jax.jit(predictor_threshold_mask)


def _topk_rows(scores, k):
    """bool [N, F]: each row's k best scores (k traced, so a new k does not compile)."""
    kth = -jnp.sort(-scores, axis=-1)[:, jnp.clip(k - 1, 0, scores.shape[-1] - 1)]
    return scores >= kth[:, None]


def predictor_topk_mask(p: dict, h, k):
    """bool [F]: each token's k best-scored neurons, union over the tokens of h [..., D]; k traced."""
    logits = predictor_logits(p, h)
    return jnp.any(_topk_rows(logits.reshape(-1, logits.shape[-1]), k), axis=0)


_topk_mask = jax.jit(predictor_topk_mask)


def select(scores, threshold: float | None = 0.5, top_k: int | None = None, over_select: float = 1.0) -> np.ndarray:
    """Neuron ids (sorted, int64) from scores [..., F] (numpy or jax; union over leading axes):
    top-k (k = ceil(top_k * over_select)) when `top_k` is given, else score > `threshold`."""
    scores = np.asarray(scores, np.float32)
    flat = scores.reshape(-1, scores.shape[-1])
    if top_k is not None:
        k = int(min(flat.shape[-1], max(1, np.ceil(top_k * over_select))))
        mask = np.zeros(flat.shape, bool)
        np.put_along_axis(mask, np.argpartition(-flat, k - 1, axis=-1)[:, :k], True, axis=-1)
        return np.flatnonzero(mask.any(axis=0))
    return np.flatnonzero((flat > threshold).any(axis=0))


def selected_mask(p: dict, h, selection: Selection, active_count: float | None = None):
    """bool [F] (a jax array): the neurons `selection` picks for tokens h [..., D]."""
    if selection.mode == "topk":
        return _topk_mask(p, h, np.int32(selection.k(p["bias"].shape[0], active_count)))
    return _threshold_mask(p, h, np.float32(selection.threshold))


# -- training -----------------------------------------------------------------------------------------


def balanced_bce(logits, labels, pos_weight, neg_weight):
    """Binary cross-entropy with the active and inactive classes weighted apart (mean over elements).

    bce = softplus(z) - y * z, one softplus per element: the elementwise work, not the low-rank
    matmuls, dominates training time on a CPU."""
    logits = logits.astype(jnp.float32)
    bce = jax.nn.softplus(logits) - jnp.where(labels, logits, 0.0)
    return jnp.mean(jnp.where(labels, pos_weight, neg_weight) * bce)


def _optimizer(tc: TrainConfig, steps: int):
    schedule = optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, max(1, steps // 20), max(2, steps),
                                                  tc.learning_rate * 0.05)
    return optax.adamw(schedule, weight_decay=tc.weight_decay)


@functools.partial(jax.jit, static_argnames=("tc", "total_steps"), donate_argnames=("p", "opt_state"))
def _epoch(tc: TrainConfig, total_steps: int, p, opt_state, x, y, mean, inv_std, key, pos_weight, neg_weight):
    """One pass over the training rows in shuffled batches (a scan: one dispatch per epoch)."""
    opt = _optimizer(tc, total_steps)
    n_batches = x.shape[0] // tc.batch_size
    order = jax.random.permutation(key, x.shape[0])[:n_batches * tc.batch_size].reshape(n_batches, -1)

    def loss_fn(params, xb, yb):
        return balanced_bce(predictor_logits(params, xb), yb, pos_weight, neg_weight)

    def step(carry, idx):
        params, state = carry
        xb = (x[idx].astype(jnp.float32) - mean) * inv_std
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, y[idx])
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), loss

    (p, opt_state), losses = jax.lax.scan(step, (p, opt_state), order)
    return p, opt_state, jnp.mean(losses)


def _fold_standardization(p: dict, mean: np.ndarray, inv_std: np.ndarray) -> dict:
    """Training sees (h - mean) * inv_std; fold that into the factors so run time sees h itself."""
    a = p["a"] * inv_std[:, None]
    bias = p["bias"] - (mean @ a) @ p["b"]
    return {"a": a, "b": p["b"], "bias": bias}


def train_predictor(x: np.ndarray, labels: np.ndarray, rank: int, tc: TrainConfig = TrainConfig(),
                    desc: str = "training predictor", progress: bool = True) -> tuple[dict, dict]:
    """Fits one predictor of rank `rank` to inputs x [N, D] and labels bool [N, F].

    The classes are balanced: positives weigh 0.5/p, negatives 0.5/(1-p), p the layer's share of
    active pairs (the paper's balanced loss). Inputs are standardized per feature while training
    (Adam on raw RMS-normed activations with a few huge features converges badly) and the
    standardization is folded into the returned factors. Returns (params, {"loss": per-epoch}).
    """
    n, d = x.shape
    f = labels.shape[1]
    if n < 2:
        raise ValueError("too few calibration tokens to train a predictor")
    batch = min(tc.batch_size, n)
    tc = dataclasses.replace(tc, batch_size=batch)
    x32 = np.asarray(x, np.float32)
    mean = x32.mean(axis=0)
    inv_std = (1.0 / np.maximum(x32.std(axis=0), 1e-6)).astype(np.float32)
    share = float(labels.mean())
    share = min(max(share, 1e-4), 1 - 1e-4)
    pos_w, neg_w = np.float32(0.5 / share), np.float32(0.5 / (1 - share))
    key = jax.random.PRNGKey(tc.seed)
    key, init_key = jax.random.split(key)
    p = init_predictor(init_key, d, rank, f, prior=labels.mean(axis=0))
    steps = tc.epochs * (n // batch)
    opt_state = _optimizer(tc, steps).init(p)
    xd, yd = jnp.asarray(x), jnp.asarray(labels)
    mean_d, inv_d = jnp.asarray(mean), jnp.asarray(inv_std)
    losses = []
    bar = tqdm(range(tc.epochs), desc=desc, unit="epoch", file=sys.stderr, disable=not progress, leave=False)
    for epoch in bar:
        key, sub = jax.random.split(key)
        p, opt_state, loss = _epoch(tc, steps, p, opt_state, xd, yd, mean_d, inv_d, sub, pos_w, neg_w)
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    p = _fold_standardization(p, mean, inv_std)
    return {k: jnp.asarray(v) for k, v in p.items()}, {"loss": losses}


# -- evaluation ---------------------------------------------------------------------------------------


@jax.jit
def _counts(selected, labels, magnitudes):
    sel, lab = selected, labels
    mags = magnitudes.astype(jnp.float32)
    return jnp.stack([jnp.sum(sel & lab), jnp.sum(sel), jnp.sum(lab),
                      jnp.sum(jnp.where(sel & lab, mags, 0.0)), jnp.sum(jnp.where(lab, mags, 0.0))]
                     ).astype(jnp.float32)


# Score thresholds at which held-out quality is also reported, to choose a run-time threshold from.
CURVE_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@jax.jit
def _scores(p, x):
    return jax.nn.sigmoid(predictor_logits(p, x))


def predictor_scores(p: dict, x: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Sigmoid scores [N, F] (float32 numpy) of rows x [N, D], computed in chunks."""
    parts = [np.asarray(_scores(p, jnp.asarray(x[i:i + chunk]))) for i in range(0, len(x), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0, p["bias"].shape[0]), np.float32)


def selected_rows(scores: np.ndarray, selection: Selection, active_count: float | None = None) -> np.ndarray:
    """bool [N, F]: what `selection` picks for each row of scores [N, F] (per token, no union)."""
    if selection.mode == "topk":
        return np.asarray(_topk_rows(jnp.asarray(scores), np.int32(selection.k(scores.shape[1], active_count))))
    return scores > selection.threshold


def selection_metrics(selected: np.ndarray, labels: np.ndarray, magnitudes: np.ndarray | None = None) -> dict:
    """Per-token selection quality, summed over tokens: precision = true among selected, recall =
    active neurons selected, `mass_recall` = share of the active neurons' |activation| selected,
    `selected` and `active` = mean share of the layer per token."""
    mags = magnitudes if magnitudes is not None else labels.astype(np.float32)
    tp, sel, act, mass_tp, mass = (float(v) for v in np.asarray(_counts(jnp.asarray(selected), jnp.asarray(labels),
                                                                         jnp.asarray(mags))))
    size = selected.size
    return {"precision": tp / sel if sel else 1.0, "recall": tp / act if act else 1.0,
            "mass_recall": mass_tp / mass if mass else 1.0, "selected": sel / size, "active": act / size}


def evaluate_predictor(p: dict, x: np.ndarray, labels: np.ndarray, magnitudes: np.ndarray | None = None,
                       selection: Selection = Selection(),
                       active_count: float | None = None) -> tuple[dict, np.ndarray]:
    """Held-out quality of a predictor: `selection_metrics` of `selection`, plus "curve", the same
    at each of CURVE_THRESHOLDS. Also returns the selection bool [N, F]."""
    scores = predictor_scores(p, x)
    chosen = selected_rows(scores, selection, active_count)
    metrics = selection_metrics(chosen, labels, magnitudes)
    metrics["curve"] = [{"threshold": t, **selection_metrics(scores > t, labels, magnitudes)} for t in CURVE_THRESHOLDS]
    return metrics, chosen
