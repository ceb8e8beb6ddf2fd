"""Predictors stored with the model they were calibrated for, and the object the engine uses.

    <model_dir>/predictors/
        arrays/       Orbax checkpoint {"layers": {"0": {"a", "b", "bias"}, ...}, "lookahead": {...}}
        meta.json     written last: kind, thresholds, ranks, target sparsity, per-layer metrics,
                      the model config and the checksum of arrays/

Everything is written into a temporary sibling directory and renamed into place at the end, so a
half-written set never loads; `load_predictors` checks meta.json and the checksum and raises
`PredictorsError` (naming the fix: re-run calibrate) when they are missing or differ.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile

import jax.numpy as jnp
import numpy as np

from flashjax.config import ModelConfig
from flashjax.sparsity.gate import gate_mask, gate_topk_mask
from flashjax.sparsity.predictor import Selection, predict_scores, selected_mask
from flashjax.weights.errors import CheckpointError

PREDICTORS_DIR = "predictors"
META_NAME = "meta.json"
ARRAYS_DIR = "arrays"
PREDICTORS_FORMAT = 1
KINDS = ("lowrank", "gate")


class PredictorsError(CheckpointError):
    """A model's predictors are missing, incomplete, damaged or calibrated for another model."""


@dataclasses.dataclass
class Predictors:
    """One model's neuron selection, as calibrated.

    kind "lowrank": `layers[l]` = {"a" [D, r_l], "b" [r_l, F], "bias" [F]} picks layer l's neurons
    from its FFN input; `lookahead[l]` (same shapes) picks layer l's neurons from layer l-1's FFN
    input (the embedding output for l = 0), so layer l's reads can start before its attention runs.
    kind "gate": no trained arrays; `gate_thresholds` for the gate path (the gate projection then
    stays resident, see sparsity.gate). SwiGLU models have `gate_thresholds` in both kinds.

    `thresholds[l]`: |activation| above which a neuron counted as active in calibration.
    `active_counts[l]`: mean active neurons per token (the default k of top-k selection).
    `metrics`: {"predictor": [per-layer dict], "lookahead": [...], "gate": [...]} on held-out tokens.
    """

    config: ModelConfig
    kind: str
    thresholds: np.ndarray
    active_counts: np.ndarray
    target_sparsity: float | None = None
    layers: list | None = None
    lookahead: list | None = None
    gate_thresholds: np.ndarray | None = None
    ranks: tuple = ()
    metrics: dict = dataclasses.field(default_factory=dict)
    selection: Selection = Selection()
    info: dict = dataclasses.field(default_factory=dict)  # tokens, seq_len, epochs, text source, seconds

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown predictor kind {self.kind!r}; one of {', '.join(KINDS)}")
        if self.kind == "lowrank" and self.layers is None:
            raise ValueError("lowrank predictors need their per-layer arrays")

    # -- run time ------------------------------------------------------------------------------

    def scores(self, layer: int, h):
        """Sigmoid scores [..., F] of layer `layer`'s neurons for its FFN input h [..., D]."""
        return predict_scores(self.layers[layer], h)

    def needed_ids(self, layer: int, h, selection: Selection | None = None) -> np.ndarray:
        """Sorted neuron ids (int64) layer `layer` needs for FFN input h [..., D] (numpy or jax;
        the union over tokens)."""
        self._require_lowrank()
        return self._ids(self.layers[layer], layer, h, selection)

    def lookahead_ids(self, layer: int, h_prev, selection: Selection | None = None) -> np.ndarray:
        """Sorted neuron ids layer `layer` will need, predicted from h_prev = layer-1's FFN input
        (the embedding output for layer 0), before layer `layer`'s attention has run."""
        self._require_lowrank()
        if self.lookahead is None:
            raise PredictorsError("these predictors were calibrated without lookahead (lookahead=False)")
        return self._ids(self.lookahead[layer], layer, h_prev, selection)

    def gate_ids(self, layer: int, h, w_gate, b_gate=None, selection: Selection | None = None) -> np.ndarray:
        """The gate path: neurons whose |act(h @ w_gate.T)| clears the calibrated threshold (or the
        top-k of them with a "topk" selection). w_gate [F, D] is the layer's resident gate rows."""
        if self.gate_thresholds is None:
            raise PredictorsError("no gate thresholds: the gate path is for gated FFNs (SwiGLU, GeGLU)")
        sel, activation = selection or self.selection, self.config.ffn_activation
        if sel.mode == "topk":
            k = sel.k(self.config.d_ffn, float(self.active_counts[layer]))
            return np.flatnonzero(np.asarray(gate_topk_mask(w_gate, h, np.int32(k), b_gate, activation=activation)))
        return np.flatnonzero(np.asarray(gate_mask(w_gate, h, np.float32(self.gate_thresholds[layer]), b_gate,
                                                   activation=activation)))

    def _ids(self, params, layer, h, selection):
        sel = selection or self.selection
        return np.flatnonzero(np.asarray(selected_mask(params, jnp.asarray(h), sel, float(self.active_counts[layer]))))

    def _require_lowrank(self):
        if self.kind != "lowrank":
            raise PredictorsError(f"these predictors are of kind {self.kind!r}: no trained low-rank predictors "
                                  f"(calibrate with kind='lowrank'), use gate_ids")

    @property
    def nbytes(self) -> int:
        """Memory the predictor arrays take (what the memory budget must hold)."""
        trees = (self.layers or []) + (self.lookahead or [])
        return int(sum(v.size * v.dtype.itemsize for t in trees for v in t.values()))

    def summary(self) -> str:
        """The per-layer precision/recall table, as printed by calibrate."""
        return format_metrics(self)


