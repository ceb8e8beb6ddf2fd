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

import hashlib
import os
import shutil
import sys
import tempfile

import numpy as np
from tqdm import tqdm

from flashjax.config import ModelConfig
from flashjax.quant import GROUP, QuantizedRows, quantizable, quantize, relative_rms_error
from flashjax.store.manifest import (FileGroup, Layout, LayerEntry, Manifest, encode_part, is_ffn_on_disk,
                                     is_quantized, storage_dtype)
from flashjax.store.resident import quantized_tree, resident_format, resident_paths, save_resident
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


def write_layer(model_dir: str, layer: int, records: np.ndarray, layout: Layout, dtype: str,
                expert_ffn: int | None = None) -> LayerEntry:
    """Writes one layer's records [d_ffn, record_width] as its zarr3 array(s); returns its manifest entry
    (with each expert's digest when `expert_ffn` says the records are a mixture of experts')."""
    arrays = layer_array_paths(layer, layout)
    for name, rel in arrays.items():
        data = records if name == "bundle" else records[:, layout.part_slice(name)]
        write_array(os.path.join(model_dir, rel), np.ascontiguousarray(data), storage_dtype(dtype).name,
                    layout.ffn_block)
    experts = None if expert_ffn is None else expert_digests(records, expert_ffn)
    return LayerEntry(arrays=arrays, checksum=FileGroup.of(model_dir, list(arrays.values())), expert_sha256=experts)


