"""flashjax beside the tools people use instead, on one machine, in one run (`flashjax bench`).

Rows, each system in its own process (flashjax.bench.peers) so peak RSS is its own:

- flashjax dense (every weight resident, float32, from the original model), naive (the whole
  FFN read from disk every token; at the smallest budget: it caches nothing, so the budget does
  not change it) and, at each budget (default 50%, 65%, 80% of the dense float32 weights), the
  best sparse configuration: the faster of the calibrated predictors (`flashjax calibrate`; this
  runner calibrates its own copy unless --no-calibrate) at the engine's default threshold
  (FlashOptions.predictor_threshold) and hybrid (exact: what fits stays cached); page cache
  evicted before every token;
- the oracle + windowing + bundling at each budget (not with --quick), labelled as what it is: a
  measuring device (a full dense computation outside the budget and the timings finds the true
  active neurons), the best a perfect predictor could do. It is never the best sparse row and
  never counts for a goal;
- transformers (PyTorch CPU, float32, everything in memory) on the same GGUF / HF directory;
- transformers + accelerate disk offload: device_map="auto", max_memory={"cpu": the same budget},
  the rest in an offload folder evicted from the page cache before every token;
- llama.cpp (llama-cpp-python, optional) on the original GGUF, in memory and cold;
- flashjax on quantized copies of the model (`flashjax convert --quant`, made once in the work
  directory and reused; --quant, default q4 and q8): dense with every weight held quantized in
  memory (as llama.cpp holds its file), and for the formats of --quant-sparse (default q4) the best
  sparse configuration at each budget, a share of that copy's weights AS STORED (the paper's
  definition; the float rows' budgets are shares of the dense float32 model), cold reads. The
  predictors of a quantized copy are calibrated on it, the same way (unless --no-calibrate).

Also a disk probe (flashjax.bench.disk_probe): the I/O ceiling the run had. Writes
results.json, results.md and PNG plots (matplotlib) to --out; --json prints the JSON as the last
line of stdout; progress goes to stderr. Every system gets the same prompt token ids, the first
--prompt-tokens tokens of --prompt-text (default: the prose shipped in the package,
flashjax/bench/data/prompt.txt); the results name that file and its sha256. --calibration-text is
what the predictors are trained on (default: text the model writes itself). A goal is judged only
against rows measured in this run: a peer that did not run leaves it "not measured".
benchmarks/bench_compare.py in the repository is this command with the repository's shared
calibration text (../shared/data) as that default.

    flashjax bench --out benchmarks/results/compare                                # the full run
    flashjax bench --quick --out /tmp/bench-quick                                  # CI smoke: a few minutes
    flashjax bench --model path/to/model.gguf --budgets 50% --new-tokens 64
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from flashjax.bench.common import (
    ids_sha256,
    log,
    machine,
    prompt_ids,
    prompt_record,
    text_source,
)
from flashjax.bench.report import is_measuring_device, row_label

SYSTEMS = ("flashjax", "transformers", "accelerate", "llama.cpp")
QUANTS = ("q4", "q8")


# ---- preparation --------------------------------------------------------------------------------------


def resolve_model(model: str) -> tuple[str, str]:
    """(path of the original model, short name). Built-in names are fetched once."""
    from flashjax.hub import DEFAULT_MODELS, default_model_path

    if model in DEFAULT_MODELS:
        return str(default_model_path(model)), model
    path = os.path.abspath(model)
    if not os.path.exists(path):
        raise ValueError(f"no model at {model}: give a built-in name ({', '.join(DEFAULT_MODELS)}), a GGUF file, "
                         f"a Hugging Face directory or a directory written by `flashjax convert`")
    base = os.path.basename(path.rstrip("/"))
    return path, base.removesuffix(".gguf")


def default_workdir(path: str, name: str) -> str:
    from flashjax.hub import DEFAULT_MODELS, cache_dir

    if name in DEFAULT_MODELS:
        return str(cache_dir() / "bench" / name)
    return str(cache_dir() / "bench" / f"{name}-{hashlib.sha1(path.encode()).hexdigest()[:8]}")


def parse_fraction(text: str) -> float:
    s = str(text).strip()
    value = float(s[:-1]) / 100 if s.endswith("%") else float(s)
    if not 0 < value <= 1:
        raise ValueError(f"a budget here is a share of the dense model in (0, 1] or (0%, 100%]: {text!r}")
    return value


def ensure_calibrated(args, flash_dir: str) -> dict:
    """Calibrates the predictors of the converted model in flash_dir unless it has them (or --no-calibrate);
    returns the calibration record (calibration_record)."""
    from flashjax.sparsity import has_predictors

    calibrate_now = bool(args.calibrate) and not has_predictors(flash_dir)
    if calibrate_now:
        from flashjax.sparsity import calibrate

        texts = None
        if args.calibration_text:
            with open(args.calibration_text, encoding="utf-8") as f:
                texts = [f.read()]
        log(f"calibrating the sparsity predictors of {flash_dir} "
            f"({'on ' + args.calibration_text if texts else 'on text the model writes itself'}; once, reused after)")
        t0 = time.perf_counter()
        calibrate(flash_dir, texts=texts, progress=False)
        log(f"  calibrated in {time.perf_counter() - t0:.0f} s")
    return calibration_record(args.calibration_text, calibrate_now, has_predictors(flash_dir))


def prepare(args, source: str, workdir: str) -> tuple[str, list[int], dict]:
    """Converts (and calibrates) the model into workdir; returns (flash dir, prompt ids, model info)."""
    from flashjax.flash.budget import dense_weight_bytes
    from flashjax.sparsity import has_predictors
    from flashjax.store import convert, is_flash_dir, open_flash_model

    if is_flash_dir(source):
        flash_dir = source
    else:
        flash_dir = os.path.join(workdir, "flash")
        if not is_flash_dir(flash_dir):
            log(f"converting {source} to the flash format in {flash_dir} (float16, bundled; once, reused after)")
            convert(source, flash_dir, dtype="float16", progress=False)
    # The float copy's predictors serve its rows only (--no-float: none run; the copy still gives the prompt).
    calibration = None if args.no_float else ensure_calibrated(args, flash_dir)
    fm = open_flash_model(flash_dir, verify=False)
    ids, prompt = prompt_for(fm, args.prompt_tokens, args.prompt_text)
    info = {"dense_weight_bytes": dense_weight_bytes(fm.config, "float32"), "calibrated": has_predictors(flash_dir),
            "n_layers": fm.config.n_layers, "d_ffn": fm.config.d_ffn, "d_model": fm.config.d_model,
            "prompt": prompt, "calibration": calibration}
    if "flashjax" in args.systems:
        info["quantized"] = prepare_quantized(args, source, workdir)
    return flash_dir, ids, info


def prepare_quantized(args, source: str, workdir: str) -> dict:
    """The quantized copies (--quant) in workdir/flash-q4, flash-q8: converted once and reused, like the
    float16 copy; the formats of --quant-sparse calibrated like it (ensure_calibrated). A copy that
    cannot be made (rows that do not split into blocks of 32, say) is an entry with "error", and its
    rows say so; the run goes on."""
    from flashjax.sparsity import has_predictors
    from flashjax.store import convert, is_flash_dir, open_flash_model

    out = {}
    for kind in args.quant:
        q_dir = os.path.join(workdir, f"flash-{kind}")
        entry = {"flash_dir": q_dir, "sparse": kind in args.quant_sparse}
        try:
            if not is_flash_dir(q_dir):
                log(f"converting {source} to {kind} in {q_dir} (once, reused after)")
                t0 = time.perf_counter()
                convert(source, q_dir, quant=kind, progress=False)
                log(f"  converted in {time.perf_counter() - t0:.0f} s")
            fm = open_flash_model(q_dir, verify=False)
            entry.update(stored_weight_bytes=fm.stored_weight_bytes(), dtype=fm.manifest.dtype,
                         parts={name: fm.manifest.layout.part_kind(name) for name in fm.manifest.layout.names})
            if entry["sparse"]:
                entry["calibration"] = ensure_calibrated(args, q_dir)
            entry["calibrated"] = has_predictors(q_dir)
        except Exception as e:  # noqa: BLE001 - a copy that cannot be made is said in its rows; the others run
            import traceback
            traceback.print_exc(file=sys.stderr)
            entry["error"] = f"{type(e).__name__}: {e}"
            log(f"  no {kind} copy: {entry['error']}")
        out[kind] = entry
    return out


def prompt_for(fm, n_tokens: int, text: str | None) -> tuple[list[int], dict]:
    """The prompt ids every system gets, and a record of where they came from: the text file and its
    sha256, and a fingerprint of the ids themselves."""
    try:
        tokenizer = fm.tokenizer()
    except Exception:  # noqa: BLE001 - models without a tokenizer (tiny test models) get random ids
        tokenizer = None
    if tokenizer is not None:
        ids = [int(i) for i in prompt_ids(tokenizer, n_tokens, text)]
        return ids, prompt_record(ids, text)
    import numpy as np
    ids = [int(i) for i in np.random.RandomState(0).randint(4, fm.config.vocab_size, size=n_tokens)]
    # Said as it is: no text was read, so no file and no hash stand for this prompt.
    return ids, {"source": "random token ids, numpy RandomState(0) (the model has no tokenizer)", "path": None,
                 "built_in": False, "sha256": None, "tokens": len(ids), "ids_sha256": ids_sha256(ids)}


def calibration_record(text: str | None, calibrated_now: bool, calibrated: bool) -> dict:
    """What the predictors were trained on. Predictors found in the work directory were trained by an
    earlier run, on text this run cannot vouch for: said so rather than naming this run's text."""
    if not calibrated:
        return {"predictors": None}
    if not calibrated_now:
        return {"predictors": "reused: calibrated by an earlier run (its text is not recorded here)"}
    source = text_source(text) if text else {"source": "text the model writes itself"}
    return dict(source, predictors="calibrated in this run")


