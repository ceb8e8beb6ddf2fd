"""The manifest of a flash model directory: what is stored where, in which layout, with which checksums.

`manifest.json` is written last by the converter, so its presence marks a complete model. It holds:

- `format_version` (FORMAT_VERSION) and the `ModelConfig` as a plain dict (`model_config_from_dict`
  rebuilds the frozen dataclass exactly);
- `dtype`: the storage dtype of the FFN records and of the resident matrices ("float16", ...), or a
  quantization ("q8", "q4", see flashjax.quant): records are then bytes (`Layout.quant` says how
  each part is encoded) and `resident["formats"]` says how each resident tensor is held;
- `layout`: how a neuron's weights form one record (see `Layout`);
- `layers`: per layer, the zarr3 array(s) holding its records, with a checksum (`tree_checksum`);
- `resident`: where the Orbax checkpoint of the resident parameters lives, with its checksum;
- `source`: what the model was converted from; `tokenizer`: whether tokenizer files were written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import ml_dtypes
import numpy as np

from flashjax.config import ModelConfig
from flashjax.quant import KINDS as QUANT_KINDS
from flashjax.quant import row_bytes
from flashjax.weights.errors import CheckpointError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
STORAGE_DTYPES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                  "float32": np.dtype(np.float32)}
# Parameters that live in the FFN records on disk; everything else (b_down included) is resident.
FFN_ON_DISK = ("w_gate", "w_up", "w_down", "b_gate", "b_up")


class StoreChecksumError(CheckpointError):
    """A file of a flash model is missing, truncated or differs from the checksum in its manifest."""


def storage_dtype(name: str) -> np.dtype:
    """The dtype of a record's elements: the float storage dtype, or bytes for a quantized model."""
    if name in QUANT_KINDS:
        return np.dtype(np.uint8)
    if name not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype {name!r} is not supported; supported: "
                         f"{', '.join(STORAGE_DTYPES)} (or --quant {'/'.join(QUANT_KINDS)})")
    return STORAGE_DTYPES[name]


def is_quantized(storage: str) -> bool:
    return storage in QUANT_KINDS


def is_ffn_on_disk(path: str) -> bool:
    """True for parameter paths stored in the FFN records ("layers.3.ffn.w_up"), not resident."""
    parts = path.split(".")
    return len(parts) == 4 and parts[0] == "layers" and parts[2] == "ffn" and parts[3] in FFN_ON_DISK


def resident_dtype(shape: tuple[int, ...], storage: str) -> np.dtype:
    """Dtype a resident tensor is stored in: matrices in the storage dtype, vectors (norm scales and
    biases) in float32. Vectors are under 0.1% of the bytes and enter activations unscaled, so keeping
    them exact costs nothing."""
    return storage_dtype(storage) if len(shape) >= 2 else np.dtype(np.float32)


