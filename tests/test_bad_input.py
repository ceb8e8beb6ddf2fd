"""Bad input gets a clear error naming the file and tensor, and nothing is modified."""

import json
import os
import shutil

import pytest

from conftest import build_tiny
from flashjax.config import UnsupportedModelError
from flashjax.model.params import load_params
from flashjax.weights import CheckpointError, open_model_source


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    build_tiny("llama_gqa", directory)
    return directory


def _copy(src, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def _load(path):
    return load_params(open_model_source(path), progress=False)


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no such model"):
        open_model_source(str(tmp_path / "nothing-here"))
    with pytest.raises(CheckpointError, match="missing.gguf: file not found"):
        open_model_source(str(tmp_path / "missing.gguf"))


def test_missing_config_and_weights_are_named(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    os.remove(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_model_source(d)
    os.remove(d / "config.json")
    with pytest.raises(CheckpointError, match="config.json: file not found"):
        open_model_source(d)


def test_missing_shard_of_a_sharded_checkpoint(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    index = {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: file not found"):
        open_model_source(d)


def test_truncated_safetensors_names_file_and_tensor(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    path = d / "model.safetensors"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated file: tensor '[\w.]+'"):
        _load(d)
    with open(path, "r+b") as f:
        f.truncate(4)
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        open_model_source(d)


def test_source_is_not_modified_by_loading(tiny_dir):
    before = {p.name: p.read_bytes() for p in tiny_dir.iterdir()}
    _load(tiny_dir)
    assert {p.name: p.read_bytes() for p in tiny_dir.iterdir()} == before


def test_wrong_shape_names_tensor(tiny_dir, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_dir, tmp_path)
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(7, 48)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(7, 48\)"):
        _load(d)


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy(tiny_dir, tmp_path)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' is missing"):
        _load(d)


def test_unknown_architecture_lists_supported(tiny_dir, tmp_path):
    d = _copy(tiny_dir, tmp_path)
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="gpt_neox.*supported: llama, mistral, qwen2, opt"):
        open_model_source(d)


@pytest.mark.slow
def test_truncated_gguf_names_file_and_tensor(default_gguf, tmp_path):
    path = tmp_path / "cut.gguf"
    with open(default_gguf, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read(60_000_000))
    with pytest.raises(CheckpointError, match=r"cut\.gguf: .*(truncated|not a readable GGUF)"):
        open_model_source(path)


def test_gguf_with_unsupported_architecture(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "other.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*supported"):
        open_model_source(path)