_METRIC_COLUMNS = (("selected", "sel"), ("precision", "prec"), ("recall", "recall"), ("mass_recall", "mass"))


def format_metrics(pred: Predictors) -> str:
    """Per layer and on average, on held-out tokens: the share of neurons active, then for each
    selector (low-rank predictor, lookahead, gate path) the share selected, precision, recall and
    mass recall (share of the active neurons' |activation| selected); for lookahead also "cover",
    the share of what layer l's own predictor then selects that lookahead had already read."""
    kinds = [(k, short) for k, short in (("predictor", "pred"), ("lookahead", "look"), ("gate", "gate"))
             if pred.metrics.get(k)]
    if not kinds:
        return "(no metrics)"
    n = pred.config.n_layers

    def columns(key):
        cols = list(_METRIC_COLUMNS) + ([("covered", "cover")] if key == "lookahead" else [])
        return cols

    head = f"{'layer':>5} {'rank':>5} {'active':>6}"
    for key, short in kinds:
        head += " |" + "".join(f" {(short + ' ' + name) if i == 0 else name:>{10 if i == 0 else 6}}"
                                for i, (_, name) in enumerate(columns(key)))
    lines = [head, "-" * len(head)]
    first = pred.metrics[kinds[0][0]]
    for l in list(range(n)) + ["mean"]:
        if l == "mean":
            line = f"{'mean':>5} {'':>5} {np.mean([m['active'] for m in first]):6.3f}"
        else:
            line = f"{l:>5} {pred.ranks[l] if l < len(pred.ranks) else '-':>5} {first[l]['active']:6.3f}"
        for key, _ in kinds:
            ms = pred.metrics[key]
            line += " |"
            for i, (field, _) in enumerate(columns(key)):
                v = np.mean([m[field] for m in ms]) if l == "mean" else ms[l][field]
                line += f" {v:{10 if i == 0 else 6}.3f}"
        lines.append(line)
    return "\n".join(lines)


# -- on disk ----------------------------------------------------------------------------------------


def _quiet_orbax():
    logging.getLogger("absl").setLevel(logging.ERROR)


def _tree(pred: Predictors) -> dict:
    tree = {"layers": {str(i): {k: np.asarray(v, np.float32) for k, v in p.items()} for i, p in enumerate(pred.layers)}}
    if pred.lookahead is not None:
        tree["lookahead"] = {str(i): {k: np.asarray(v, np.float32) for k, v in p.items()}
                             for i, p in enumerate(pred.lookahead)}
    return tree


def _meta(pred: Predictors) -> dict:
    from flashjax.store.manifest import model_config_to_dict

    return {"format": PREDICTORS_FORMAT, "kind": pred.kind, "config": model_config_to_dict(pred.config),
            "thresholds": [float(t) for t in pred.thresholds],
            "active_counts": [float(c) for c in pred.active_counts],
            "gate_thresholds": None if pred.gate_thresholds is None else [float(t) for t in pred.gate_thresholds],
            "target_sparsity": pred.target_sparsity, "ranks": [int(r) for r in pred.ranks],
            "lookahead": pred.lookahead is not None, "metrics": pred.metrics,
            "selection": dataclasses.asdict(pred.selection), "info": pred.info}


