"""`--model ORG/NAME` and `ORG/NAME:FILE.gguf` through huggingface_hub (flashjax/hf_hub.py).

No outside network is used: most tests lay out a real Hugging Face cache in tmp_path, as huggingface_hub
writes it (models--ORG--NAME/refs/<revision> holding a commit hash, snapshots/<commit>/<file> as relative
symlinks into blobs/), and point HF_HUB_CACHE at it with HF_HUB_OFFLINE=1. In-process tests also patch
huggingface_hub.constants (read at import) and fail if anything opens a socket; the end-to-end tests run
`python -m flashjax ...` in a subprocess with the environment set. The download path is huggingface_hub's
own and is not faked here: with no network, the tests check only that an unreachable Hub is a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import types

import numpy as np
import pytest
from conftest import build_tiny
from test_gguf_parity import CASES, write_gguf

from flashjax.hf_hub import HubSpec, parse_hub_spec
from flashjax.weights import CheckpointError, open_checkpoint

REPO = "tiny-org/tiny-llama"
GGUF_REPO = "tiny-org/tiny-llama-GGUF"
GGUF_NAME = "tiny-llama-f32.gguf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
IDS = [1, 5, 9, 17, 33, 64, 2, 100, 7, 3, 40, 41]
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "then", "one", "hid", "under", "an",
         "old", "log"]


def put_in_cache(cache: pathlib.Path, repo_id: str, files: dict, revision: str = "main",
                 commit: str = COMMIT) -> pathlib.Path:
    """Lays out `files` (path in the repository -> local file) as huggingface_hub's cache holds a
    download of `repo_id` at `commit`; returns the snapshot directory."""
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    for name, src in files.items():
        data = pathlib.Path(src).read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(parents=True, exist_ok=True)
    (storage / "refs" / revision).write_text(commit)  # no newline: huggingface_hub reads it verbatim
    return snapshot


def _write_tokenizer(directory: pathlib.Path) -> None:
    """A tiny byte-level BPE whose whole vocabulary fits the tiny model's 128 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    rng = np.random.RandomState(0)
    tok.train_from_iterator([" ".join(rng.choice(WORDS, 200)) for _ in range(10)],
                            trainers.BpeTrainer(vocab_size=60, special_tokens=["<|endoftext|>"],
                                                show_progress=False))
    assert tok.get_vocab_size() <= 128
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama as a Hugging Face directory (with a tokenizer) and as a GGUF file."""
    src = tmp_path_factory.mktemp("tiny-src")
    model = build_tiny("llama_gqa", src)
    _write_tokenizer(src)
    gguf = tmp_path_factory.mktemp("tiny-gguf") / GGUF_NAME
    write_gguf(model, gguf, CASES["llama_gqa"])
    files = {p.name: p for p in sorted(src.iterdir()) if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    return types.SimpleNamespace(dir=src, gguf=gguf, files=files)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, HF_HUB_OFFLINE=1, and no socket may be opened."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("test_hf_hub: no network in these tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    yield cache
    assert not attempts, f"a network call was attempted: {attempts}"


def _env(cache: pathlib.Path, **extra) -> dict:
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    env["PYTHONPATH"] = os.pathsep.join([str(pathlib.Path(__file__).resolve().parent.parent),
                                         env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _logits(spec) -> np.ndarray:
    import flashjax
    return np.asarray(flashjax.load(str(spec)).logits(IDS))


# -- what looks like a hub id ---------------------------------------------------------------------------


@pytest.mark.parametrize("spec, want", [
    ("Qwen/Qwen3-0.6B", HubSpec("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B", None, None)),
    ("Qwen/Qwen2.5-0.5B-Instruct@v1.0", HubSpec("Qwen/Qwen2.5-0.5B-Instruct@v1.0", "Qwen/Qwen2.5-0.5B-Instruct",
                                                "v1.0", None)),
    ("org/repo-GGUF:model-Q4_K_M.gguf", HubSpec("org/repo-GGUF:model-Q4_K_M.gguf", "org/repo-GGUF", None,
                                                "model-Q4_K_M.gguf")),
    (f"org/repo@{COMMIT}:Q4/model.GGUF", HubSpec(f"org/repo@{COMMIT}:Q4/model.GGUF", "org/repo", COMMIT,
                                                 "Q4/model.GGUF")),
    ("smollm2", None), ("./org/name", None), ("/org/name", None), ("~/org/name", None), (".org/name", None),
    ("org/name/sub", None), ("org/", None), ("/abs/model.gguf", None), ("models/tiny.gguf", None),
    ("C:/models/x", None), ("org/na me", None),
])
def test_parse_hub_spec(spec, want):
    assert parse_hub_spec(spec) == want


def test_a_file_after_the_colon_must_be_a_gguf():
    with pytest.raises(CheckpointError, match="org/repo:Q4_K_M: after ':' comes the name of a .gguf file"):
        parse_hub_spec("org/repo:Q4_K_M")


# -- a safetensors repository ---------------------------------------------------------------------------


def test_repo_id_loads_from_the_cache_like_its_directory(hub, tiny):
    snapshot = put_in_cache(hub, REPO, tiny.files)
    source = open_checkpoint(REPO)
    assert (source.fmt, source.path) == ("hf", str(snapshot))
    np.testing.assert_array_equal(_logits(REPO), _logits(tiny.dir))
    # Through flashjax.store too (what LLM.load and convert call), the tokenizer included.
    from flashjax.store import open_model_source
    assert open_model_source(REPO).tokenizer().encode("the lazy dog") == \
        open_model_source(tiny.dir).tokenizer().encode("the lazy dog")


def test_sharded_repo_loads_from_the_cache(hub, tiny):
    """model.safetensors.index.json and its shards, as large repositories ship (two shards here)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(tiny.dir / "model.safetensors"))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    out = hub.parent / "sharded"
    out.mkdir()
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, str(out / shard), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: shard for shard, members in shards.items() for n in members}}))
    files = {n: p for n, p in tiny.files.items() if n != "model.safetensors"}
    files.update({p.name: p for p in out.iterdir()})
    put_in_cache(hub, REPO, files)
    np.testing.assert_array_equal(_logits(REPO), _logits(tiny.dir))


