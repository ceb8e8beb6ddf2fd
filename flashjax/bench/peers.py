"""One system per process: the workers `flashjax bench` (flashjax.bench.compare) spawns, and the page-out helper they share.

Each worker loads one system (flashjax in one configuration, transformers, accelerate disk
offload, llama.cpp), warms it up, measures `runs` greedy generations of `new_tokens` after a
prompt of token ids, and prints one JSON row as the last line of stdout. One process per
system keeps peak RSS per system: after loading and warming up the process's high-water mark
is reset (/proc/self/clear_refs), so `peak_rss_bytes` is the peak while generating;
`load_peak_rss_bytes` is the peak before that (loading, dequantizing, compiling).

    python -m flashjax.bench.peers --spec '{"system": "transformers", "model": "...gguf", ...}' --json
    python -m flashjax.bench.peers --spec-file spec.json --json

Cold reads: with `"cold": true` the system's weight files leave the page cache before every
token (outside the timings), the way flashjax's `--evict-page-cache` does: `page_out(paths)`
first pages out this process's own mappings of those files (madvise over the ranges
/proc/self/maps lists: posix_fadvise does not drop pages a process still maps), then
posix_fadvise(DONTNEED). Disk bytes for the peers come from /proc/self/io `read_bytes` (bytes
this process really caused to be read from the block device), per decode token.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import sys
import time
from collections.abc import Callable

from flashjax.bench.common import log, summary

SYSTEMS = ("flashjax", "transformers", "accelerate", "llama.cpp")
MADV_DONTNEED = 4
MADV_PAGEOUT = 21  # Linux 5.4+: reclaim the pages (never discards a private mapping's writes)

# ---- page cache and process counters -----------------------------------------------------------


def _files(paths) -> list[str]:
    out = []
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            for dirpath, _, names in os.walk(p):
                out.extend(os.path.join(dirpath, n) for n in sorted(names))
        elif os.path.exists(p):
            out.append(p)
    return out


def _libc():
    if not hasattr(_libc, "lib"):
        lib = ctypes.CDLL(None, use_errno=True)
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.madvise.restype = ctypes.c_int
        _libc.lib = lib
    return _libc.lib


def mapped_ranges(paths) -> list[tuple[int, int, str, str]]:
    """This process's mappings of the given files (or every file under given directories):
    (start, end, perms, path) per /proc/self/maps line, matched by device and inode."""
    keys = {}
    for f in _files(paths):
        try:
            st = os.stat(f)
        except OSError:
            continue
        keys[(os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)] = f
    if not keys:
        return []
    out = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(None, 5)
            if len(parts) < 6 or parts[4] == "0":
                continue
            major, minor = (int(x, 16) for x in parts[3].split(":"))
            path = keys.get((major, minor, int(parts[4])))
            if path is not None:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                out.append((start, end, parts[1], path))
    return out


def _anonymous_kib(starts: set[int]) -> dict[int, int]:
    """Anonymous (copied-on-write) kB of the mappings starting at `starts`, from /proc/self/smaps."""
    out, current = {}, None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                start = int(head.split("-")[0], 16)
                current = start if start in starts else None
            elif current is not None and line.startswith("Anonymous:"):
                out[current] = int(line.split()[1])
    return out


def page_out(paths) -> dict:
    """Drops the given files (directories: every file under them) from memory: this process's own
    mappings first (madvise), then the page cache (fdatasync + posix_fadvise DONTNEED).

    MADV_DONTNEED unmaps the pages (the next access faults them back from the file). It would discard
    the writes of a private mapping's copied-on-write pages, so a private mapping holding any
    (smaps Anonymous > 0) gets MADV_PAGEOUT instead, which reclaims and never loses data.
    Returns counts: files, mappings, mapped bytes paged out.
    """
    lib = _libc()
    ranges = mapped_ranges(paths)
    anon = _anonymous_kib({s for s, _, perms, _ in ranges if "p" in perms and "w" in perms}) if ranges else {}
    mapped = 0
    for start, end, _, _ in ranges:
        advice = MADV_PAGEOUT if anon.get(start, 0) > 0 else MADV_DONTNEED
        lib.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)
        mapped += end - start
    files = _files(paths)
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            try:
                os.fdatasync(fd)  # dirty pages (a file just written) are not dropped otherwise
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return {"files": len(files), "mappings": len(ranges), "mapped_bytes": mapped}


def mapped_resident_bytes(paths) -> int:
    """Bytes of the given files (directories: every file under them) this process has mapped and in
    memory now: the Rss of its mappings of them (/proc/self/smaps)."""
    starts = {s for s, _, _, _ in mapped_ranges(paths)}
    if not starts:
        return 0
    total, current = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                current = int(head.split("-")[0], 16) in starts
            elif current and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def read_bytes() -> int:
    """Bytes this process caused to be read from storage (/proc/self/io read_bytes); 0 if unavailable."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else 0