def disk_info(path: str) -> dict:
    """The mount (device, filesystem) holding `path`."""
    path = os.path.realpath(path)
    best = ("", {})
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                    best = (mnt, {"device": dev, "mount": mnt, "fstype": fstype})
    except OSError:
        pass
    return best[1]


# ---- the rows -------------------------------------------------------------------------------------------


ORACLE_SERIES = "flashjax oracle (cold; a measuring device, not a configuration)"


def _prefix(quant: str | None) -> str:
    return f"{quant} " if quant else ""


def predictor_config(quant: str | None = None) -> dict:
    """The predictors as users get them: the engine's documented default threshold, read from
    FlashOptions so the row follows the engine when the default moves. `quant`: the copy's format."""
    from flashjax.flash.runner import FlashOptions

    t = FlashOptions.predictor_threshold
    return {"sparsity": "predictor",
            "config": f"{_prefix(quant)}predictor (threshold {t:g}, the engine's default; lookahead, window 5)",
            "flash_options": {"window": 5, "lookahead": True, "predictor_threshold": t}}


def hybrid_config(quant: str | None = None) -> dict:
    """Exact: the neurons that fit stay cached, the rest stream every token."""
    return {"sparsity": "hybrid", "config": f"{_prefix(quant)}hybrid (exact: what fits stays cached, the rest streams)",
            "flash_options": {"window": 1}}


