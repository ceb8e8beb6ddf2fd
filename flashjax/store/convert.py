"""Writing flash model directories: `convert` (from anything `--model` accepts) and `FlashWriter`
(for generators that make weights themselves, like the synthetic benchmark models).

    convert("smollm2", "models/smollm2-flash")            # float16 records, bundled, auto block size

Tensors arrive one at a time. FFN tensors are staged on disk per (layer, part) until a layer is
complete, then written as that layer's records; resident tensors are collected in their storage dtype
(they are what the engine keeps in memory anyway). Everything is written into a temporary sibling
directory, `manifest.json` last, and renamed into place at the end, so an interrupted conversion
leaves nothing that loads.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import numpy as np
from tqdm import tqdm

from flashjax.config import ModelConfig
from flashjax.store.manifest import (FileGroup, Layout, LayerEntry, Manifest, is_ffn_on_disk, resident_dtype,
                                     storage_dtype)
from flashjax.store.resident import resident_paths, save_resident
from flashjax.store.zarr_io import write_array

# Target size of a block (inner chunk, the unit TensorStore reads): ffn_block=None picks the largest
# power of two of neurons whose records fit in it. Measured here (see flashjax/store/zarr_io.py):
# fewer, larger blocks win while a block is well under ~32 KiB, since each chunk read costs ~5-10 us
# even from the page cache; past that, the rows read but not wanted cost more (SmolLM2 float16
# records are 3.4 KB -> 8 neurons; OPT-6.7B-shaped records are 16 KB -> 1).
BLOCK_BYTES = 32 * 1024


class ConvertError(ValueError):
    """The conversion cannot be done: bad output path, existing output, incomplete weights."""


def auto_ffn_block(record_bytes: int, block_bytes: int = BLOCK_BYTES) -> int:
    block = 1
    while block * 2 * record_bytes <= block_bytes:
        block *= 2
    return block


def layer_array_paths(layer: int, layout: Layout) -> dict[str, str]:
    """Relative paths of a layer's arrays: {"bundle": "ffn/layer_007"} or {"gate": "ffn/layer_007_gate", ...}."""
    base = f"ffn/layer_{layer:03d}"
    if layout.bundle is not None:
        return {"bundle": base}
    return {name: f"{base}_{name}" for name in layout.names}


def write_layer(model_dir: str, layer: int, records: np.ndarray, layout: Layout, dtype: str) -> LayerEntry:
    """Writes one layer's records [d_ffn, record_width] as its zarr3 array(s); returns its manifest entry."""
    arrays = layer_array_paths(layer, layout)
    for name, rel in arrays.items():
        data = records if name == "bundle" else records[:, layout.part_slice(name)]
        write_array(os.path.join(model_dir, rel), np.ascontiguousarray(data), dtype, layout.ffn_block)
    return LayerEntry(arrays=arrays, checksum=FileGroup.of(model_dir, list(arrays.values())))


def _check_paths(source_path: str | None, out_dir: str, overwrite: bool) -> None:
    out = os.path.realpath(out_dir)
    if source_path is not None:
        src = os.path.realpath(source_path)
        if out == src or out.startswith(src.rstrip(os.sep) + os.sep):
            raise ConvertError(f"{out_dir}: the output cannot be the source or inside it ({source_path})")
        if src.startswith(out.rstrip(os.sep) + os.sep):
            raise ConvertError(f"{out_dir}: the output directory contains the source ({source_path}); "
                               f"replacing it would delete the source")
    if os.path.lexists(out_dir) and not overwrite:
        raise ConvertError(f"{out_dir}: already exists (pass overwrite=True / --overwrite to replace it)")


def _move_into_place(tmp: str, out_dir: str) -> None:
    # Rename the old model aside first: the new one is complete before the old one is removed.
    old = None
    if os.path.lexists(out_dir):
        old = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".old-", dir=os.path.dirname(out_dir))
        os.rmdir(old)
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old)
        else:
            os.remove(old)