def peak_rss() -> int:
    """High-water RSS (VmHWM; since the last reset_peak_rss), else ru_maxrss (process lifetime)."""
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs). False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---- measurement shared by the peers ---------------------------------------------------------------


class Measure:
    """Collects per-run figures; `row()` turns them into medians with spread."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.decode_ms, self.prefill_tps, self.disk_per_token, self.prefill_disk = [], [], [], []
        self.tokens = None
        self.extra: dict = {}

    def add(self, decode_ms: float, prefill_s: float, n_prompt: int, disk_per_token: float, prefill_disk: int,
            tokens: list[int]):
        self.decode_ms.append(decode_ms)
        self.prefill_tps.append(n_prompt / prefill_s if prefill_s else None)
        self.disk_per_token.append(disk_per_token)
        self.prefill_disk.append(prefill_disk)
        self.tokens = tokens

    def row(self, **fields) -> dict:
        d, p, b = summary(self.decode_ms), summary(self.prefill_tps), summary(self.disk_per_token)
        row = {"system": self.spec["system"], "config": self.spec.get("config"),
               "memory_budget": self.spec.get("memory_budget_fraction"),
               "decode_ms_per_token": d["median"], "decode_ms_spread": d,
               "prefill_tokens_per_s": p["median"], "prefill_spread": p,
               "disk_bytes_per_token": b["median"], "disk_bytes_spread": b,
               "prefill_disk_bytes": summary(self.prefill_disk)["median"],
               "cold_page_cache": bool(self.spec.get("cold")), "tokens": self.tokens,
               "prompt_tokens": len(self.spec["prompt_ids"]), "new_tokens": self.spec["new_tokens"]}
        row.update(self.extra)
        row.update(fields)
        return row


def _measured_runs(spec, run_once, measure: Measure):
    """Warm-up (short, not recorded), reset the RSS high-water mark, then `runs` measured runs."""
    ids = spec["prompt_ids"]
    t0 = time.perf_counter()
    run_once(ids, spec.get("warmup_tokens", 8))
    log(f"  [{spec['label']}] warm-up {time.perf_counter() - t0:.1f} s")
    measure.extra["load_peak_rss_bytes"] = peak_rss()
    measure.extra["peak_rss_scope"] = "generation (after load and warm-up)" if reset_peak_rss() else "process lifetime"
    for r in range(spec.get("runs", 1)):
        t0 = time.perf_counter()
        out = run_once(ids, spec["new_tokens"])
        measure.add(*out)
        log(f"  [{spec['label']}] run {r + 1}/{spec.get('runs', 1)}: decode {out[0]:.1f} ms/token, "
            f"prefill {len(ids) / out[1]:.0f} tok/s, {out[3] / 1e6:.2f} MB read/token "
            f"({time.perf_counter() - t0:.1f} s)")
    measure.extra["peak_rss_bytes"] = peak_rss()


# ---- transformers and accelerate ---------------------------------------------------------------------


def _hf_source(model: str) -> tuple[str, dict]:
    """(directory, from_pretrained kwargs) for a GGUF file or a Hugging Face directory."""
    if model.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(model)), {"gguf_file": os.path.basename(model)}
    return model, {}


def _param_bytes(model, on_meta: bool | None = None) -> int:
    seen, total = set(), 0
    for p in list(model.parameters()) + list(model.buffers()):
        if on_meta is not None and (p.device.type == "meta") != on_meta:
            continue
        key = (p.device.type, p.data_ptr()) if p.device.type != "meta" else id(p)
        if key in seen:
            continue
        seen.add(key)
        total += p.numel() * p.element_size()
    return total


def _torch_greedy(model, ids, n_new, evict):
    """Greedy `model.generate` (what users run), timed per step by a LogitsProcessor: it runs once
    per generated token, right after that token's forward pass, marks the time and /proc/self/io,
    then evicts (cold rows) and marks again, so eviction stays outside the timings. End-of-sequence
    is not a stop (as flashjax's stop_at_eos=False): exactly n_new tokens.
    Returns (decode ms/token, prefill s, n prompt, disk bytes/token, prefill disk bytes, tokens)."""
    import copy

    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepClock(LogitsProcessor):
        def __init__(self):
            self.marks = []  # (time at the call, time after evicting, read_bytes at the call, after)

        def __call__(self, input_ids, scores):
            t, b = time.perf_counter(), read_bytes()
            if evict:
                evict()
            self.marks.append((t, time.perf_counter(), b, read_bytes()))
            return scores

    gc = copy.deepcopy(model.generation_config)
    gc.eos_token_id = None
    gc.do_sample, gc.num_beams, gc.max_new_tokens, gc.min_new_tokens = False, 1, n_new, None
    gc.temperature = gc.top_p = gc.top_k = None
    if gc.pad_token_id is None:
        gc.pad_token_id = 0
    clock = StepClock()
    inputs = torch.tensor([ids])
    with torch.inference_mode():
        if evict:
            evict()
        t0, b0 = time.perf_counter(), read_bytes()
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), generation_config=gc,
                             logits_processor=LogitsProcessorList([clock]))
    m = clock.marks
    prefill_s, prefill_disk = m[0][0] - t0, m[0][2] - b0
    step_s = sum(m[i][0] - m[i - 1][1] for i in range(1, len(m)))
    step_disk = sum(m[i][2] - m[i - 1][3] for i in range(1, len(m)))
    steps = max(1, len(m) - 1)
    return step_s * 1e3 / steps, prefill_s, len(ids), step_disk / steps, prefill_disk, out[0, len(ids):].tolist()


def run_transformers(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    directory, kwargs = _hf_source(spec["model"])
    log(f"  [{spec['label']}] loading {spec['model']} (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()
    measure = Measure(spec)
    _measured_runs(spec, lambda ids, n: _torch_greedy(model, ids, n, None), measure)
    weights = _param_bytes(model)
    return measure.row(weights_bytes=weights, weights_total_bytes=weights,
                       torch_threads=torch.get_num_threads())


def run_accelerate(spec: dict) -> dict:
    """transformers + accelerate big-model inference: device_map="auto" under max_memory={"cpu": budget},
    what does not fit offloaded to `offload_folder` on disk."""
    import accelerate
    import torch
    from transformers import AutoModelForCausalLM

    directory, kwargs = _hf_source(spec["model"])
    folder = spec["offload_folder"]
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    budget = int(spec["budget_bytes"])
    log(f"  [{spec['label']}] loading {spec['model']} with device_map='auto', max_memory cpu {budget / 1e6:.0f} MB, "
        f"offload folder {folder} (accelerate {accelerate.__version__})")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, device_map="auto",
                                                 max_memory={"cpu": budget}, offload_folder=folder,
                                                 **kwargs).eval()
    placement = dict(getattr(model, "hf_device_map", {}) or {})
    on_disk = sorted(k for k, v in placement.items() if v == "disk")
    if not on_disk:
        raise RuntimeError(f"accelerate placed nothing on disk under {budget} bytes: {placement}")
    # Where offloaded weights are read from: the offload folder (a GGUF is dequantized into it at
    # load), or, for safetensors checkpoints, which accelerate reads in place, the checkpoint's files.
    evict_paths = [folder] + ([] if spec["model"].endswith(".gguf") else
                              [os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".safetensors")])
    evict = (lambda: page_out(evict_paths)) if spec.get("cold") else None
    measure = Measure(spec)
    _measured_runs(spec, lambda ids, n: _torch_greedy(model, ids, n, evict), measure)
    folder_bytes = sum(os.path.getsize(f) for f in _files(folder))
    resident = _param_bytes(model, on_meta=False)
    total = resident + _param_bytes(model, on_meta=True)
    del model
    shutil.rmtree(folder, ignore_errors=True)  # rewritten by every run: no need to keep it on disk
    return measure.row(weights_bytes=resident, weights_total_bytes=total, offload_folder_bytes=folder_bytes,
                       modules_on_disk=len(on_disk), modules_total=len(placement), max_memory_bytes=budget,
                       device_map_summary={d: sum(1 for v in placement.values() if v == d)
                                           for d in sorted(set(map(str, placement.values())))})


# ---- llama.cpp -------------------------------------------------------------------------------------------

LLAMA_CPP_INSTALL = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON '
                     '-DGGML_AVX512=OFF" pip install llama-cpp-python')


def llama_cpp_available() -> str | None:
    """None when llama-cpp-python imports; otherwise the reason and how to install it."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as e:  # ImportError, or a broken native build
        return (f"llama-cpp-python is not importable ({type(e).__name__}: {e}); it is optional: install it with "
                f"{LLAMA_CPP_INSTALL}")
    return None


def _no_repack(llama_cpp_module) -> Callable[[], None]:
    """Makes the next Llama(...) keep every weight in its file mapping: llama.cpp's CPU "extra buffer
    types" (use_extra_bufts, on by default) repack some block types (Q4_0, Q4_K, IQ4_NL, ... on AVX2)
    into anonymous memory at load, which no page-cache eviction touches, so a cold row would not be
    cold. Returns the function that undoes it."""
    low = llama_cpp_module.llama_cpp
    orig = low.llama_model_default_params

    def params():
        p = orig()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    low.llama_model_default_params = params
    return lambda: setattr(low, "llama_model_default_params", orig)


def run_llama_cpp(spec: dict) -> dict:
    """llama.cpp through llama-cpp-python, greedy, one `eval` per token, mmap. In memory: as users run
    it (llama.cpp's defaults, repacking included). Cold (`"cold": true`): the GGUF leaves the page cache
    before every token (page_out, outside the timings), with repacking off so every weight is read
    through the mapping (_no_repack). Weights in memory: in memory, the file (it is all mapped and
    used); cold, the most of the file's mapping found resident at a token's end, before the eviction."""
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    path = spec["model"]
    if not path.endswith(".gguf"):
        raise ValueError("llama.cpp runs GGUF files only")
    threads = spec.get("threads") or os.cpu_count()
    ctx = len(spec["prompt_ids"]) + spec["new_tokens"] + 8
    cold = bool(spec.get("cold"))
    log(f"  [{spec['label']}] loading {path} into llama.cpp ({threads} threads, mmap"
        f"{', repacking off' if cold else ''})")
    undo = _no_repack(llama_cpp) if cold else None
    try:
        llm = Llama(model_path=path, n_ctx=ctx, n_threads=threads, n_threads_batch=threads, n_batch=512,
                    use_mmap=True, logits_all=False, verbose=False)
    finally:
        if undo:
            undo()
    evict = (lambda: page_out([path])) if cold else None
    n_vocab = llm.n_vocab()
    resident = []  # the file's mapped bytes in memory at each token's end (cold rows)

    def next_token() -> int:
        # Recent llama-cpp-python keeps no scores unless logits_all: read the context's logits
        # (only the batch's last token has them) and take the argmax: greedy.
        ptr = llama_cpp.llama_get_logits(llm.ctx)
        return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(n_vocab,))))

    def greedy(ids, n_new):
        llm.reset()
        if evict:
            evict()
        b0 = read_bytes()
        t0 = time.perf_counter()
        llm.eval(list(ids))
        token = next_token()
        prefill_s = time.perf_counter() - t0
        prefill_disk = read_bytes() - b0
        tokens, step_s, step_disk = [token], 0.0, 0
        for _ in range(n_new - 1):
            if evict:
                resident.append(mapped_resident_bytes([path]))
                evict()
            b0 = read_bytes()
            t0 = time.perf_counter()
            llm.eval([token])
            token = next_token()
            step_s += time.perf_counter() - t0
            step_disk += read_bytes() - b0
            tokens.append(token)
        steps = max(1, n_new - 1)
        return step_s * 1e3 / steps, prefill_s, len(ids), step_disk / steps, prefill_disk, tokens

    measure = Measure(spec)
    _measured_runs(spec, greedy, measure)
    size = os.path.getsize(path)
    in_memory = mapped_resident_bytes([path])
    return measure.row(weights_bytes=max(resident) if cold and resident else size, weights_total_bytes=size,
                       weights_bytes_measure=("the most of the GGUF's mapping resident at a token's end, before "
                                              "eviction" if cold else "the GGUF file (mapped)"),
                       mapped_resident_bytes_at_end=in_memory, repack=not cold,
                       llama_cpp_version=getattr(llama_cpp, "__version__", None), threads=threads)