def sparse_candidates(calibrated: bool, quick: bool, quant: str | None = None) -> list[list[dict]]:
    """The rows that compete for best sparse at one budget, each a list of configurations tried in
    order until one fits (the predictors' memory counts in the budget). The full run measures the
    predictors and hybrid apart and keeps the faster (pick_best_sparse): with a large budget hybrid
    can beat selecting neurons; --quick runs one row, the predictors if they fit, else hybrid.
    The oracle is never a candidate: it is a measuring device (oracle_config)."""
    hybrid, predictor = hybrid_config(quant), predictor_config(quant)
    if not calibrated:
        return [[hybrid]]
    return [[predictor, hybrid]] if quick else [[predictor], [hybrid]]


def oracle_config(calibrated: bool) -> dict:
    """The oracle row: the true active neurons, found by a full dense computation held outside the budget
    and run outside the timings; with windowing and bundling. With calibrated thresholds when the
    model has them (threshold 0 reads every SwiGLU neuron)."""
    if calibrated:
        return {"sparsity": "oracle", "config": "oracle, calibrated thresholds + windowing + bundling (measuring device)",
                "flash_options": {"window": 5, "threshold": "calibrated"}}
    return {"sparsity": "oracle", "config": "oracle + windowing + bundling (measuring device)",
            "flash_options": {"window": 5}}


def build_specs(args, source: str, flash_dir: str, ids: list[int], info: dict, workdir: str) -> list[dict]:
    from flashjax.sparsity import has_predictors
    from flashjax.store import is_flash_dir

    common = {"prompt_ids": ids, "new_tokens": args.new_tokens, "runs": args.runs, "warmup_tokens": args.warmup_tokens}
    budgets = sorted(parse_fraction(b) for b in args.budgets)
    dense_bytes = info["dense_weight_bytes"]
    # Every system gets the same bytes for its weights, a share of the dense float32 model computed here:
    # flashjax is given bytes, not "50%", whose meaning is the engine's to define (and may differ).
    budget_bytes = {b: int(b * dense_bytes) for b in budgets}
    specs = []
    peers_ok = not is_flash_dir(source)
    if "flashjax" in args.systems and not args.no_float:
        specs.append(dict(common, system="flashjax", config="dense", sparsity="dense", model=source,
                          series="flashjax dense", plot_x=1.0, memory_budget_fraction=None))
        if not args.no_naive:
            specs.append(dict(common, system="flashjax", config="naive", sparsity="naive", flash_dir=flash_dir,
                              memory_budget=budget_bytes[budgets[0]], memory_budget_fraction=budgets[0], cold=True,
                              series="flashjax naive (cold)", flash_options={"window": 1}))
        for b in budgets:
            budget = {"flash_dir": flash_dir, "memory_budget": budget_bytes[b], "memory_budget_fraction": b, "cold": True}
            for cands in sparse_candidates(has_predictors(flash_dir), args.quick):
                specs.append(dict(common, **budget, system="flashjax", config="best sparse", candidates=cands,
                                  series="flashjax best sparse (cold)", sparse_candidate=True))
            if not args.quick:
                specs.append(dict(common, **budget, **oracle_config(has_predictors(flash_dir)), system="flashjax",
                                  series=ORACLE_SERIES, measuring_device=True))
    if "flashjax" in args.systems:
        specs += quantized_specs(common, budgets, info, args.quick)
    if not peers_ok and set(args.systems) - {"flashjax"}:
        log(f"note: {source} is a flash-format directory; transformers, accelerate and llama.cpp need the original "
            f"model (GGUF or Hugging Face directory): they are skipped")
    if peers_ok and "transformers" in args.systems:
        specs.append(dict(common, system="transformers", config="PyTorch CPU float32, in memory", model=source,
                          series="transformers (in memory)", plot_x=1.0, memory_budget_fraction=None))
    if peers_ok and "accelerate" in args.systems:
        for b in budgets:
            specs.append(dict(common, system="accelerate", config="disk offload (device_map, cold)", model=source,
                              budget_bytes=budget_bytes[b], memory_budget_fraction=b, cold=True,
                              offload_folder=os.path.join(workdir, f"offload-{round(100 * b)}"),
                              series="transformers + accelerate disk offload (cold)"))
    if peers_ok and "llama.cpp" in args.systems:
        if source.endswith(".gguf"):
            for cold in (False, True):
                specs.append(dict(common, system="llama.cpp", config="mmap, cold" if cold else "in memory",
                                  model=source, cold=cold, memory_budget_fraction=None,
                                  series=f"llama.cpp {'cold page cache' if cold else 'in memory'}"))
        else:
            specs.append(dict(common, system="llama.cpp", config="-", skip="llama.cpp runs GGUF files only",
                              memory_budget_fraction=None))
    for s in specs:
        s["label"] = row_label(dict(s, memory_budget=s.get("memory_budget_fraction")))
    return specs


