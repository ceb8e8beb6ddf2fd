"""Building the parameter tree from a checkpoint, one tensor at a time."""

from __future__ import annotations

import sys

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from flashjax.config import ModelConfig


def empty_tree(cfg: ModelConfig) -> dict:
    return {"embed": {}, "final_norm": {}, "layers": [
        {"attn_norm": {}, "attn": {}, "ffn_norm": {}, "ffn": {}} for _ in range(cfg.n_layers)]}


def set_path(tree: dict, path: str, value) -> None:
    """Stores `value` at a dotted path like "layers.3.attn.wq"."""
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[leaf] = value


def load_params(source, dtype=jnp.float32, progress: bool = True, skip=lambda path: False, place=None) -> dict:
    """Reads every tensor of `source` (a ModelSource) into a tree of device arrays of `dtype`.

    `skip(path)` leaves a tensor out (the flash engine keeps FFN weights on disk). `place(path, array)`
    puts a host array (already `dtype`) on its devices; the default is the default device
    (`tensor_parallel` splits each tensor over a mesh as it is read).
    """
    cfg = source.config
    tree = empty_tree(cfg)
    bar = tqdm(total=cfg.param_count(), unit="w", unit_scale=True, desc="loading weights",
               file=sys.stderr, disable=not progress, leave=False)
    for path, array in source.iter_tensors():
        if not skip(path):
            array = np.asarray(array).astype(dtype, copy=False)
            set_path(tree, path, jnp.asarray(array) if place is None else place(path, array))
        bar.update(array.size)
    bar.close()
    return tree


def tree_nbytes(tree) -> int:
    import jax
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))