# ---- flashjax -------------------------------------------------------------------------------------------


def run_flashjax(spec: dict) -> dict:
    """flashjax dense (from the original model: the same weights transformers loads) or the flash
    engine on the converted model under a budget, cold page cache (FlashOptions(evict_page_cache=True))."""
    import flashjax
    from flashjax.api import LLM
    from flashjax.engine import drain
    from flashjax.flash.budget import BudgetTooSmallError, dense_weight_bytes

    not_fitting = []
    if spec.get("sparsity") == "dense":
        llm = flashjax.load(spec["model"], progress=False)
        flash_dir = None
    else:
        # "candidates": configurations in order of preference; the first that fits the budget runs
        # (the predictors' own memory counts in the budget, so they may not fit a small one).
        candidates = spec.get("candidates") or [{}]
        for cand in candidates:
            spec.update(cand)
            try:
                llm = LLM.load(spec["flash_dir"], sparsity=spec["sparsity"], memory_budget=spec["memory_budget"],
                               verbose=True, evict_page_cache=bool(spec.get("cold")), verify=False,
                               **dict(spec.get("flash_options") or {}))
                break
            except BudgetTooSmallError as e:
                if cand is candidates[-1]:
                    raise
                log(f"  [{spec['label']}] {spec['config']} does not fit: {e}; trying the next configuration")
                not_fitting.append({"config": spec["config"], "reason": str(e)})
        flash_dir = spec["flash_dir"]
    sparsity = spec["sparsity"]
    dense_bytes = dense_weight_bytes(llm.config, "float32")
    runner = llm.runner
    per_step = {"disk": 0, "steps": 0}
    if flash_dir is not None:
        # /proc/self/io around each decode step: the kernel's count beside the engine's own.
        decode = runner.decode

        def counted(*a, **k):
            b0 = read_bytes()
            out = decode(*a, **k)
            per_step["disk"] += read_bytes() - b0
            per_step["steps"] += 1
            return out

        runner.decode = counted
    runs_stats, proc_disk = [], []

    def greedy(ids, n_new):
        if flash_dir is not None and spec.get("cold"):
            page_out([flash_dir])  # the prefill reads cold too
        per_step.update(disk=0, steps=0)
        b0 = read_bytes()
        tokens, stats = drain(llm.generate_ids(ids, max_tokens=n_new, stop_at_eos=False))
        runs_stats.append(stats)
        proc_disk.append(per_step["disk"] / max(1, per_step["steps"]))
        disk = stats.get("bytes_read_per_token", 0) if flash_dir is not None else 0
        prefill_disk = read_bytes() - b0 - per_step["disk"]
        return stats["decode_ms_per_token"], stats["prefill_ms"] / 1e3, len(ids), disk, prefill_disk, tokens

    measure = Measure(spec)
    _measured_runs(spec, greedy, measure)
    measured = runs_stats[1:]  # run 0 is the warm-up
    med = lambda key: summary([s.get(key) for s in measured])["median"]
    # The model's weights: the dense float32 model, or a quantized copy as stored (what its budget is a share of).
    fields = {"sparsity": sparsity, "weights_total_bytes": spec.get("model_bytes") or dense_bytes,
              "proc_read_bytes_per_token": summary(proc_disk[1:])["median"]}
    if flash_dir is None:
        fields.update(weights_bytes=llm.weight_bytes, io_ms=0.0, memory_management_ms=0.0, compute_ms=med("decode_ms_per_token"))
    else:
        # Medians over the measured runs of the engine's per-token means.
        fields.update({k: med(k) for k in (
            "io_ms", "memory_management_ms", "compute_ms", "select_ms", "read_ops_per_token", "neurons_read_per_token",
            "cache_hit_rate", "needed_neurons_per_token", "lookahead_coverage", "lookahead_precision",
            "experts_routed_per_token", "expert_guess_precision", "expert_guess_recall")})
        fields.update({k: measured[-1].get(k) for k in (
            "ffn_bytes", "memory_budget_bytes", "resident_bytes", "cache_rows_per_layer", "weights_bytes")})
        fields["mapped_model_bytes"] = sum(e - s for s, e, _, _ in mapped_ranges([flash_dir]))
    fields["flash_options"] = spec.get("flash_options")
    if not_fitting:
        fields["did_not_fit"] = not_fitting
    close = getattr(runner, "close", None)
    if close:
        close()
    return measure.row(**fields)


