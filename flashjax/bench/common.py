"""Helpers shared by the benchmarks: machine description, prompt text, robust summaries, JSON output."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import platform
import statistics
import sys

PROMPT_CHARS = 20000  # the first characters of a prompt text file are enough for any prompt length used here


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def machine() -> dict:
    import psutil

    info = {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "ram_bytes": psutil.virtual_memory().total,
            "processor": platform.processor()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu_model"] = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import jax
        info["jax"] = jax.__version__
        info["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception:
        pass
    return info


def prompt_text(path: str | os.PathLike | None = None) -> str:
    """The text prompts are cut from: the first characters of the file at `path`, or, without one, the
    package's own prose (flashjax.bench.text)."""
    if path:
        return pathlib.Path(path).read_text(encoding="utf-8")[:PROMPT_CHARS]
    from flashjax.bench.text import PROMPT_TEXT
    return PROMPT_TEXT


def text_source(path: str | os.PathLike | None = None) -> dict:
    """Which text a figure was measured on, for the results: the file (without `path`, the package's
    own prose, named as it sits in the package so the name is the same on every machine) and the
    sha256 of its bytes, which `sha256sum` on that file reproduces."""
    from flashjax.bench.text import PROMPT_NAME, PROMPT_PATH

    file = pathlib.Path(path).resolve() if path else PROMPT_PATH
    data = file.read_bytes()
    return {"path": str(file) if path else PROMPT_NAME, "built_in": not path,
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def ids_sha256(ids) -> str:
    """A short fingerprint of a prompt's token ids: equal ids, equal prompt, whatever the tokenizer."""
    return hashlib.sha256(",".join(str(int(i)) for i in ids).encode()).hexdigest()


def prompt_record(ids, text_file: str | os.PathLike | None = None) -> dict:
    """The results' record of a prompt cut from a text (prompt_ids): the file, its sha256, and a
    fingerprint of the token ids every system was given."""
    record = text_source(text_file)
    record.update(source=f"the first {len(ids)} tokens of {record['path']}", tokens=len(ids),
                  ids_sha256=ids_sha256(ids))
    return record


def prompt_ids(tokenizer, n_tokens: int, text_file: str | os.PathLike | None = None) -> list[int]:
    """The first `n_tokens` token ids of prompt_text(text_file)."""
    ids = tokenizer.encode(prompt_text(text_file), add_special_tokens=False)
    if len(ids) < n_tokens:
        raise ValueError(f"the prompt text ({text_file or 'built in'}) has only {len(ids)} tokens, need {n_tokens}: "
                         f"give a longer text file")
    return ids[:n_tokens]


def summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "runs": 0}
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": len(values)}


def peak_rss_bytes() -> int:
    import resource

    # ru_maxrss is KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_json(report: dict, out: str | None) -> None:
    if out:
        pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(out).write_text(json.dumps(report, indent=2))
        log(f"wrote {out}")


def finish(report: dict, args) -> int:
    """Writes the report to --out and, with --json, prints it as the last line of stdout."""
    write_json(report, args.out)
    if args.json:
        print(json.dumps(report))
    return 0
