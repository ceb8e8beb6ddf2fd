"""The comparison benchmark's machinery (`flashjax bench`: flashjax.bench), fast: the page-out helper really
evicts, and a --quick run of real flashjax and transformers rows on a tiny model writes valid JSON,
markdown and PNG plots."""

from __future__ import annotations

import ctypes
import json
import mmap
import os

import pytest
from conftest import build_tiny
from flashjax.bench import peers
from flashjax.bench.compare import disk_info

PAGE = mmap.PAGESIZE


def _smaps_rss_kib(path: str) -> list[int]:
    """Rss (kB) of each of this process's mappings of `path`."""
    out, current = [], False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5 and ":" in head[3]:  # a mapping's header line
                current = len(head) >= 6 and head[5] == path
            elif current and line.startswith("Rss:"):
                out.append(int(head[1]))
    return out


def _fstype(path) -> str:
    """The type of the filesystem holding `path` (the package's own mount lookup)."""
    return disk_info(str(path)).get("fstype", "")


def _resident_pages(mm: mmap.mmap, length: int) -> int:
    """Pages of a (writable) mapping in memory, by mincore(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    buf = ctypes.c_char.from_buffer(mm)
    try:
        vec = (ctypes.c_ubyte * ((length + PAGE - 1) // PAGE))()
        assert libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(length), vec) == 0
        return sum(v & 1 for v in vec)
    finally:
        del buf


def test_page_out_evicts_mapped_file(tmp_path):
    path = str(tmp_path / "weights.bin")
    size = 256 * PAGE
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    with open(path, "rb") as f:
        ro = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)  # llama.cpp, np.memmap(mode="r")
        cow = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # safetensors' private mapping
    try:
        total = sum(ro[i] + cow[i] for i in range(0, size, PAGE))  # touch every page of both
        assert total >= 0
        rss = _smaps_rss_kib(path)
        assert len(rss) == 2 and all(kib * 1024 >= size for kib in rss), rss
        assert {(s, e) for s, e, _, _ in peers.mapped_ranges([str(tmp_path)])}.__len__() == 2
        done = peers.page_out([str(tmp_path)])  # a directory: every file under it
        assert done["mappings"] == 2 and done["files"] == 1
        assert _smaps_rss_kib(path) == [0, 0]
        if _fstype(path) not in ("tmpfs", "ramfs", "overlay"):
            # Out of the page cache too: a new access finds nothing resident.
            assert _resident_pages(cow, size) == 0
        assert bytes(ro[:16]) == bytes(cow[:16])  # still readable: it faults back in from the file
    finally:
        ro.close()
        cow.close()


def test_process_counters():
    assert peers.rss_bytes() > 0
    assert peers.peak_rss() >= peers.rss_bytes() * 0.5
    before = peers.read_bytes()
    assert before >= 0
    assert peers.summary([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": 3}


def test_quick_compare_on_tiny_model(tmp_path, capsys):
    from flashjax.bench import compare

    model_dir = tmp_path / "tiny"
    build_tiny("llama_gqa", model_dir)
    out = tmp_path / "out"
    # The tiny model is almost all embeddings: the smallest working plan needs nearly all of it.
    rc = compare.main(["--model", str(model_dir), "--quick", "--budgets", "100%", "--new-tokens", "6",
                             "--prompt-tokens", "12", "--warmup-tokens", "2", "--systems", "flashjax", "transformers",
                             "--workdir", str(tmp_path / "work"), "--probe-mib", "4", "--out", str(out), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("machine", "rows", "disk_probe", "goals", "settings", "greedy_agreement"):
        assert key in result, key
    assert result["machine"]["cpu_count"] and result["disk_probe"]["points"]
    rows = {(r["system"], r["config"]): r for r in result["rows"]}
    flash = [r for r in result["rows"] if r["system"] == "flashjax"]
    assert [r["config"] for r in flash][:2] == ["dense", "naive"] and len(flash) == 3, [r.get("error") for r in flash]
    for r in result["rows"]:
        assert not r.get("error"), r
        for key in ("system", "config", "memory_budget", "decode_ms_per_token", "prefill_tokens_per_s",
                    "disk_bytes_per_token", "peak_rss_bytes"):
            assert key in r, (key, r)
        assert r["decode_ms_per_token"] > 0 and r["prefill_tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0
        assert len(r["tokens"]) == 6
    for r in flash[1:]:
        assert r["memory_budget"] == 1.0 and r["cold_page_cache"]
        assert r["disk_bytes_per_token"] > 0 and r["io_ms"] is not None and r["compute_ms"] is not None
    assert rows[("flashjax", "dense")]["memory_budget"] is None
    hf = next(r for r in result["rows"] if r["system"] == "transformers")
    assert hf["agreement"]["first_difference"] is None  # same weights, same greedy tokens
    # The report: markdown with the results table, and real PNG files.
    md = (out / "results.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| system |"))
    table = md[md.index(header):].split("\n\n")[0].splitlines()
    assert len(table) == 2 + len(result["rows"])
    assert all(line.count("|") == header.count("|") for line in table)
    for name in ("latency_vs_memory.png", "latency_breakdown.png", "disk_probe.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
    assert json.loads((out / "results.json").read_text())["rows"]


def test_best_sparse_is_the_fastest_candidate_at_each_budget():
    from flashjax.bench.compare import pick_best_sparse

    def row(sparsity, budget, ms, **extra):
        return dict(system="flashjax", sparsity=sparsity, memory_budget=budget, decode_ms_per_token=ms,
                    sparse_candidate=True, series="flashjax best sparse (cold)", **extra)

    rows = [row("predictor", 0.5, 300.0), row("hybrid", 0.5, 140.0), row("predictor", 0.8, 90.0),
            row("hybrid", 0.8, 100.0), row("hybrid", 0.65, None, error="BudgetTooSmallError: ...")]
    pick_best_sparse(rows)
    assert [r["best_sparse"] for r in rows] == [False, True, True, False, False]
    assert rows[0]["series"] == "flashjax predictor (cold, not the best)"
    assert rows[1]["series"] == "flashjax best sparse (cold)"


def test_cli_bench_runs_the_package_runner(monkeypatch):
    """`flashjax bench ARGS` hands ARGS to flashjax.bench.compare.main: no repository needed."""
    from flashjax import cli
    from flashjax.bench import compare

    seen = []
    monkeypatch.setattr(compare, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["bench", "--quick", "--model", "m.gguf", "--budgets", "50%"]) == 0
    assert seen == [["--quick", "--model", "m.gguf", "--budgets", "50%"]]


def test_plots_without_matplotlib_fail_before_the_run(monkeypatch, tmp_path):
    from flashjax.bench import compare, report

    monkeypatch.setattr(report, "plots_available", lambda: False)
    monkeypatch.setattr(compare, "resolve_model", lambda m: pytest.fail("the run started"))
    with pytest.raises(RuntimeError, match="matplotlib"):
        compare.main(["--quick", "--out", str(tmp_path / "out")])


def test_prompt_text_is_the_packages_own_unless_given(tmp_path):
    from flashjax.bench.common import prompt_ids, prompt_text

    class Words:  # a stand-in tokenizer: one id per word
        def encode(self, text, add_special_tokens=False):
            return [len(w) for w in text.split()]

    assert len(prompt_text().split()) > 1000
    assert prompt_ids(Words(), 128) == [len(w) for w in prompt_text().split()][:128]
    own = tmp_path / "prompt.txt"
    own.write_text("one two three four")
    assert prompt_ids(Words(), 3, own) == [3, 3, 5]


def test_compare_script_adds_the_shared_texts_it_finds():
    """benchmarks/bench_compare.py: `flashjax bench` with ../shared/data's texts as defaults, when present."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_compare.py")
    spec = importlib.util.spec_from_file_location("bench_compare_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = script.with_shared_texts(["--quick", "--prompt-text", "mine.txt"])
    assert argv[-3:] == ["--quick", "--prompt-text", "mine.txt"]  # given options come last: they win
    added = argv[:-3]
    assert "--prompt-text" not in added
    assert all(os.path.isfile(p) for p in added[1::2]) and set(added[::2]) <= {"--calibration-text"}
