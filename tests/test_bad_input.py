"""Bad input gets a clear error naming the file and tensor, and nothing is modified."""

import json
import re
import os
import shutil

import pytest

from conftest import build_tiny
from flashjax.config import UnsupportedModelError
from flashjax.model.params import load_params
from flashjax.store import open_model_source
from flashjax.weights import CheckpointError


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
    with pytest.raises(UnsupportedModelError, match="gpt_neox.*supported: llama, mistral, qwen2, qwen3, gemma3_text, phi3, opt"):
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


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("args,message", [
    (["--max-tokens", "-5"], "max_tokens must be at least 1, got -5"),
    (["--max-tokens", "0"], "max_tokens must be at least 1, got 0"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--top-p", "5"], r"top_p must be in \(0, 1\]"),
    (["--top-k", "-2"], "top_k must be >= 0"),
    (["--seed", "-1"], r"seed must be in \[0, 2\*\*32\)"),
    (["--max-context", "0"], "max_context must be an integer of at least 2"),
])
def test_bad_generation_arguments_fail_before_any_weight_is_read(command, args, message, tmp_path, capsys):
    """The model path does not exist: the argument's own error (not the missing model's) proves the
    check ran before anything was opened; one line, exit status 2, no traceback."""
    from flashjax.cli import main

    missing = str(tmp_path / "no-model-here")
    assert main([command, "--model", missing, "--prompt", "hi", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("flashjax: error: ")
    assert re.search(message, err), err
    assert missing not in err


@pytest.mark.parametrize("args,message", [
    (["--context", "1"], "context must be at least 2"), (["--stride", "0"], "stride must be between"),
    (["--max-tokens", "1"], "max_tokens must be at least 2")])
def test_bad_eval_arguments_fail_before_any_weight_is_read(args, message, tmp_path, capsys):
    from flashjax.cli import main

    text = tmp_path / "text.txt"
    text.write_text("some words to score")
    assert main(["eval", "ppl", "--model", str(tmp_path / "no-model-here"), "--text", str(text), *args]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_python_api_checks_the_same_arguments(tiny_dir):
    import flashjax
    from flashjax.sampling import SamplingParams

    llm = flashjax.load(str(tiny_dir), progress=False)
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        llm.generate_ids([1, 2, 3], max_tokens=-5)
    with pytest.raises(ValueError, match="max_tokens must be an integer"):
        llm.generate_ids([1, 2, 3], max_tokens=2.5)
    with pytest.raises(ValueError, match="top_k must be an integer"):
        SamplingParams(top_k="3")
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        SamplingParams(temperature=float("inf"))
    # Nothing was started: the engine still generates after the refusals.
    assert len(list(llm.generate_ids([1, 2, 3], max_tokens=3, stop_at_eos=False))) == 3