class FlashWriter:
    """Writes one flash model directory; use as a context manager.

        with FlashWriter(out_dir, cfg, dtype="float16") as writer:
            for path, array in tensors:          # any order; FFN tensors or whole layers' records
                writer.add(path, array)
        # on a clean exit: manifest written, directory renamed into place; on an error: nothing left

    `add_records(layer, records)` takes a layer's records [d_ffn, record_width] directly (generators
    that build records themselves); set `writer.tokenizer` (a flashjax Tokenizer) to write its files.
    `source_path`, when given, is refused as (or around) the output.
    """

    def __init__(self, out_dir, cfg: ModelConfig, dtype: str = "float16", ffn_block: int | None = None,
                 bundle: bool = True, overwrite: bool = False, source_path: str | None = None,
                 source_info: dict | None = None):
        storage_dtype(dtype)  # validates the name before any work
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        self.cfg, self.dtype, self.overwrite = cfg, dtype, overwrite
        if ffn_block is None:
            ffn_block = auto_ffn_block(Layout.for_config(cfg).record_width * storage_dtype(dtype).itemsize)
        self.layout = Layout.for_config(cfg, bundle=bundle, ffn_block=ffn_block)
        self.source_info = source_info or {}
        self.tokenizer = None
        _check_paths(source_path, self.out_dir, overwrite)
        self.tmp = None

    def __enter__(self) -> "FlashWriter":
        parent = os.path.dirname(self.out_dir)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=os.path.basename(self.out_dir) + ".partial-", dir=parent)
        os.chmod(self.tmp, 0o755)  # mkdtemp makes it private; the model is an ordinary directory
        self.staging = os.path.join(self.tmp, "staging")
        os.makedirs(self.staging)
        self.resident: dict[str, tuple] = {}  # path -> (staged file, dtype, shape)
        self.pending: dict[int, set[str]] = {}
        self.layers: dict[int, LayerEntry] = {}
        self.manifest = None
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.manifest = self._commit()
        finally:
            if os.path.isdir(self.tmp):
                shutil.rmtree(self.tmp, ignore_errors=True)
        return False

    # -- adding weights --------------------------------------------------------------------------

    def add(self, path: str, array: np.ndarray) -> None:
        """Adds one tensor (flashjax path, array in any float dtype; shapes as ModelSource yields)."""
        if not is_ffn_on_disk(path):
            # Staged to disk too and memory-mapped back for the Orbax save, so that converting holds
            # one tensor in memory, not the resident third of the model.
            # (Raw bytes, not .npy: numpy's .npy has no bfloat16.)
            staged = os.path.join(self.staging, f"resident_{path}.bin")
            dtype = resident_dtype(array.shape, self.dtype)
            np.ascontiguousarray(array, dtype=dtype).tofile(staged)
            self.resident[path] = (staged, dtype, tuple(array.shape))
            return
        _, layer, _, leaf = path.split(".")
        layer, part = int(layer), leaf.removeprefix("w_")
        # Staged neuron-major, as the record lays it out: w_down's column i, biases as a column.
        piece = array.T if part == "down" else (array[:, None] if array.ndim == 1 else array)
        np.ascontiguousarray(piece, dtype=storage_dtype(self.dtype)).tofile(self._staged(layer, part))
        done = self.pending.setdefault(layer, set())
        done.add(part)
        if done == set(self.layout.names):
            self._write_staged(layer)

    def add_records(self, layer: int, records: np.ndarray) -> None:
        """Adds a whole layer's records [d_ffn, record_width] (see Layout for the column order)."""
        want = (self.cfg.d_ffn, self.layout.record_width)
        if records.shape != want:
            raise ConvertError(f"layer {layer}: records of shape {records.shape}, expected {want}")
        self.layers[layer] = write_layer(self.tmp, layer, np.asarray(records, storage_dtype(self.dtype)),
                                         self.layout, self.dtype)

    def _staged(self, layer: int, part: str) -> str:
        return os.path.join(self.staging, f"layer_{layer:03d}_{part}.bin")

    def _write_staged(self, layer: int) -> None:
        np_dtype, f = storage_dtype(self.dtype), self.cfg.d_ffn
        records = np.empty((f, self.layout.record_width), np_dtype)
        for name, width in self.layout.parts:
            records[:, self.layout.part_slice(name)] = np.fromfile(self._staged(layer, name), np_dtype).reshape(f, width)
        self.layers[layer] = write_layer(self.tmp, layer, records, self.layout, self.dtype)
        for name in self.layout.names:
            os.remove(self._staged(layer, name))

    # -- finishing -------------------------------------------------------------------------------

    def _commit(self) -> Manifest:
        missing = [i for i in range(self.cfg.n_layers) if i not in self.layers]
        if missing:
            raise ConvertError(f"no complete FFN weights for layers {missing}")
        absent = [p for p in resident_paths(self.cfg) if p not in self.resident]
        if absent:
            raise ConvertError(f"resident tensors missing: {', '.join(absent[:5])}{' ...' if len(absent) > 5 else ''}")
        from flashjax.model.params import empty_tree, set_path
        tree = empty_tree(self.cfg)
        for path, (staged, dtype, shape) in self.resident.items():
            set_path(tree, path, np.memmap(staged, dtype=dtype, mode="r", shape=shape))
        save_resident(self.tmp, tree)
        del tree
        shutil.rmtree(self.staging)
        if self.tokenizer is not None:
            from flashjax.store.tokenizer_files import write_tokenizer_files
            write_tokenizer_files(self.tokenizer, self.tmp)
        resident_files = FileGroup.of(self.tmp, ["resident"])
        manifest = Manifest(
            config=self.cfg, dtype=self.dtype, layout=self.layout,
            layers=tuple(self.layers[i] for i in range(self.cfg.n_layers)),
            resident={"path": "resident", "sha256": resident_files.sha256, "bytes": resident_files.bytes,
                      "files": resident_files.files},
            source=self.source_info, tokenizer=self.tokenizer is not None)
        manifest.write(self.tmp)  # last: its presence marks a complete model
        _move_into_place(self.tmp, self.out_dir)
        return manifest