def quantized_specs(common: dict, budgets: list[float], info: dict, quick: bool) -> list[dict]:
    """flashjax on the quantized copies: dense in memory (every weight held quantized) and, for the
    formats of --quant-sparse, the best sparse candidates at each budget, a share of the copy's
    weights as stored (what the engine's "50%" means), given in bytes; cold reads."""
    specs = []
    dense_bytes = info["dense_weight_bytes"]
    for kind, q in (info.get("quantized") or {}).items():
        if q.get("error"):
            specs.append(dict(common, system="flashjax", config=f"{kind} (converted copy)", quant=kind,
                              memory_budget_fraction=None, skip=f"no {kind} copy of the model: {q['error']}"))
            continue
        model_bytes = q["stored_weight_bytes"]
        specs.append(dict(common, system="flashjax", config=f"{kind} dense (in memory)", sparsity="dense",
                          model=q["flash_dir"], quant=kind, model_bytes=model_bytes,
                          series=f"flashjax {kind} dense (in memory)", plot_x=model_bytes / dense_bytes,
                          memory_budget_fraction=None))
        if not q.get("sparse"):
            continue
        for b in budgets:
            budget_bytes = int(b * model_bytes)
            budget = {"flash_dir": q["flash_dir"], "memory_budget": budget_bytes, "memory_budget_fraction": b,
                      "cold": True, "quant": kind, "model_bytes": model_bytes, "budget_basis": f"{kind} as stored",
                      "plot_x": budget_bytes / dense_bytes}
            for cands in sparse_candidates(bool(q.get("calibrated")), quick, quant=kind):
                specs.append(dict(common, **budget, system="flashjax", config=f"{kind} best sparse", candidates=cands,
                                  series=f"flashjax {kind} best sparse (cold)", sparse_candidate=True))
    return specs


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy (all processes), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except OSError:
        return 0.0
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def _own_cpu_s() -> float:
    import resource

    return sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def run_row(spec: dict, timeout: float, in_process: bool) -> dict:
    """Runs the row, and records how busy the machine was with other work meanwhile (a shared
    machine skews every figure: `other_cpu_share` is the other processes' share of all CPUs)."""
    busy0, own0, t0 = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
    row = _run_row(spec, timeout, in_process)
    wall = time.perf_counter() - t0
    other = max(0.0, (_busy_cpu_s() - busy0) - (_own_cpu_s() - own0))
    row["other_cpu_share"] = other / (wall * (os.cpu_count() or 1)) if wall > 0 else None
    return row


def _run_row(spec: dict, timeout: float, in_process: bool) -> dict:
    """Runs one spec in its own process (flashjax.bench.peers); the row is the last line of its stdout."""
    if spec.get("skip"):
        return {"system": spec["system"], "config": spec.get("config"), "memory_budget": None, "skipped": spec["skip"]}
    if spec["system"] == "llama.cpp":
        from flashjax.bench.peers import llama_cpp_available
        missing = llama_cpp_available()  # checked here too: a clear message without starting a worker
        if missing:
            return {"system": "llama.cpp", "config": spec.get("config"), "memory_budget": None, "skipped": missing}
    if in_process:
        from flashjax.bench.peers import run_spec
        return run_spec(spec)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        spec_file = f.name
    # Every path in the spec is absolute, so the worker may start in this working directory.
    cmd = [sys.executable, "-m", "flashjax.bench.peers", "--spec-file", spec_file, "--json"]
    try:
        proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)
        lines = [line for line in proc.stdout.splitlines() if line.strip()]
        try:
            return json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            return {"system": spec["system"], "config": spec.get("config"),
                    "memory_budget": spec.get("memory_budget_fraction"),
                    "error": f"worker exited {proc.returncode} without a result"}
    except subprocess.TimeoutExpired:
        return {"system": spec["system"], "config": spec.get("config"),
                "memory_budget": spec.get("memory_budget_fraction"), "error": f"timed out after {timeout:.0f} s"}
    finally:
        os.unlink(spec_file)


# ---- analysis -------------------------------------------------------------------------------------------


