"""Opening a checkpoint: a built-in name, a Hugging Face directory or a GGUF file, as a ModelSource.

A directory written by `flashjax convert` is a ModelSource too, but the flash format belongs to
flashjax.store, which builds on this package (never the reverse): `flashjax.store.open_model_source`
opens whatever `--model` names, converted models included, and hands checkpoints to `open_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Iterator

import numpy as np

from flashjax.config import ModelConfig
from flashjax.weights.errors import CheckpointError
from flashjax.weights.gguf_reader import GGUFFile
from flashjax.weights.mapping import expected_shape, tensor_plan
from flashjax.weights.safetensors_reader import SafetensorsFile


@dataclasses.dataclass
class ModelSource:
    """A checkpoint on disk: its config, where each tensor lives, and its tokenizer."""

    path: str
    fmt: str  # "hf" | "gguf" | "flash"
    config: ModelConfig
    _files: dict  # checkpoint tensor name -> reader holding it
    _tokenizer_factory: Callable

    def tokenizer(self):
        return self._tokenizer_factory()

    def iter_tensors(self, quantized: bool = False) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (flashjax path, float32 array) one tensor at a time, shape-checked. With `quantized`,
        a GGUF tensor whose blocks map onto flashjax's formats comes as flashjax.quant.QuantizedRows
        instead (its codes as stored: see weights/gguf_blocks.py)."""
        for path, name, hook in tensor_plan(self.config, self.fmt):
            if isinstance(name, tuple):  # a mixture of experts' per-expert tensors, joined by the hook
                parts = [self._reader(part).read(part) for part in name]
                # (named in errors by expert 0's name with {e} for the expert, not the layer, index)
                array, reader = hook(parts), self._reader(name[0])
                name = name[0].replace(".experts.0.", ".experts.{e}.")
                self._check_shape(path, name, reader, array)
                yield path, np.asarray(array, dtype=np.float32)
                continue
            reader = self._reader(name)
            rows = reader.read_quantized(name) if quantized and hasattr(reader, "read_quantized") else None
            array = reader.read(name) if rows is None else rows
            if hook is not None:
                # A row permutation (the q/k heads' rotary layout): quantized rows move whole.
                array = hook(array) if rows is None else dataclasses.replace(
                    rows, values=hook(rows.values), scales=hook(rows.scales),
                    offsets=None if rows.offsets is None else hook(rows.offsets))
            self._check_shape(path, name, reader, array)
            yield path, array if rows is not None else np.asarray(array, dtype=np.float32)

    def _reader(self, name: str):
        reader = self._files.get(name)
        if reader is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing from the checkpoint")
        return reader

    def _check_shape(self, path: str, name: str, reader, array) -> None:
        want = expected_shape(self.config, path)
        if tuple(array.shape) != want:
            raise CheckpointError(f"{reader.path}: tensor {name!r} has shape {tuple(array.shape)}, "
                                  f"expected {want} for this model's config")


def open_checkpoint(spec: str | os.PathLike) -> ModelSource:
    """Opens a checkpoint: a built-in name (fetched once), a Hugging Face directory or a GGUF file.
    A converted (flash format) directory is refused: `flashjax.store.open_model_source` opens it."""
    spec = os.fspath(spec)
    if spec in BUILTIN_MODELS:
        from flashjax.hub import default_model_path
        spec = str(default_model_path(spec))
    elif not os.path.exists(spec):  # a local path wins over the Hugging Face Hub id of the same name
        from flashjax.hf_hub import resolve_hub_spec
        spec = resolve_hub_spec(spec) or spec  # ORG/NAME[@REV][:FILE.gguf]: its files in the HF cache
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, FLASH_MANIFEST)):
        raise CheckpointError(f"{spec} is a model converted by `flashjax convert`, not a checkpoint: open it with "
                              f"flashjax.store.open_model_source (or flashjax.load)")
    if os.path.isdir(spec):
        return _open_hf_dir(spec)
    if spec.endswith(".gguf") or os.path.isfile(spec):
        return _open_gguf(spec)
    raise CheckpointError(f"{spec}: no such model. --model takes a built-in name ({', '.join(BUILTIN_MODELS)}), "
                          f"a Hugging Face model directory, a .gguf file, or a Hugging Face Hub id "
                          f"(ORG/NAME, ORG/NAME:FILE.gguf)")


BUILTIN_MODELS = ("smollm2", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m")
FLASH_MANIFEST = "manifest.json"  # what marks a converted model directory (flashjax.store.manifest.MANIFEST_NAME)


def _open_gguf(path: str) -> ModelSource:
    gguf_file = GGUFFile(path)
    cfg = gguf_file.model_config()

    def tokenizer():
        from flashjax.tokenizer import Tokenizer
        return Tokenizer.from_gguf(path)

    return ModelSource(path, "gguf", cfg, {n: gguf_file for n in gguf_file.names()}, tokenizer)


def _open_hf_dir(path: str) -> ModelSource:
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{config_path}: file not found (a Hugging Face model directory needs config.json)")
    with open(config_path) as f:
        try:
            hf_config = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None
    cfg = ModelConfig.from_hf_config(hf_config, source=config_path)
    files = {}
    index_path = os.path.join(path, "model.safetensors.index.json")
    single_path = os.path.join(path, "model.safetensors")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        opened = {}
        for name, shard in weight_map.items():
            if shard not in opened:
                opened[shard] = SafetensorsFile(os.path.join(path, shard))
            files[name] = opened[shard]
    elif os.path.isfile(single_path):
        st = SafetensorsFile(single_path)
        files = {n: st for n in st.names()}
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json "
                              f"(only safetensors checkpoints are supported)")
    # Some OPT checkpoints name tensors without the leading "model." prefix; Gemma 3's image-text
    # checkpoints hold the language model under language_model (transformers' two spellings).
    prefixes = {"opt": (("decoder.", "model.decoder."),),
                "gemma3": (("language_model.model.", "model."), ("model.language_model.", "model."),
                           ("language_model.lm_head.", "lm_head."))}.get(cfg.architecture, ())
    for name in list(files):
        for prefix, ours in prefixes:
            if name.startswith(prefix):
                alias = ours + name[len(prefix):]
                files[alias] = files[name]
                files[alias].add_alias(alias, name)

    def tokenizer():
        from flashjax.tokenizer import Tokenizer
        return Tokenizer.from_hf_dir(path)

    return ModelSource(path, "hf", cfg, files, tokenizer)