RUNNERS = {"flashjax": run_flashjax, "transformers": run_transformers, "accelerate": run_accelerate,
           "llama.cpp": run_llama_cpp}


def run_spec(spec: dict) -> dict:
    """Runs one row in this process; errors become a row with "error"."""
    spec = dict(spec)
    spec.setdefault("label", f"{spec['system']} {spec.get('config') or ''}".strip())
    t0 = time.perf_counter()
    try:
        if spec["system"] == "llama.cpp":
            missing = llama_cpp_available()
            if missing:
                return {"system": "llama.cpp", "config": spec.get("config"), "memory_budget": None,
                        "skipped": missing}
        row = RUNNERS[spec["system"]](spec)
    except Exception as e:  # noqa: BLE001 - a failing system is a row saying why, the others still run
        import traceback
        traceback.print_exc(file=sys.stderr)
        row = {"system": spec["system"], "config": spec.get("config"),
               "memory_budget": spec.get("memory_budget_fraction"), "error": f"{type(e).__name__}: {e}"}
    row["row_wall_s"] = time.perf_counter() - t0
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default=None, help="the row's spec as JSON")
    p.add_argument("--spec-file", default=None, help="the row's spec in a JSON file")
    p.add_argument("--json", action="store_true", help="print the row as one JSON object, the last line of stdout")
    args = p.parse_args(argv)
    if args.spec_file:
        with open(args.spec_file) as f:
            spec = json.load(f)
    elif args.spec:
        spec = json.loads(args.spec)
    else:
        p.error("give --spec or --spec-file")
    row = run_spec(spec)
    print(json.dumps(row) if args.json else row)
    return 0 if "error" not in row else 1


if __name__ == "__main__":
    sys.exit(main())