def expert_digests(records: np.ndarray, expert_ffn: int) -> tuple[str, ...]:
    """sha256 of each expert's records [expert_ffn, record_width] as stored."""
    return tuple(hashlib.sha256(np.ascontiguousarray(records[e:e + expert_ffn]).tobytes()).hexdigest()
                 for e in range(0, len(records), expert_ffn))


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
                 source_info: dict | None = None, down_quant: str | None = None):
        storage_dtype(dtype)  # validates the name before any work ("q8"/"q4": quantized)
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        self.cfg, self.dtype, self.overwrite = cfg, dtype, overwrite
        quant = dtype if is_quantized(dtype) else None
        if quant is not None and not quantizable(cfg.d_model):
            raise ConvertError(f"--quant {quant} stores each neuron's rows in blocks of {GROUP} values, and this "
                               f"model's d_model ({cfg.d_model}) is not a multiple of {GROUP}: use --dtype instead")
        if ffn_block is None:
            layout = Layout.for_config(cfg, quant=quant, down_quant=down_quant)
            ffn_block = auto_ffn_block(layout.record_width * storage_dtype(dtype).itemsize)
        self.layout = Layout.for_config(cfg, bundle=bundle, ffn_block=ffn_block, quant=quant, down_quant=down_quant)
        self.errors: dict[str, tuple[str, str, float]] = {}  # path -> (from, stored as, relative RMS error)
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
        self.resident: dict[str, tuple] = {}  # path -> (staged file, dtype, shape), or a dict of them
        self.formats: dict[str, str] = {}  # path -> how it is stored (recorded in the manifest)
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

    def add(self, path: str, array) -> None:
        """Adds one tensor (flashjax path; an array in any float dtype, or flashjax.quant.QuantizedRows
        read from a quantized checkpoint; shapes as ModelSource yields)."""
        if not is_ffn_on_disk(path):
            self._add_resident(path, array)
            return
        _, layer, _, leaf = path.split(".")
        layer, part = int(layer), leaf.removeprefix("w_")
        # Staged neuron-major, as the record lays it out: w_down's column i, biases as a column. The
        # down projection's blocks run along its input (the neurons) in a checkpoint and along the
        # output in a record (one neuron's column), so it is regrouped through float32.
        if part == "down":
            piece = _floats(array).T
        else:
            piece = array[:, None] if not isinstance(array, QuantizedRows) and array.ndim == 1 else array
        encoded = encode_part(self.layout, part, piece, storage_dtype(self.dtype))
        kind = self.layout.part_kind(part)
        if kind in ("q8", "q4"):
            stored = QuantizedRows.from_bytes(kind, encoded, self.layout.part_values(part))
            self._note_error(path, array, piece, stored, kept=isinstance(piece, QuantizedRows) and piece.kind == kind)
        np.ascontiguousarray(encoded).tofile(self._staged(layer, part))
        done = self.pending.setdefault(layer, set())
        done.add(part)
        if done == set(self.layout.names):
            self._write_staged(layer)

    def _add_resident(self, path: str, array) -> None:
        # Staged to disk too and memory-mapped back for the Orbax save, so that converting holds
        # one tensor in memory, not the resident third of the model.
        # (Raw bytes, not .npy: numpy's .npy has no bfloat16.)
        shape = tuple(array.shape)
        fmt = self.formats[path] = resident_format(path, shape, self.dtype)
        if fmt in ("q8", "q4"):
            kept = isinstance(array, QuantizedRows) and array.kind == fmt
            rows = array if kept else quantize(_floats(array), fmt)
            self._note_error(path, array, array, rows, kept)
            staged = {}
            for key, part in quantized_tree(rows).items():
                staged[key] = (os.path.join(self.staging, f"resident_{path}.{key}.bin"), part.dtype, part.shape)
                np.ascontiguousarray(part).tofile(staged[key][0])
            self.resident[path] = staged
            return
        staged = os.path.join(self.staging, f"resident_{path}.bin")
        np.ascontiguousarray(_floats(array), dtype=np.dtype(fmt)).tofile(staged)
        self.resident[path] = (staged, np.dtype(fmt), shape)

    def _note_error(self, path: str, source, compared, stored: QuantizedRows, kept: bool) -> None:
        """Records how far the stored values are from the source's (a GGUF's own dequantized values).
        `source` is the tensor as it arrived (it names its origin), `compared` the same values laid out
        as stored (the down projection is transposed); `kept`: copied code for code, whose error the
        reader measured already."""
        origin = (source.origin or source.kind) if isinstance(source, QuantizedRows) else "float"
        error = source.origin_error if kept else relative_rms_error(stored.dequantize(), _floats(compared))
        self.errors[path] = (origin, stored.kind, error)

    def add_records(self, layer: int, records: np.ndarray) -> None:
        """Adds a whole layer's records [d_ffn, record_width] (see Layout for the column order)."""
        want = (self.cfg.d_ffn, self.layout.record_width)
        if records.shape != want:
            raise ConvertError(f"layer {layer}: records of shape {records.shape}, expected {want}")
        self.layers[layer] = write_layer(self.tmp, layer, np.asarray(records, storage_dtype(self.dtype)),
                                         self.layout, self.dtype, self._expert_ffn)

    @property
    def _expert_ffn(self) -> int | None:
        return self.cfg.expert_ffn if self.cfg.is_moe else None

    def _staged(self, layer: int, part: str) -> str:
        return os.path.join(self.staging, f"layer_{layer:03d}_{part}.bin")

    def _write_staged(self, layer: int) -> None:
        np_dtype, f = storage_dtype(self.dtype), self.cfg.d_ffn
        records = np.empty((f, self.layout.record_width), np_dtype)
        for name, width in self.layout.parts:
            records[:, self.layout.part_slice(name)] = np.fromfile(self._staged(layer, name), np_dtype).reshape(f, width)
        self.layers[layer] = write_layer(self.tmp, layer, records, self.layout, self.dtype, self._expert_ffn)
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
        for path, staged in self.resident.items():
            if isinstance(staged, dict):  # a quantized matrix: {"values", "scales"[, "offsets"]}
                set_path(tree, path, {key: np.memmap(f, dtype=dtype, mode="r", shape=shape)
                                      for key, (f, dtype, shape) in staged.items()})
            else:
                f, dtype, shape = staged
                set_path(tree, path, np.memmap(f, dtype=dtype, mode="r", shape=shape))
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
                      "files": resident_files.files, "formats": self.formats},
            source={**self.source_info, **({"quantization": quantization_report(self.errors)} if self.errors else {})},
            tokenizer=self.tokenizer is not None)
        manifest.write(self.tmp)  # last: its presence marks a complete model
        _move_into_place(self.tmp, self.out_dir)
        return manifest