# -- the record layout --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one neuron's FFN weights form a record (a row of `record_width` values).

    `parts` lists the record's pieces in order, each (name, width in record elements): SwiGLU ("gate", d), ("up", d),
    ("down", d), then ("b_gate", 1), ("b_up", 1) when the FFN has biases (Llama with mlp_bias); ReLU/OPT
    ("up", d), ("down", d), then ("b_up", 1) when the FFN has biases. Row i of
    "gate"/"up" is row i of w_gate/w_up ([out, in] as in Hugging Face); "down" is column i of w_down.
    `bundle` is the part names when a layer's records are one array (row-column bundling), or None
    when each part is its own array (the "bundling off" baseline); reads return the same records
    either way. `ffn_block` neurons form one block, the inner chunk TensorStore reads: each array is
    stored as [n_blocks, ffn_block, width], record i at [i // ffn_block, i % ffn_block] (store.zarr_io).
    `quant` is empty for float records; for a quantized model it gives each part's encoding, (name,
    "q8" | "q4" | "float32"), and record elements are bytes: a quantized part holds the row's values,
    scales and offsets (flashjax.quant.QuantizedRows.to_bytes), a float32 part a bias.
    """

    parts: tuple[tuple[str, int], ...]
    bundle: tuple[str, ...] | None
    ffn_block: int
    quant: tuple[tuple[str, str], ...] = ()

    def part_kind(self, name: str) -> str | None:
        """How part `name` is encoded: None for float records (the storage dtype), else its quant entry."""
        return dict(self.quant).get(name) if self.quant else None

    @property
    def record_width(self) -> int:
        return sum(w for _, w in self.parts)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.parts)

    def part_values(self, name: str) -> int:
        """Values (not record elements) in part `name`: d_model for a weight row, 1 for a bias."""
        width = dict(self.parts)[name]
        kind = self.part_kind(name)
        if kind is None:
            return width
        if kind == "float32":
            return width // 4
        from flashjax.quant import GROUP
        return width * GROUP // row_bytes(kind, GROUP)

    def part_slice(self, name: str) -> slice:
        """Columns of a record holding part `name`."""
        start = 0
        for n, w in self.parts:
            if n == name:
                return slice(start, start + w)
            start += w
        raise KeyError(f"the record has no part {name!r} (parts: {', '.join(self.names)})")

    @classmethod
    def for_config(cls, cfg: ModelConfig, bundle: bool = True, ffn_block: int = 32, quant: str | None = None,
                   down_quant: str | None = None) -> "Layout":
        """`quant`: None (float records) or "q8"/"q4": the weight parts in that format (the down part in
        `down_quant` when given), biases float32."""
        d = cfg.d_model
        if cfg.is_glu:
            names = ("gate", "up", "down") + (("b_gate", "b_up") if cfg.ffn_bias else ())
        else:
            names = ("up", "down") + (("b_up",) if cfg.ffn_bias else ())
        if ffn_block < 1:
            raise ValueError(f"ffn_block must be at least 1, got {ffn_block}")
        def kind(n):
            return "float32" if n.startswith("b_") else (down_quant or quant) if n == "down" else quant

        kinds = () if quant is None else tuple((n, kind(n)) for n in names)
        if quant is None:
            parts = tuple((n, 1 if n.startswith("b_") else d) for n in names)
        else:
            parts = tuple((n, 4 if kind == "float32" else row_bytes(kind, d)) for n, kind in kinds)
        return cls(parts=parts, bundle=names if bundle else None, ffn_block=int(ffn_block), quant=kinds)

    def to_json(self) -> dict:
        return {"bundle": None if self.bundle is None else list(self.bundle), "record_width": self.record_width,
                "ffn_block": self.ffn_block, "parts": [[n, w] for n, w in self.parts],
                "quant": [[n, k] for n, k in self.quant]}

    @classmethod
    def from_json(cls, d: dict) -> "Layout":
        layout = cls(parts=tuple((n, int(w)) for n, w in d["parts"]),
                     bundle=None if d["bundle"] is None else tuple(d["bundle"]), ffn_block=int(d["ffn_block"]),
                     quant=tuple((n, k) for n, k in d.get("quant", [])))
        if layout.record_width != d["record_width"]:
            raise ValueError(f"record_width {d['record_width']} does not match the parts' widths {layout.parts}")
        return layout


def encode_part(layout: Layout, name: str, piece, dtype: np.dtype) -> np.ndarray:
    """One part of a layer's records [d_ffn, width] from its neuron-major piece [d_ffn, d] (or
    [d_ffn, 1] for a bias): in `dtype` for float records, else encoded as `layout.quant` says (a
    piece may arrive already quantized, as flashjax.quant.QuantizedRows, e.g. from a GGUF file)."""
    from flashjax.quant import QuantizedRows, quantize

    kind = layout.part_kind(name)
    if kind is None:
        return np.asarray(piece.dequantize() if isinstance(piece, QuantizedRows) else piece, dtype=dtype)
    if kind == "float32":
        return np.ascontiguousarray(piece, dtype="<f4").view(np.uint8)
    if not (isinstance(piece, QuantizedRows) and piece.kind == kind):
        piece = quantize(piece.dequantize() if isinstance(piece, QuantizedRows) else piece, kind)
    return piece.to_bytes()


def decode_part(layout: Layout, name: str, raw: np.ndarray) -> np.ndarray:
    """The inverse of `encode_part`, as float32 (quantized parts dequantized)."""
    from flashjax.quant import QuantizedRows

    kind = layout.part_kind(name)
    if kind is None:
        return raw
    if kind == "float32":
        return np.ascontiguousarray(raw).view("<f4").astype(np.float32)
    return QuantizedRows.from_bytes(kind, raw, layout.part_values(name)).dequantize()


def pack_records(layout: Layout, tensors: dict[str, np.ndarray], dtype: np.dtype) -> np.ndarray:
    """Builds a layer's records [d_ffn, record_width] from its w_gate/w_up/w_down/b_up tensors."""
    pieces = {"gate": lambda: tensors["w_gate"], "up": lambda: tensors["w_up"], "down": lambda: tensors["w_down"].T,
              "b_gate": lambda: tensors["b_gate"][:, None], "b_up": lambda: tensors["b_up"][:, None]}
    return np.concatenate([encode_part(layout, n, pieces[n](), dtype) for n in layout.names], axis=1)