def _ok(r):
    return r is not None and not r.get("error") and not r.get("skipped") and r.get("decode_ms_per_token") is not None


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def analyse(rows: list[dict], info: dict, probe: dict | None) -> dict:
    dense_bytes = info["dense_weight_bytes"]
    for r in rows:
        if _ok(r) and r.get("weights_bytes") is not None:
            total = r.get("weights_total_bytes") or dense_bytes
            r["weights_share"] = r["weights_bytes"] / total
            r["weights_share_of_rss"] = r["weights_bytes"] / r["peak_rss_bytes"] if r.get("peak_rss_bytes") else None
    # Greedy agreement with flashjax dense.
    ref = next((r for r in rows if r["system"] == "flashjax" and r.get("config") == "dense" and _ok(r)), None)
    agreement = None
    if ref and ref.get("tokens"):
        agreement = {"reference": "flashjax dense", "compared_tokens": len(ref["tokens"]), "rows": []}
        for r in rows:
            if not _ok(r) or not r.get("tokens"):
                continue
            if r is ref:
                r["agreement"] = {"reference": True}
                continue
            diff = first_difference(ref["tokens"], r["tokens"])
            expected = r["system"] in ("transformers", "accelerate")
            r["agreement"] = {"first_difference": diff, "compared": min(len(ref["tokens"]), len(r["tokens"])),
                              "expected_identical": expected}
            agreement["rows"].append({"label": r.get("label") or f"{r['system']} {r.get('config')}",
                                      "first_difference": diff, "expected": expected})
    # The I/O ceiling each flashjax row ran under.
    if probe and probe.get("points"):
        from flashjax.bench.disk_probe import throughput_for

        for r in rows:
            if not _ok(r) or r["system"] != "flashjax" or not r.get("disk_bytes_per_token") or not r.get("read_ops_per_token"):
                continue
            mean_read = r["disk_bytes_per_token"] / r["read_ops_per_token"]
            chunk, rate = throughput_for(probe, mean_read)
            ceiling_ms = r["disk_bytes_per_token"] / (rate * 1e6) * 1e3
            r["io_ceiling"] = {"mean_read_bytes": mean_read, "chunk_bytes": chunk, "mb_per_s": rate,
                               "ceiling_io_ms": ceiling_ms,
                               "efficiency": ceiling_ms / r["io_ms"] if r.get("io_ms") else None}
    return {"greedy_agreement": agreement}


def pick_best_sparse(rows: list[dict]) -> None:
    """At each budget the fastest measured sparse candidate is the best sparse row; the others stay in
    the table as a series of their own. Each model copy competes apart (the float16 copy, q4, q8: a
    budget is a share of a different model). Oracle rows are left out and labelled as measuring devices."""
    by_budget: dict = {}
    def key(r):
        return r.get("quant"), r.get("memory_budget")

    for r in rows:
        if r.get("sparse_candidate") and _ok(r) and not is_measuring_device(r):
            by_budget.setdefault(key(r), []).append(r)
    for r in rows:
        if r["system"] == "flashjax" and is_measuring_device(r):
            r["best_sparse"] = False
            r["series"] = ORACLE_SERIES
        elif r.get("sparse_candidate"):
            group = by_budget.get(key(r), [])
            r["best_sparse"] = bool(group) and r is min(group, key=lambda x: x["decode_ms_per_token"])
            if not r["best_sparse"] and _ok(r):
                r["series"] = f"flashjax {_prefix(r.get('quant'))}{r.get('sparsity') or 'other'} (cold, not the best)"


def _theirs_over_ours(ours: float, theirs: float) -> float:
    return theirs / ours


@dataclasses.dataclass(frozen=True)
class Goal:
    """A target for flashjax's row against a reference row of the same run: `ratio(ours, theirs)` of the
    rows' `metric` (decode ms per token unless said), met when `met(ratio)`."""

    text: str
    ours: str  # what our row is, for "not measured" messages
    theirs: str
    ratio: Callable[[float, float], float]
    met: Callable[[float], bool]
    ratio_text: str  # the ratio's meaning, formatted with the ratio
    metric: str = "decode_ms_per_token"
    unit: str = "ms/token"
    scale: float = 1.0  # the metric's value in `unit`


GOALS = (
    Goal("flashjax best sparse at 50% >= 5x faster per token than accelerate disk offload at 50%",
         "flashjax best sparse at 50%", "accelerate disk offload at 50%",
         _theirs_over_ours, lambda x: x >= 5, "{:.1f}x faster"),
    Goal("flashjax best sparse at 50% faster per token than llama.cpp with a cold page cache",
         "flashjax best sparse at 50%", "llama.cpp with a cold page cache",
         _theirs_over_ours, lambda x: x > 1, "{:.2f}x faster"),
    Goal("flashjax best sparse at 80% within 1.5x of its own dense run",
         "flashjax best sparse at 80%", "flashjax dense",
         lambda ours, theirs: ours / theirs, lambda x: x <= 1.5, "{:.2f}x dense's time"),
    Goal("flashjax q4 best sparse at 50% (of the q4 model as stored) >= 3x faster per token than llama.cpp "
         "with a cold page cache",
         "flashjax q4 best sparse at 50%", "llama.cpp with a cold page cache",
         _theirs_over_ours, lambda x: x >= 3, "{:.2f}x faster"),
    Goal("flashjax q4 dense in memory within 2x of llama.cpp in memory per token",
         "flashjax q4 dense (in memory)", "llama.cpp in memory",
         lambda ours, theirs: ours / theirs, lambda x: x <= 2, "{:.2f}x llama.cpp's time"),
    Goal("flashjax q4 best sparse at 50% reads >= 3x fewer bytes per token than llama.cpp with a cold page cache",
         "flashjax q4 best sparse at 50%", "llama.cpp with a cold page cache",
         _theirs_over_ours, lambda x: x >= 3, "{:.1f}x fewer bytes",
         metric="disk_bytes_per_token", unit="MB/token", scale=1e-6),
)


