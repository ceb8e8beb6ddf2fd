"""Opening a flash model directory: for the flash engine (`open_flash_model`) and as an ordinary
ModelSource (`open_flash_source`, what `open_model_source` returns for such a directory), so a converted
model loads with `--model DIR` everywhere, the dense engine included.

`open_model_source` opens whatever `--model` names: a converted directory here, a checkpoint (built-in
name, Hugging Face directory, GGUF file) through flashjax.weights. It lives here because the flash format
builds on the checkpoint readers: flashjax.store imports flashjax.weights, never the reverse."""

from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np

from flashjax.config import ModelConfig
from flashjax.store.ffn_store import FFNStore, verify_files
from flashjax.store.manifest import Manifest, is_flash_dir, is_quantized, read_manifest, unpack_records
from flashjax.store.resident import (load_resident, load_resident_numpy, manifest_formats, resident_nbytes,
                                    resident_paths)
from flashjax.weights.source import BUILTIN_MODELS, ModelSource, open_checkpoint


def part_weights(layout, name: str, raw: np.ndarray, dtype=None):
    """One part of a layer's records [N, width], as the engine holds it in memory: a quantized part
    as a QuantizedMatrix (never a float copy), a bias as float32 [N], a float part as stored (or
    converted to `dtype`)."""
    import jax.numpy as jnp

    from flashjax.quant import QuantizedMatrix, QuantizedRows
    from flashjax.store.manifest import decode_part

    kind = layout.part_kind(name)
    if kind in ("q8", "q4"):
        return QuantizedMatrix.from_rows(QuantizedRows.from_bytes(kind, raw, layout.part_values(name)))
    if name.startswith("b_"):
        return jnp.asarray(decode_part(layout, name, raw)[:, 0], jnp.float32)
    return jnp.asarray(raw, dtype)


def _tokenizer_factory(model_dir: str):
    def tokenizer():
        from flashjax.tokenizer import Tokenizer
        return Tokenizer.from_hf_dir(model_dir)
    return tokenizer


@dataclasses.dataclass
class FlashModel:
    """A flash model directory, opened: its manifest, and the means to load what the engine needs."""

    path: str
    manifest: Manifest

    @property
    def config(self) -> ModelConfig:
        return self.manifest.config

    def ffn_store(self, concurrency: int = 32) -> FFNStore:
        return FFNStore(self.path, self.manifest, concurrency=concurrency)

    def load_resident(self, dtype=None) -> dict:
        """Resident parameters as jax arrays of `dtype` in `empty_tree`'s layout (see store.resident)."""
        return load_resident(self.path, dtype, self.manifest)

    def resident_nbytes(self, dtype) -> int:
        """What `load_resident(dtype)` will hold, in bytes, without loading it."""
        return resident_nbytes(self.config, manifest_formats(self.manifest), dtype)

    def tokenizer(self):
        return _tokenizer_factory(self.path)()

    @property
    def quantized(self) -> bool:
        return is_quantized(self.manifest.dtype)

    def stored_weight_bytes(self) -> int:
        """Every weight as stored: the resident tensors and the FFN records (what a budget's "50%" is
        a share of)."""
        layout = self.manifest.layout
        records = self.config.n_layers * self.config.d_ffn * layout.record_width * self.manifest.np_dtype.itemsize
        return self.resident_nbytes("stored") + records

    def load_quantized_params(self) -> dict:
        """Every weight in memory as stored, for the dense engine on a quantized model: the resident
        tree, and each layer's FFN from its records as quantized matrices {"w_up", "w_gate",
        "down_rows" (neuron-major, as the records hold it), "b_up", "b_gate", "b_down"}."""
        params = self.load_resident("stored")
        layout, store = self.manifest.layout, self.ffn_store()
        for layer in range(self.config.n_layers):
            records = store.read_layer(layer)
            ffn = params["layers"][layer]["ffn"]
            for name in layout.names:
                held = part_weights(layout, name, records[:, layout.part_slice(name)])
                ffn[name if name.startswith("b_") else "down_rows" if name == "down" else "w_" + name] = held
        return params


def open_flash_model(model_dir, verify: bool = True) -> FlashModel:
    """Opens a converted model; with `verify`, checks every layer's and the resident checkpoint's
    sha256 first (StoreChecksumError names the layer and file that differ)."""
    path = os.path.abspath(os.fspath(model_dir))
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    return FlashModel(path, manifest)


class FlashModelSource(ModelSource):
    """A flash model directory as a ModelSource: the same (path, float32 array) pairs as the model it
    was converted from (cast through the storage dtype), FFN weights un-bundled from the records.
    Resident tensors come first, then each layer's FFN tensors."""

    def iter_tensors(self, quantized: bool = False) -> Iterator[tuple[str, np.ndarray]]:
        """(path, float32 array) pairs; a quantized model's weights dequantized (`quantized` is
        accepted for the ModelSource interface: a converted model is re-read as floats)."""
        from flashjax.quant import QuantizedRows

        manifest: Manifest = self._files["manifest"]
        cfg = manifest.config
        resident = load_resident_numpy(self.path, cfg, manifest_formats(manifest))
        for path in resident_paths(cfg):
            node = resident
            for part in path.split("."):
                node = node[int(part)] if part.isdigit() else node[part]
            yield path, node.dequantize() if isinstance(node, QuantizedRows) else np.asarray(node, dtype=np.float32)
        del resident
        store = FFNStore(self.path, manifest)
        for layer in range(cfg.n_layers):
            for leaf, array in unpack_records(manifest.layout, store.read_layer(layer)).items():
                yield f"layers.{layer}.ffn.{leaf}", np.asarray(array, dtype=np.float32)


def open_flash_source(model_dir, verify: bool = True) -> FlashModelSource:
    model = open_flash_model(model_dir, verify=verify)
    return FlashModelSource(model.path, "flash", model.config, {"manifest": model.manifest},
                            _tokenizer_factory(model.path))


def open_model_source(spec) -> ModelSource:
    """Opens whatever `--model` names (see the README for the accepted forms): a directory written by
    `flashjax convert` (as a FlashModelSource), else a checkpoint (`flashjax.weights.open_checkpoint`)."""
    spec = os.fspath(spec)
    if spec not in BUILTIN_MODELS and is_flash_dir(spec):  # a built-in name first, as a checkpoint
        return open_flash_source(spec)
    return open_checkpoint(spec)