def _floats(array) -> np.ndarray:
    return array.dequantize() if isinstance(array, QuantizedRows) else np.asarray(array, np.float32)


def quantization_report(errors: dict[str, tuple[str, str, float]]) -> list[dict]:
    """Per kind of tensor (e.g. "attn.wq", over all layers) and source format: what it was stored as
    and the relative RMS error of the stored values against the source's (mean and max)."""
    groups: dict[tuple, list[float]] = {}
    for path, (origin, kind, error) in errors.items():
        leaf = ".".join(p for p in path.split(".") if not p.isdigit() and p != "layers")
        groups.setdefault((leaf, origin, kind), []).append(error)
    return [{"tensor": leaf, "from": origin, "stored": kind, "count": len(e), "mean_error": float(np.mean(e)),
             "max_error": float(np.max(e))} for (leaf, origin, kind), e in sorted(groups.items())]


def format_quantization_report(report: list[dict]) -> str:
    lines = ["tensor            from    stored  count  relative RMS error (mean / max)"]
    for r in report:
        lines.append(f"{r['tensor']:<17} {r['from']:<7} {r['stored']:<7} {r['count']:>5}  "
                     f"{r['mean_error']:.2e} / {r['max_error']:.2e}")
    return "\n".join(lines)


def convert(src_spec, out_dir, dtype: str = "float16", overwrite: bool = False, progress: bool = True,
            ffn_block: int | None = None, bundle: bool = True, quant: str | None = None) -> Manifest:
    """Converts `src_spec` (anything `--model` accepts, a flash directory too, or a ModelSource object
    such as a generator of synthetic weights) into a flash model directory `out_dir`; returns the
    manifest written.

    `dtype`: storage dtype of the FFN records and resident matrices ("float16", "bfloat16", "float32").
    `quant`: "q8" or "q4" instead (flashjax.quant): weights in 8- or 4-bit blocks with their scales;
    a GGUF's blocks that map onto the format are copied code for code, and the error of every stored
    tensor against the source's own values is reported (stderr, and the manifest's source entry).
    `ffn_block`: neurons per block (inner chunk); None: as many as fit in BLOCK_BYTES. `bundle=False`
    writes each projection as its own array (the "bundling off" baseline).
    """
    from flashjax.tokenizer import TokenizerError
    from flashjax.store.model import open_model_source
    from flashjax.weights.source import ModelSource

    if quant is not None:
        from flashjax.quant import check_kind
        dtype = check_kind(quant)
    source = src_spec if isinstance(src_spec, ModelSource) else open_model_source(src_spec)
    cfg = source.config
    on_disk = os.path.exists(source.path)  # generated sources name no file
    info = {"spec": source.path if isinstance(src_spec, ModelSource) else os.fspath(src_spec),
            "path": os.path.abspath(source.path) if on_disk else source.path, "fmt": source.fmt}
    # A record holds one neuron's column of w_down, while a checkpoint's blocks run along its rows
    # (32 neurons of one output): quantized there already, the column must be requantized, and at 4
    # bits the two roundings compound (the default model's perplexity rose 5.6%), so it gets 8 bits.
    down_quant = "q8" if quant == "q4" and source.fmt == "gguf" else None
    with FlashWriter(out_dir, cfg, dtype, ffn_block, bundle, overwrite, source.path if on_disk else None,
                     info, down_quant=down_quant) as writer:
        with tqdm(total=cfg.param_count(), unit="w", unit_scale=True, desc="converting", file=sys.stderr,
                  disable=not progress) as bar:
            for path, array in source.iter_tensors(quantized=quant is not None):
                writer.add(path, array)
                bar.update(int(np.prod(array.shape)))
        try:
            writer.tokenizer = source.tokenizer()
        except TokenizerError as e:
            print(f"flashjax convert: warning: no tokenizer written ({e})", file=sys.stderr)
    report = writer.manifest.source.get("quantization")
    if report and progress:
        print("flashjax convert: stored values against the source's\n" + format_quantization_report(report),
              file=sys.stderr)
    return writer.manifest