def judge(goal: Goal, ours: dict | None, theirs: dict | None, why: dict | None = None) -> dict:
    """A goal met or missed by two rows measured in this run. When either did not run (or failed, or has
    no figure for the goal's metric) the goal is not measured (met None): a figure remembered from
    another run or machine is no stand-in. `why`: for a missing row, the errors of its rows that failed
    (a budget too small for any configuration, say), quoted in the detail."""
    missing = [name for name, r in ((goal.ours, ours), (goal.theirs, theirs)) if r is None]
    if missing:
        reasons = [f"{name}: {'; '.join(why[name])}" for name in missing if (why or {}).get(name)]
        return {"goal": goal.text, "met": None, "ratio": None,
                "detail": f"no measurement of {' and '.join(missing)} in this run (not run, skipped or failed)"
                          + (f" [{' | '.join(reasons)}]" if reasons else "")}
    a, b = ours.get(goal.metric), theirs.get(goal.metric)
    unmeasured = [name for name, v in ((goal.ours, a), (goal.theirs, b)) if v is None]
    if unmeasured:
        return {"goal": goal.text, "met": None, "ratio": None, "rows": [ours.get("label"), theirs.get("label")],
                "detail": f"no {goal.metric} for {' and '.join(unmeasured)} in this run"}
    try:
        x = goal.ratio(a, b)
    except ZeroDivisionError:
        x = float("inf")
    note = ours["config"] + ("; " + ", ".join(d["config"] for d in ours["did_not_fit"]) + " did not fit this budget"
                             if ours.get("did_not_fit") else "")
    if goal.metric == "disk_bytes_per_token" and ours.get("proc_read_bytes_per_token") is not None:
        note += f"; flashjax's own count, the kernel's (/proc/self/io) {ours['proc_read_bytes_per_token'] / 1e6:.2f} MB/token"
    finite = x != float("inf")
    ratio_s = goal.ratio_text.format(x) if finite else "ours is 0"
    return {"goal": goal.text, "met": bool(goal.met(x)), "ratio": x if finite else None,
            "rows": [ours.get("label"), theirs.get("label")],
            "detail": f"{a * goal.scale:.{2 if goal.scale != 1 else 1}f} vs {b * goal.scale:.{2 if goal.scale != 1 else 1}f} "
                      f"{goal.unit}: {ratio_s} [{note}]"}


def goals(rows: list[dict]) -> list[dict]:
    def find(pred):
        return next((r for r in rows if _ok(r) and pred(r)), None)

    def failures(pred) -> list[str]:
        """Why rows that would have counted did not: their errors (deduplicated, in order)."""
        out = []
        for r in rows:
            reason = r.get("error") or r.get("skipped")
            if reason and pred(r) and f"{r.get('config')}: {reason}" not in out:
                out.append(f"{r.get('config')}: {reason}")
        return out

    def at(r, budget):
        return r.get("memory_budget") is not None and abs(r["memory_budget"] - budget) < 1e-6

    def candidate(budget, quant=None):
        return lambda r: (r["system"] == "flashjax" and not is_measuring_device(r) and at(r, budget)
                          and r.get("quant") == quant and (r.get("sparse_candidate") or r.get("best_sparse")))

    def best(budget, quant=None):
        is_candidate = candidate(budget, quant)
        return find(lambda r: r.get("best_sparse") and is_candidate(r))

    def is_dense(r):
        return r["system"] == "flashjax" and r.get("config") == "dense" and not r.get("quant")

    def is_acc50(r):
        return r["system"] == "accelerate" and at(r, 0.5)

    def is_llama(cold):
        return lambda r: r["system"] == "llama.cpp" and bool(r.get("cold_page_cache") or "cold" in (r.get("config") or "")) == cold

    def is_q4_dense(r):
        return r["system"] == "flashjax" and r.get("quant") == "q4" and r.get("memory_budget") is None

    preds = {"best50": candidate(0.5), "best80": candidate(0.8), "q4best50": candidate(0.5, "q4"), "dense": is_dense,
             "acc50": is_acc50, "llama_cold": is_llama(True), "llama_mem": is_llama(False), "q4_dense": is_q4_dense}
    found = {"best50": best(0.5), "best80": best(0.8), "q4best50": best(0.5, "q4"), "dense": find(is_dense),
             "acc50": find(is_acc50), "llama_cold": find(is_llama(True)), "llama_mem": find(is_llama(False)),
             "q4_dense": find(is_q4_dense)}
    pairs = (("best50", "acc50"), ("best50", "llama_cold"), ("best80", "dense"),
             ("q4best50", "llama_cold"), ("q4_dense", "llama_mem"), ("q4best50", "llama_cold"))
    out = []
    for goal, (a, b) in zip(GOALS, pairs):
        why = {goal.ours: failures(preds[a]), goal.theirs: failures(preds[b])}
        out.append(judge(goal, found[a], found[b], why))
    return out


# ---- main -----------------------------------------------------------------------------------------------


