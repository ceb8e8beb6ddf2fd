"""The resident parameters (everything but the FFN records) as an Orbax checkpoint.

The tree is the engine's (`flashjax.model.params.empty_tree`) with the "layers" list stored as a dict
keyed "0", "1", ... (Orbax keys trees by name). Matrices are stored in the storage dtype, vectors
(norm scales, biases, b_down included) in float32: see `manifest.resident_dtype`. In a quantized
model each matrix has a format of its own (`resident_format`), and a quantized one is stored as
{"values", "scales"[, "offsets"]} (flashjax.quant.QuantizedRows) and loaded back as such.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from flashjax.config import ModelConfig
from flashjax.quant import GROUP, QuantizedRows, quantizable, row_bytes
from flashjax.store.manifest import is_ffn_on_disk, is_quantized, resident_dtype
from flashjax.weights.errors import CheckpointError
from flashjax.weights.mapping import expected_shape, tensor_plan

RESIDENT_DIR = "resident"


def resident_paths(cfg: ModelConfig) -> list[str]:
    """Parameter paths kept in memory, in checkpoint order."""
    return [path for path, _, _ in tensor_plan(cfg, "hf") if not is_ffn_on_disk(path)]


# Tables that embed tokens and produce logits stay at 8 bits under --quant q4, as llama.cpp's Q4_K_M
# keeps its output matrix at 6-8 bits: every logit goes through them, and they are resident anyway.
EIGHT_BIT_TABLES = ("embed.embedding", "embed.positions", "lm_head")


def resident_format(path: str, shape: tuple[int, ...], storage: str) -> str:
    """How a resident tensor is held: a float dtype name, or "q8"/"q4" for a quantized matrix."""
    if not is_quantized(storage):
        return resident_dtype(shape, storage).name
    if len(shape) < 2 or path.endswith(".ffn.router"):
        # Vectors, and a mixture of experts' router (as llama.cpp keeps ffn_gate_inp: a coarse router
        # could choose other experts; it is E x D, a sliver of the model).
        return "float32"
    if not quantizable(shape[-1]):
        return "float16"  # rows that do not split into blocks stay float16
    return "q8" if storage == "q4" and path in EIGHT_BIT_TABLES else storage


def resident_formats(cfg: ModelConfig, storage: str) -> dict[str, str]:
    """{path: format} for a new conversion (the converter records it in the manifest)."""
    return {path: resident_format(path, expected_shape(cfg, path), storage) for path in resident_paths(cfg)}


def manifest_formats(manifest) -> dict[str, str]:
    """How a converted model's resident tensors are held: as its manifest records (models converted
    before formats were recorded hold float matrices, derived from the storage dtype)."""
    return manifest.resident.get("formats") or resident_formats(manifest.config, manifest.dtype)


def quantized_tree(rows: QuantizedRows) -> dict:
    """A quantized matrix as the checkpoint stores it."""
    out = {"values": rows.values, "scales": rows.scales}
    if rows.offsets is not None:
        out["offsets"] = rows.offsets
    return out


def _abstract_leaf(shape: tuple[int, ...], fmt: str):
    import jax

    if fmt not in ("q8", "q4"):
        return jax.ShapeDtypeStruct(shape, np.dtype(fmt))
    rows, k = shape
    values = jax.ShapeDtypeStruct((rows, k) if fmt == "q8" else (rows, k // 2), np.int8 if fmt == "q8" else np.uint8)
    leaf = {"values": values, "scales": jax.ShapeDtypeStruct((rows, k // GROUP), np.float16)}
    if fmt == "q4":
        leaf["offsets"] = jax.ShapeDtypeStruct((rows, k // GROUP), np.float16)
    return leaf


def _format_bytes(shape: tuple[int, ...], fmt: str) -> int:
    if fmt in ("q8", "q4"):
        return shape[0] * row_bytes(fmt, shape[1])
    return int(np.prod(shape)) * np.dtype(fmt).itemsize


def _to_orbax(tree: dict) -> dict:
    return {**tree, "layers": {str(i): layer for i, layer in enumerate(tree["layers"])}}


def _from_orbax(tree: dict, n_layers: int) -> dict:
    layers = tree.get("layers", {})
    return {**tree, "layers": [layers.get(str(i), {}) for i in range(n_layers)]}


def _quiet_orbax():
    # Orbax logs every save and restore at INFO/WARNING through absl; the converter has its own bar.
    logging.getLogger("absl").setLevel(logging.ERROR)


def save_resident(model_dir: str, tree: dict) -> str:
    """Writes `tree` (engine layout, numpy leaves already in their stored dtypes) to model_dir/resident."""
    import orbax.checkpoint as ocp

    _quiet_orbax()
    path = os.path.join(os.path.abspath(model_dir), RESIDENT_DIR)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, _to_orbax(tree))
        checkpointer.wait_until_finished()
    return RESIDENT_DIR


def abstract_tree(cfg: ModelConfig, formats: dict[str, str]) -> dict:
    """Shapes and dtypes of the stored resident tree, to restore into."""
    from flashjax.model.params import empty_tree, set_path

    tree = empty_tree(cfg)
    for path, fmt in formats.items():
        set_path(tree, path, _abstract_leaf(expected_shape(cfg, path), fmt))
    return tree


def _as_rows(tree, formats: dict[str, str], prefix: str = ""):
    """Stored {"values", "scales", ...} leaves of quantized paths -> QuantizedRows."""
    if isinstance(tree, list):
        return [_as_rows(t, formats, f"{prefix}{i}.") for i, t in enumerate(tree)]
    out = {}
    for key, value in tree.items():
        path = prefix + key
        fmt = formats.get(path)
        if fmt in ("q8", "q4"):
            out[key] = QuantizedRows(fmt, np.asarray(value["values"]), np.asarray(value["scales"]),
                                     np.asarray(value["offsets"]) if "offsets" in value else None)
        elif isinstance(value, (dict, list)):
            out[key] = _as_rows(value, formats, path + ".")
        else:
            out[key] = value
    return out


def load_resident_numpy(model_dir: str, cfg: ModelConfig, formats: dict[str, str]) -> dict:
    """The resident tree as numpy arrays in their stored dtypes (engine layout: "layers" is a list);
    quantized matrices as flashjax.quant.QuantizedRows."""
    import orbax.checkpoint as ocp

    _quiet_orbax()
    path = os.path.join(os.path.abspath(model_dir), RESIDENT_DIR)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: resident checkpoint directory is missing")
    target = _to_orbax(abstract_tree(cfg, formats))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(path, target)
    except Exception as e:  # Orbax/TensorStore raise many kinds of errors on damaged checkpoints
        raise CheckpointError(f"{path}: cannot restore the resident checkpoint ({type(e).__name__}: {e})") from None
    tree = _from_orbax(restored, cfg.n_layers)
    return _as_rows(tree, formats)


def resident_nbytes(cfg: ModelConfig, formats: dict[str, str], dtype=None) -> int:
    """Bytes the resident parameters take in `dtype`, or as stored (`dtype="stored"`: matrices in the
    storage dtype or quantized, vectors float32)."""
    total = 0
    for path, fmt in formats.items():
        shape = expected_shape(cfg, path)
        total += _format_bytes(shape, fmt if isinstance(dtype, str) and dtype == "stored" else np.dtype(dtype).name)
    return total


def load_resident(model_dir: str, dtype=None, manifest=None) -> dict:
    """The resident parameters as jax arrays of `dtype` (None: float32; "stored": as stored, matrices
    in the storage dtype and vectors float32), in `empty_tree`'s layout:
    {"embed", "final_norm", "layers": [{"attn_norm", "attn", "ffn_norm", "ffn"}, ...]} where "ffn"
    holds only resident bits (b_down when the model has FFN biases)."""
    import jax
    import jax.numpy as jnp

    from flashjax.store.manifest import read_manifest

    from flashjax.quant import QuantizedMatrix

    manifest = manifest or read_manifest(model_dir)
    tree = load_resident_numpy(model_dir, manifest.config, manifest_formats(manifest))
    is_rows = lambda a: isinstance(a, QuantizedRows)  # noqa: E731
    if isinstance(dtype, str) and dtype == "stored":
        return jax.tree.map(lambda a: QuantizedMatrix.from_rows(a) if is_rows(a) else jnp.asarray(np.asarray(a)),
                            tree, is_leaf=is_rows)
    dtype = jnp.float32 if dtype is None else dtype
    return jax.tree.map(lambda a: jnp.asarray(a.dequantize() if is_rows(a) else np.asarray(a), dtype=dtype),
                        tree, is_leaf=is_rows)