def test_generate_cli_end_to_end(tiny, tmp_path):
    """`python -m flashjax generate --model ORG/NAME --json`, offline, from the cache: the same tokens as
    the model's own directory."""
    import flashjax

    cache = tmp_path / "hf-cache"
    put_in_cache(cache, REPO, tiny.files)
    cmd = [sys.executable, "-m", "flashjax", "generate", "--model", REPO, "--prompt", "the quick brown",
           "--max-tokens", "6", "--json"]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=tmp_path, env=_env(cache), timeout=300)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    want = flashjax.load(str(tiny.dir)).generate("the quick brown", max_tokens=6)
    assert (got["prompt_tokens"], got["tokens"], got["text"]) == (want.prompt_tokens, want.tokens, want.text)


def test_revision(hub, tiny):
    tagged = put_in_cache(hub, REPO, tiny.files, revision="v1.0", commit=OTHER_COMMIT)
    assert open_checkpoint(f"{REPO}@v1.0").path == str(tagged)
    assert open_checkpoint(f"{REPO}@{OTHER_COMMIT}").path == str(tagged)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE"):  # no refs/main: the default branch is not cached
        open_checkpoint(REPO)
    with pytest.raises(CheckpointError, match=r"revision v2\.0"):
        open_checkpoint(f"{REPO}@v2.0")


# -- one GGUF file of a repository ----------------------------------------------------------------------


def test_gguf_file_of_a_repo_loads_from_the_cache(hub, tiny):
    put_in_cache(hub, GGUF_REPO, {GGUF_NAME: tiny.gguf, f"F32/{GGUF_NAME}": tiny.gguf, "README.md": tiny.gguf})
    want = _logits(tiny.gguf)
    for name in (GGUF_NAME, f"F32/{GGUF_NAME}"):
        source = open_checkpoint(f"{GGUF_REPO}:{name}")
        assert source.fmt == "gguf" and source.path.endswith(name)
        np.testing.assert_array_equal(_logits(f"{GGUF_REPO}:{name}"), want)


def test_gguf_file_not_in_the_cache(hub, tiny):
    put_in_cache(hub, GGUF_REPO, {GGUF_NAME: tiny.gguf})
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(f"{GGUF_REPO}:other-Q4_K_M.gguf")
    assert all(s in str(e.value) for s in (f"{GGUF_REPO}:other-Q4_K_M.gguf", str(hub), "HF_HUB_OFFLINE"))