def save_predictors(model_dir, pred: Predictors) -> str:
    """Stores `pred` as <model_dir>/predictors (replacing any there); returns that path."""
    import orbax.checkpoint as ocp

    from flashjax.store.manifest import FileGroup, read_manifest

    model_dir = os.path.abspath(os.fspath(model_dir))
    manifest = read_manifest(model_dir)
    if manifest.config != pred.config:
        raise PredictorsError(f"{model_dir}: these predictors were made for another model config")
    final = os.path.join(model_dir, PREDICTORS_DIR)
    tmp = tempfile.mkdtemp(prefix=f".{PREDICTORS_DIR}.tmp-", dir=model_dir)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the model directory is not
    try:
        meta = _meta(pred)
        meta["model_resident_sha256"] = manifest.resident.get("sha256")
        if pred.kind == "lowrank":
            _quiet_orbax()
            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(os.path.join(tmp, ARRAYS_DIR), _tree(pred))
                checkpointer.wait_until_finished()
            group = FileGroup.of(tmp, [ARRAYS_DIR])
            meta["arrays"] = {"sha256": group.sha256, "files": group.files}
        with open(os.path.join(tmp, META_NAME), "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        old = None
        if os.path.lexists(final):
            old = tempfile.mkdtemp(prefix=f".{PREDICTORS_DIR}.old-", dir=model_dir)
            os.rename(final, os.path.join(old, PREDICTORS_DIR))
        os.rename(tmp, final)
        tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def has_predictors(model_dir) -> bool:
    return os.path.isdir(os.path.join(os.fspath(model_dir), PREDICTORS_DIR))


def require_predictors(model_dir, verify: bool = True) -> Predictors:
    """`load_predictors`, but a model never calibrated is an error telling the user how to calibrate."""
    pred = load_predictors(model_dir, verify=verify)
    if pred is None:
        raise PredictorsError(f"{model_dir} has no sparsity predictors: run `flashjax calibrate {model_dir}` first "
                              f"(or choose another --sparsity mode)")
    return pred


def load_predictors(model_dir, verify: bool = True) -> Predictors | None:
    """The predictors stored with a flash model, or None when it has none (never calibrated).

    Raises PredictorsError when they are incomplete or damaged (meta.json missing, a file missing,
    truncated or, with `verify`, differing from its checksum) or were calibrated for another model.
    """
    from flashjax.store.manifest import FileGroup, StoreChecksumError, model_config_from_dict, read_manifest

    model_dir = os.path.abspath(os.fspath(model_dir))
    root = os.path.join(model_dir, PREDICTORS_DIR)
    if not os.path.isdir(root):
        return None
    fix = f"run `flashjax calibrate {model_dir}` again"
    meta_path = os.path.join(root, META_NAME)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        cfg = model_config_from_dict(meta["config"])
        kind = meta["kind"]
    except FileNotFoundError:
        raise PredictorsError(f"{root}: incomplete predictors ({META_NAME} is missing); {fix}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise PredictorsError(f"{meta_path}: unreadable predictor metadata ({type(e).__name__}: {e}); {fix}") from None
    if meta.get("format") != PREDICTORS_FORMAT:
        raise PredictorsError(f"{root}: predictor format {meta.get('format')!r} is not {PREDICTORS_FORMAT}; {fix}")
    manifest = read_manifest(model_dir)
    if cfg != manifest.config or meta.get("model_resident_sha256") != manifest.resident.get("sha256"):
        raise PredictorsError(f"{root}: these predictors were calibrated for another model; {fix}")
    layers = lookahead = None
    if kind == "lowrank":
        arrays = meta.get("arrays")
        if not arrays:
            raise PredictorsError(f"{meta_path}: lowrank predictors without arrays; {fix}")
        try:
            FileGroup(arrays["sha256"], dict(arrays["files"])).check(root, "predictor arrays", full=verify)
        except StoreChecksumError as e:
            raise PredictorsError(f"{e}; {fix}") from None
        layers, lookahead = _restore_arrays(os.path.join(root, ARRAYS_DIR), cfg, meta, fix)
    gate = meta.get("gate_thresholds")
    return Predictors(
        config=cfg, kind=kind, thresholds=np.asarray(meta["thresholds"], np.float32),
        active_counts=np.asarray(meta["active_counts"], np.float32), target_sparsity=meta.get("target_sparsity"),
        layers=layers, lookahead=lookahead, gate_thresholds=None if gate is None else np.asarray(gate, np.float32),
        ranks=tuple(meta.get("ranks", ())), metrics=meta.get("metrics", {}),
        selection=Selection(**meta.get("selection", {})), info=meta.get("info", {}))


def _restore_arrays(path: str, cfg: ModelConfig, meta: dict, fix: str):
    import jax
    import orbax.checkpoint as ocp

    ranks = meta["ranks"]

    def shapes(n_layers):
        return {str(l): {"a": jax.ShapeDtypeStruct((cfg.d_model, ranks[l]), np.float32),
                         "b": jax.ShapeDtypeStruct((ranks[l], cfg.d_ffn), np.float32),
                         "bias": jax.ShapeDtypeStruct((cfg.d_ffn,), np.float32)} for l in range(n_layers)}

    target = {"layers": shapes(cfg.n_layers)}
    if meta.get("lookahead"):
        target["lookahead"] = shapes(cfg.n_layers)
    _quiet_orbax()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.restore(path, target)
    except Exception as e:  # Orbax/TensorStore raise many kinds of errors on damaged checkpoints
        raise PredictorsError(f"{path}: cannot restore the predictors ({type(e).__name__}: {e}); {fix}") from None

    def as_list(d):
        return [{k: jnp.asarray(v) for k, v in d[str(l)].items()} for l in range(cfg.n_layers)]

    return as_list(tree["layers"]), (as_list(tree["lookahead"]) if "lookahead" in tree else None)