def unpack_records(layout: Layout, records: np.ndarray) -> dict[str, np.ndarray]:
    """The inverse of `pack_records`: {"w_gate": [f, d], "w_up": [f, d], "w_down": [d, f], "b_up": [f], ...}
    (dequantized to float32 for a quantized model)."""
    out = {}
    for name in layout.names:
        piece = decode_part(layout, name, records[:, layout.part_slice(name)])
        if name == "down":
            out["w_down"] = np.ascontiguousarray(piece.T)
        elif name.startswith("b_"):
            out[name] = np.ascontiguousarray(piece[:, 0])
        else:
            out["w_" + name] = np.ascontiguousarray(piece)
    return out


# -- checksums ----------------------------------------------------------------------------------------


def tree_checksum(model_dir: str, rel_paths: list[str]) -> str:
    """sha256 of a set of files, named relative to `model_dir`.

    For each file, in sorted order of its relative path ('/'-separated): the UTF-8 path, a NUL byte,
    the file size in decimal ASCII, a NUL byte, then the file's bytes. Names and sizes are hashed too
    so that moving bytes between files or renaming one changes the checksum.
    """
    h = hashlib.sha256()
    for rel in sorted(rel_paths):
        full = os.path.join(model_dir, rel)
        h.update(rel.encode() + b"\0" + str(os.path.getsize(full)).encode() + b"\0")
        with open(full, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def list_files(model_dir: str, rel_dir: str) -> dict[str, int]:
    """Every file under `model_dir/rel_dir`: {relative path: size in bytes}."""
    out = {}
    root = os.path.join(model_dir, rel_dir)
    for dirpath, _, names in os.walk(root):
        for name in names:
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, model_dir).replace(os.sep, "/")] = os.path.getsize(full)
    return out


@dataclasses.dataclass(frozen=True)
class FileGroup:
    """A set of files checked together: one layer's arrays, or the resident checkpoint."""

    sha256: str
    files: dict  # relative path -> size in bytes

    @property
    def bytes(self) -> int:
        return sum(self.files.values())

    @classmethod
    def of(cls, model_dir: str, rel_dirs: list[str]) -> "FileGroup":
        files = {}
        for rel in rel_dirs:
            files.update(list_files(model_dir, rel))
        return cls(sha256=tree_checksum(model_dir, list(files)), files=files)

    def check(self, model_dir: str, what: str, full: bool = True) -> None:
        """Raises StoreChecksumError naming `what` and the file if one is missing, truncated or (when
        `full`) differs from the checksum."""
        for rel, size in sorted(self.files.items()):
            path = os.path.join(model_dir, rel)
            if not os.path.isfile(path):
                raise StoreChecksumError(f"{model_dir}: {what}: file {rel} is missing")
            actual = os.path.getsize(path)
            if actual != size:
                raise StoreChecksumError(f"{model_dir}: {what}: file {rel} is truncated or damaged "
                                         f"({actual} bytes, the manifest says {size})")
        if full and tree_checksum(model_dir, list(self.files)) != self.sha256:
            raise StoreChecksumError(f"{model_dir}: {what}: checksum mismatch in "
                                     f"{', '.join(sorted(self.files))} (the files were modified or corrupted)")