def test_gguf_repo_named_without_a_file_points_at_its_files(hub, tiny):
    put_in_cache(hub, GGUF_REPO, {GGUF_NAME: tiny.gguf})
    with pytest.raises(CheckpointError, match=f"lacks config.json, model.safetensors.*name one as "
                                              f"{GGUF_REPO}:{GGUF_NAME}"):
        open_checkpoint(GGUF_REPO)


# -- convert ---------------------------------------------------------------------------------------------


def test_convert_from_the_cache(hub, tiny, tmp_path, capsys):
    from flashjax import cli

    put_in_cache(hub, REPO, tiny.files)
    out = tmp_path / "converted"
    assert cli.main(["convert", REPO, str(out), "--dtype", "float32", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert REPO in json.dumps(manifest)  # the source is recorded as the user named it
    np.testing.assert_allclose(_logits(out), _logits(tiny.dir), rtol=1e-5, atol=1e-5)


# -- errors ------------------------------------------------------------------------------------------------


def test_offline_and_not_cached_names_the_id_and_the_cache(hub, capsys):
    for spec in ("tiny-org/absent", f"tiny-org/absent:{GGUF_NAME}"):
        with pytest.raises(CheckpointError) as e:
            open_checkpoint(spec)
        message = str(e.value)
        assert message.startswith(f"{spec}: ") and str(hub) in message and "Unset HF_HUB_OFFLINE" in message
    from flashjax import cli  # the CLI: one line, exit status 2
    assert cli.main(["generate", "--model", "tiny-org/absent", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flashjax: error: tiny-org/absent: ") and str(hub) in err and "\n" not in err


def test_offline_set_after_huggingface_hub_was_imported(hub, monkeypatch):
    """HF_HUB_OFFLINE set in the environment after huggingface_hub read its constants still keeps
    flashjax off the network (the socket guard of `hub` fails the test otherwise)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set"):
        open_checkpoint("tiny-org/absent")


def test_missing_files_of_a_cached_repo_are_named(hub, tiny):
    no_config = {n: p for n, p in tiny.files.items() if n != "config.json"}
    snapshot = put_in_cache(hub, REPO, no_config)
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(REPO)
    assert all(s in str(e.value) for s in (REPO, str(snapshot), "lacks config.json", "HF_HUB_OFFLINE"))

    # An index naming a shard the cache does not hold.
    index = hub.parent / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    put_in_cache(hub, "tiny-org/sharded", {"config.json": tiny.files["config.json"], index.name: index,
                                           "model-00001-of-00002.safetensors": tiny.files["model.safetensors"]})
    with pytest.raises(CheckpointError, match=r"lacks model-00002-of-00002\.safetensors"):
        open_checkpoint("tiny-org/sharded")


def test_hub_unreachable_gives_a_clear_error(tiny, tmp_path):
    """Online (HF_HUB_OFFLINE unset) with the Hub unreachable: a closed local port as HF_ENDPOINT."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again on leaving: connections to it are refused at once
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    code = "from flashjax.weights import open_checkpoint; open_checkpoint('tiny-org/absent')"
    env = _env(cache, HF_HUB_OFFLINE="0", HF_ENDPOINT=f"http://127.0.0.1:{port}")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "CheckpointError: tiny-org/absent:" in last and str(cache) in last and "could not be reached" in last


def test_a_local_directory_named_like_an_id_wins(hub, tiny, tmp_path, monkeypatch):
    # The cached copy is unusable (no config.json): were it read, this would fail.
    put_in_cache(hub, REPO, {n: p for n, p in tiny.files.items() if n != "config.json"})
    work = tmp_path / "work"
    shutil.copytree(tiny.dir, work / REPO)
    monkeypatch.chdir(work)
    source = open_checkpoint(REPO)
    assert (source.fmt, source.path) == ("hf", REPO)
    np.testing.assert_array_equal(_logits(REPO), _logits(tiny.dir))


def test_plain_missing_paths_are_not_hub_ids(hub, tmp_path):
    with pytest.raises(CheckpointError, match="no such model.*Hugging Face Hub id"):
        open_checkpoint(str(tmp_path / "nothing-here"))
    with pytest.raises(CheckpointError, match="no such model"):
        open_checkpoint("not-a-model")