def build_parser(prog: str = "flashjax bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="built-in name, GGUF file, HF directory or flash directory")
    p.add_argument("--budgets", nargs="+", default=None, help="shares of the dense model (default 50%% 65%% 80%%)")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 128 (--quick: 32)")
    p.add_argument("--new-tokens", type=int, default=None, help="default 256 (--quick: 16)")
    p.add_argument("--runs", type=int, default=None, help="measured runs per system after a warm-up (default 3)")
    p.add_argument("--warmup-tokens", type=int, default=8, help="tokens generated by the warm-up run")
    p.add_argument("--workdir", default=None,
                   help="converted model, predictors and offload folders (default: ~/.cache/flashjax/bench/...)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false", default=None,
                   help="do not calibrate the converted model (best sparse is then hybrid unless already calibrated)")
    p.add_argument("--quant", nargs="+", default=None, choices=QUANTS + ("none",), metavar="FORMAT",
                   help="quantized copies of the model to run flashjax on, dense in memory (q4, q8; default both; "
                        "none: no quantized rows); converted once into the work directory")
    p.add_argument("--quant-sparse", nargs="+", default=None, choices=QUANTS + ("none",), metavar="FORMAT",
                   help="of those, the formats also run under each budget (hybrid and predictor, cold reads; "
                        "default q4); their predictors are calibrated on the copy unless --no-calibrate")
    p.add_argument("--no-naive", action="store_true", help="skip the naive row")
    p.add_argument("--no-float", action="store_true",
                   help="skip flashjax's float rows (dense, naive, best sparse, oracle): only the quantized copies "
                        "(--quant) beside the other systems")
    p.add_argument("--no-disk-probe", action="store_true")
    p.add_argument("--probe-mib", type=int, default=None, help="disk probe file size (default 1024; --quick: 256)")
    p.add_argument("--row-timeout", type=float, default=3600, help="seconds one system may take")
    p.add_argument("--in-process", action="store_true",
                   help="run every row in this process (faster to start; peak RSS is then not per system)")
    p.add_argument("--quick", action="store_true",
                   help="CI smoke: 32 prompt tokens, 16 generated, one run, the 50%% budget, small disk probe")
    p.add_argument("--prompt-text", default=None, metavar="FILE",
                   help="text file the prompt is cut from (its first tokens; default: the package's own prose)")
    p.add_argument("--calibration-text", default=None, metavar="FILE",
                   help="text the predictors are calibrated on (default: text the model writes itself)")
    p.add_argument("--out", default=None,
                   help="directory for results.json, results.md and the PNG plots (the plots need matplotlib)")
    p.add_argument("--json", action="store_true", help="print the JSON as the last line of stdout")
    return p


def quant_formats(quant: list[str] | None, quant_sparse: list[str] | None) -> tuple[list[str], list[str]]:
    """(--quant, --quant-sparse) as lists of formats: by default q4 and q8, and q4 under the budgets;
    "none" alone: none; a format under the budgets only if it is converted (in --quant)."""
    formats = [k for k in QUANTS if k in (QUANTS if quant is None else quant)]
    sparse = [k for k in QUANTS if k in (("q4",) if quant_sparse is None else quant_sparse) and k in formats]
    return formats, sparse


def main(argv=None, prog: str = "flashjax bench") -> int:
    """Runs the comparison; `argv` as on the command line, `prog` the command recorded in the results."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    if args.out:
        from flashjax.bench.report import MATPLOTLIB_MISSING, plots_available
        if not plots_available():  # said now, not after the whole run
            raise RuntimeError(f"--out writes PNG plots: {MATPLOTLIB_MISSING}")
    for name in ("prompt_text", "calibration_text"):
        path = getattr(args, name)
        if path is not None:
            if not os.path.isfile(path):
                raise ValueError(f"--{name.replace('_', '-')} {path}: no such file")
            setattr(args, name, os.path.abspath(path))
    q = args.quick
    args.budgets = args.budgets or (["50%"] if q else ["50%", "65%", "80%"])
    args.prompt_tokens = args.prompt_tokens or (32 if q else 128)
    args.new_tokens = args.new_tokens or (16 if q else 256)
    args.runs = args.runs or (1 if q else 3)
    args.probe_mib = args.probe_mib or (256 if q else 1024)
    if args.calibrate is None:
        args.calibrate = not q  # --quick uses predictors only if the model already has them
    args.quant, args.quant_sparse = quant_formats(args.quant, args.quant_sparse)
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    source, name = resolve_model(args.model)
    workdir = os.path.abspath(args.workdir or default_workdir(source, name))
    os.makedirs(workdir, exist_ok=True)
    log(f"bench: {name} ({source}); workdir {workdir}")
    flash_dir, ids, info = prepare(args, source, workdir)

    probe = None
    if not args.no_disk_probe:
        from flashjax.bench.disk_probe import probe as run_probe
        kw = {"chunks": [4 << 10, 64 << 10, 1 << 20], "threads": [1, 8, 32], "seconds": 0.3} if q else {}
        probe = run_probe(workdir, args.probe_mib, **kw)

    specs = build_specs(args, source, flash_dir, ids, info, workdir)
    rows = []
    for i, spec in enumerate(specs, 1):
        log(f"[{i}/{len(specs)}] {spec['label']} ({time.perf_counter() - t_start:.0f} s elapsed)")
        row = run_row(spec, args.row_timeout, args.in_process)
        for k in ("series", "plot_x", "sparse_candidate", "measuring_device", "quant", "budget_basis", "model_bytes"):
            if k in spec:
                row.setdefault(k, spec[k])
        row.setdefault("memory_budget", spec.get("memory_budget_fraction"))
        row["label"] = row_label(row)
        if row.get("skipped"):
            log(f"  skipped: {row['skipped']}")
        elif row.get("error"):
            log(f"  failed: {row['error']}")
        else:
            log(f"  {row['decode_ms_per_token']:.1f} ms/token, prefill {row['prefill_tokens_per_s']:.0f} tok/s, "
                f"{(row.get('disk_bytes_per_token') or 0) / 1e6:.2f} MB/token, peak RSS "
                f"{row['peak_rss_bytes'] / 1e6:.0f} MB ({row.get('row_wall_s', 0):.0f} s; other work on the machine: "
                f"{100 * (row.get('other_cpu_share') or 0):.0f}% of its CPUs)")
        rows.append(row)

    pick_best_sparse(rows)
    extra = analyse(rows, info, probe)
    m = machine()
    m["disk"] = disk_info(workdir)
    # Other work on the machine skews every figure: the load average at the start and the end.
    m["loadavg_start"], m["loadavg_end"] = list(load_start), list(os.getloadavg())
    try:
        import torch
        m["torch"], m["torch_threads"] = torch.__version__, torch.get_num_threads()
    except ImportError:
        pass
    notes = [
        "flashjax dense runs on the original model's weights (the same ones transformers loads); the flash rows "
        "run on its float16 conversion, so their greedy tokens may differ from dense slightly even before sparsity.",
        "flashjax decode ms/token is the engine's own per-token time (page-cache eviction and, for oracle, its full "
        "measuring computation excluded); transformers and accelerate run model.generate, timed per step by a "
        "LogitsProcessor that also evicts between steps, outside the timing; llama.cpp is timed around each eval.",
        "disk MB/token: flashjax from its read statistics (proc_read_bytes_per_token holds the kernel's count); "
        "the others from /proc/self/io read_bytes.",
        "peak RSS: the process's high-water mark while generating, reset after loading and warm-up "
        "(load_peak_rss_bytes holds the loading peak).",
        f"naive caches nothing, so it runs once, at the smallest budget ({min(parse_fraction(b) for b in args.budgets):.0%}).",
        "CPU used by other work: the share of the machine's CPUs that other processes used while the row ran "
        "(/proc/stat); a row measured beside other work is slower than the machine can do.",
    ]
    if any(is_measuring_device(r) for r in rows if r["system"] == "flashjax"):
        notes.append("oracle rows are a measuring device, not a configuration anyone can run: they hold a full copy "
                     "of the model outside the budget to find the active neurons (their peak RSS includes it) and "
                     "show what a perfect predictor could do. They are never the best sparse row and never count "
                     "for a goal.")
    quantized = info.get("quantized") or {}
    if quantized:
        sizes = ", ".join(f"{k} {q['stored_weight_bytes'] / 1e6:.0f} MB" for k, q in quantized.items()
                          if q.get("stored_weight_bytes"))
        notes.append(
            "flashjax q4/q8 rows run on copies written by `flashjax convert --quant` (blocks of 32 values with "
            "float16 scales; q4 adds a float16 offset per block; from a GGUF, matching blocks are copied code for "
            "code and a q4 copy keeps the down projection at q8): dense holds every weight quantized in memory; "
            "their budgets are shares of that copy's weights as stored (" + (sizes or "-") + "), the paper's "
            "definition, not of the float32 model; the float rows' budgets are shares of the dense float32 model. "
            "Their plot position is the budget in bytes as a share of the float32 model.")
    notes.append(f"every system got the same prompt token ids: {info['prompt']['source']}.")
    result = {"benchmark": "compare", "model": name, "model_path": source, "flash_dir": flash_dir,
              "machine": m, "settings": {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
                                         "runs": args.runs, "warmup_tokens": args.warmup_tokens,
                                         "budgets": [parse_fraction(b) for b in args.budgets], "quick": q,
                                         "in_process": args.in_process,
                                         "prompt_text": info["prompt"]["path"],
                                         "calibration_text": args.calibration_text,
                                         "quant": args.quant, "quant_sparse": args.quant_sparse},
              "prompt": info["prompt"], "calibration": info["calibration"],
              "dense_weight_bytes": info["dense_weight_bytes"], "calibrated": info["calibrated"],
              "quantized": quantized,
              "rows": rows, "disk_probe": probe, "goals": goals(rows), "notes": notes,
              "command": " ".join([prog] + [shlex.quote(a) for a in argv]),
              "wall_s": time.perf_counter() - t_start}
    result.update(extra)
    from flashjax.bench.report import markdown, write_report

    if args.out:
        paths = write_report(result, args.out)
        result["plots"] = {k: v for k, v in paths.items() if v.endswith(".png")}
        for k, v in paths.items():
            log(f"wrote {k}: {v}")
    print(markdown(result, result.get("plots")), file=sys.stderr if args.json else sys.stdout)
    log(f"bench: done in {(time.perf_counter() - t_start) / 60:.1f} min")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