@dataclasses.dataclass(frozen=True)
class LayerEntry:
    """One layer's records on disk: its array(s) ({part or "bundle": relative path}) and their checksum."""

    arrays: dict
    checksum: FileGroup
    # A mixture of experts: sha256 of each expert's records (its rows of every array, as stored), so
    # a damaged layer is reported by expert too.
    expert_sha256: tuple[str, ...] | None = None

    @property
    def path(self) -> str | None:
        return self.arrays.get("bundle")

    def to_json(self) -> dict:
        out = {"path": self.path, "arrays": self.arrays, "sha256": self.checksum.sha256,
               "bytes": self.checksum.bytes, "files": self.checksum.files}
        if self.expert_sha256 is not None:
            out["expert_sha256"] = list(self.expert_sha256)
        return out

    @classmethod
    def from_json(cls, d: dict) -> "LayerEntry":
        experts = d.get("expert_sha256")
        return cls(arrays=dict(d["arrays"]), checksum=FileGroup(d["sha256"], dict(d["files"])),
                   expert_sha256=None if experts is None else tuple(experts))


# -- the manifest -------------------------------------------------------------------------------------


def model_config_to_dict(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def model_config_from_dict(d: dict) -> ModelConfig:
    """Rebuilds a ModelConfig from `dataclasses.asdict` output that went through JSON (lists -> tuples)."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(d) - fields
    if unknown:
        raise ValueError(f"unknown ModelConfig fields: {', '.join(sorted(unknown))}")

    def freeze(v):
        return tuple(freeze(x) for x in v) if isinstance(v, list) else v

    return ModelConfig(**{k: freeze(v) for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class Manifest:
    config: ModelConfig
    dtype: str
    layout: Layout
    layers: tuple[LayerEntry, ...]
    resident: dict  # {"path": "resident", "sha256", "bytes", "files"}
    source: dict
    tokenizer: bool
    format_version: int = FORMAT_VERSION

    @property
    def np_dtype(self) -> np.dtype:
        return storage_dtype(self.dtype)

    @property
    def resident_files(self) -> FileGroup:
        return FileGroup(self.resident["sha256"], dict(self.resident["files"]))

    def to_json(self) -> dict:
        return {"format_version": self.format_version, "config": model_config_to_dict(self.config),
                "dtype": self.dtype, "layout": self.layout.to_json(),
                "layers": [e.to_json() for e in self.layers], "resident": self.resident,
                "source": self.source, "tokenizer": self.tokenizer}

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        return cls(config=model_config_from_dict(d["config"]), dtype=d["dtype"],
                   layout=Layout.from_json(d["layout"]),
                   layers=tuple(LayerEntry.from_json(e) for e in d["layers"]), resident=d["resident"],
                   source=d.get("source", {}), tokenizer=bool(d.get("tokenizer")),
                   format_version=d["format_version"])

    def write(self, model_dir: str) -> None:
        path = os.path.join(model_dir, MANIFEST_NAME)
        with open(path + ".tmp", "w") as f:
            json.dump(self.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)


def is_flash_dir(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST_NAME))


def read_manifest(model_dir: str | os.PathLike) -> Manifest:
    """Reads and validates `manifest.json`; raises CheckpointError naming the file on any problem."""
    path = os.path.join(os.fspath(model_dir), MANIFEST_NAME)
    try:
        with open(path) as f:
            raw: Any = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found (not a flash model directory, or an "
                              f"interrupted conversion)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {version!r} is not supported (this flashjax reads "
                              f"version {FORMAT_VERSION}); convert the model again")
    try:
        manifest = Manifest.from_json(raw)
        storage_dtype(manifest.dtype)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None
    if len(manifest.layers) != manifest.config.n_layers:
        raise CheckpointError(f"{path}: {len(manifest.layers)} layer entries for a model of "
                              f"{manifest.config.n_layers} layers")
    return manifest
