"""The resident parameters (everything but the FFN records) as an Orbax checkpoint.

The tree is the engine's (`flashjax.model.params.empty_tree`) with the "layers" list stored as a dict
keyed "0", "1", ... (Orbax keys trees by name). Matrices are stored in the storage dtype, vectors
(norm scales, biases, b_down included) in float32: see `manifest.resident_dtype`.
"""

from __future__ import annotations

import logging
import os

import numpy as np

from flashjax.config import ModelConfig
from flashjax.store.manifest import is_ffn_on_disk, resident_dtype
from flashjax.weights.errors import CheckpointError
from flashjax.weights.mapping import expected_shape, tensor_plan

RESIDENT_DIR = "resident"


def resident_paths(cfg: ModelConfig) -> list[str]:
    """Parameter paths kept in memory, in checkpoint order."""
    return [path for path, _, _ in tensor_plan(cfg, "hf") if not is_ffn_on_disk(path)]


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


def abstract_tree(cfg: ModelConfig, storage: str) -> dict:
    """Shapes and dtypes of the stored resident tree, to restore into."""
    import jax

    from flashjax.model.params import empty_tree, set_path

    tree = empty_tree(cfg)
    for path in resident_paths(cfg):
        shape = expected_shape(cfg, path)
        set_path(tree, path, jax.ShapeDtypeStruct(shape, resident_dtype(shape, storage)))
    return tree


def load_resident_numpy(model_dir: str, cfg: ModelConfig, storage: str) -> dict:
    """The resident tree as numpy arrays in their stored dtypes (engine layout: "layers" is a list)."""
    import orbax.checkpoint as ocp

    _quiet_orbax()
    path = os.path.join(os.path.abspath(model_dir), RESIDENT_DIR)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: resident checkpoint directory is missing")
    target = _to_orbax(abstract_tree(cfg, storage))
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(path, target)
    except Exception as e:  # Orbax/TensorStore raise many kinds of errors on damaged checkpoints
        raise CheckpointError(f"{path}: cannot restore the resident checkpoint ({type(e).__name__}: {e})") from None
    return _from_orbax(restored, cfg.n_layers)


def resident_nbytes(cfg: ModelConfig, storage: str, dtype=None) -> int:
    """Bytes the resident parameters take in `dtype`, or as stored (`dtype="stored"`: matrices in the
    storage dtype, vectors float32)."""
    total = 0
    for path in resident_paths(cfg):
        shape = expected_shape(cfg, path)
        held = resident_dtype(shape, storage) if isinstance(dtype, str) and dtype == "stored" else np.dtype(dtype)
        total += int(np.prod(shape)) * held.itemsize
    return total


def load_resident(model_dir: str, dtype=None, manifest=None) -> dict:
    """The resident parameters as jax arrays of `dtype` (None: float32; "stored": as stored, matrices
    in the storage dtype and vectors float32), in `empty_tree`'s layout:
    {"embed", "final_norm", "layers": [{"attn_norm", "attn", "ffn_norm", "ffn"}, ...]} where "ffn"
    holds only resident bits (b_down when the model has FFN biases)."""
    import jax
    import jax.numpy as jnp

    from flashjax.store.manifest import read_manifest

    manifest = manifest or read_manifest(model_dir)
    tree = load_resident_numpy(model_dir, manifest.config, manifest.dtype)
    if isinstance(dtype, str) and dtype == "stored":
        return jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), tree)
    dtype = jnp.float32 if dtype is None else dtype
    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a), dtype=dtype), tree)