def convert(src_spec, out_dir, dtype: str = "float16", overwrite: bool = False, progress: bool = True,
            ffn_block: int | None = None, bundle: bool = True) -> Manifest:
    """Converts `src_spec` (anything `--model` accepts, a flash directory too, or a ModelSource object
    such as a generator of synthetic weights) into a flash model directory `out_dir`; returns the
    manifest written.

    `dtype`: storage dtype of the FFN records and resident matrices ("float16", "bfloat16", "float32").
    `ffn_block`: neurons per block (inner chunk); None: as many as fit in BLOCK_BYTES. `bundle=False`
    writes each projection as its own array (the "bundling off" baseline).
    """
    from flashjax.tokenizer import TokenizerError
    from flashjax.store.model import open_model_source
    from flashjax.weights.source import ModelSource

    source = src_spec if isinstance(src_spec, ModelSource) else open_model_source(src_spec)
    cfg = source.config
    on_disk = os.path.exists(source.path)  # generated sources name no file
    info = {"spec": source.path if isinstance(src_spec, ModelSource) else os.fspath(src_spec),
            "path": os.path.abspath(source.path) if on_disk else source.path, "fmt": source.fmt}
    with FlashWriter(out_dir, cfg, dtype, ffn_block, bundle, overwrite, source.path if on_disk else None,
                     info) as writer:
        with tqdm(total=cfg.param_count(), unit="w", unit_scale=True, desc="converting", file=sys.stderr,
                  disable=not progress) as bar:
            for path, array in source.iter_tensors():
                writer.add(path, array)
                bar.update(array.size)
        try:
            writer.tokenizer = source.tokenizer()
        except TokenizerError as e:
            print(f"flashjax convert: warning: no tokenizer written ({e})", file=sys.stderr)
    return writer.manifest
