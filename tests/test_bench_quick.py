"""The comparison benchmark's machinery (`flashjax bench`: flashjax.bench), fast: the page-out helper really
evicts, and a --quick run of real flashjax and transformers rows on a tiny model writes valid JSON,
markdown and PNG plots. And the rules that keep its figures honest: the oracle (a measuring device) is
never the best row nor counted for a goal, predictor rows run at the engine's default threshold, a goal
whose peer did not run in this run is not measured, and the results name the prompt's file and sha256."""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import types

import pytest

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


def _write_tokenizer(directory, text: str) -> None:
    """A tiny byte-level BPE trained on the prompt text itself: its alphabet is only the bytes it saw, so
    the vocabulary stays under the tiny models' 128 ids and the prompt really is cut from the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=110, show_progress=False))
    assert tok.get_vocab_size() <= 128
    tok.save(str(directory / "tokenizer.json"))


def _tiny_llama64(directory) -> None:
    """A tiny Llama whose rows split into blocks of 32 (d_model 64), so it has q4 and q8 copies, with layers
    enough (6) that half of a layer's I/O in flight and the scratch rows leave room for a cache within the
    quantized copy's own size."""
    import torch
    import transformers
    from conftest import sharpen_for_parity

    torch.manual_seed(12)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
                                   tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    sharpen_for_parity(model)
    model.save_pretrained(directory)


def test_quick_compare_on_tiny_model(tmp_path, capsys):
    from flashjax.bench import compare
    from flashjax.bench.text import PROMPT_PATH
    from flashjax.store import open_flash_model

    model_dir = tmp_path / "tiny"
    _tiny_llama64(model_dir)
    _write_tokenizer(model_dir, PROMPT_PATH.read_text())
    out = tmp_path / "out"
    # The tiny model is almost all embeddings: the smallest working plan needs nearly all of it.
    rc = compare.main(["--model", str(model_dir), "--quick", "--budgets", "100%", "--new-tokens", "6",
                             "--prompt-tokens", "12", "--warmup-tokens", "2", "--systems", "flashjax", "transformers",
                             "--workdir", str(tmp_path / "work"), "--probe-mib", "4", "--out", str(out), "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("machine", "rows", "disk_probe", "goals", "settings", "greedy_agreement", "prompt", "quantized"):
        assert key in result, key
    assert result["machine"]["cpu_count"] and result["disk_probe"]["points"]
    # The prompt: cut from the text shipped in the package, named with its sha256.
    prompt = result["prompt"]
    assert prompt["path"] == "flashjax/bench/data/prompt.txt" and prompt["built_in"] and prompt["tokens"] == 12
    assert prompt["sha256"] == hashlib.sha256(PROMPT_PATH.read_bytes()).hexdigest()
    rows = {(r["system"], r["config"]): r for r in result["rows"]}
    flash = [r for r in result["rows"] if r["system"] == "flashjax" and not r.get("quant")]
    assert [r["config"] for r in flash][:2] == ["dense", "naive"] and len(flash) == 3, [r.get("error") for r in flash]
    for r in result["rows"]:
        assert not r.get("error") and not r.get("skipped"), r
        for key in ("system", "config", "memory_budget", "decode_ms_per_token", "prefill_tokens_per_s",
                    "disk_bytes_per_token", "peak_rss_bytes", "weights_bytes", "weights_total_bytes"):
            assert key in r, (key, r)
        assert r["decode_ms_per_token"] > 0 and r["prefill_tokens_per_s"] > 0 and r["peak_rss_bytes"] > 0
        assert r["weights_bytes"] > 0 and r["weights_share"] > 0
        assert len(r["tokens"]) == 6
    for r in flash[1:]:
        assert r["memory_budget"] == 1.0 and r["cold_page_cache"]
        assert r["disk_bytes_per_token"] > 0 and r["io_ms"] is not None and r["compute_ms"] is not None
    assert rows[("flashjax", "dense")]["memory_budget"] is None
    # Not calibrated and --quick: the best sparse row is hybrid; the oracle runs only in full runs.
    assert flash[2]["sparsity"] == "hybrid" and flash[2]["best_sparse"]
    assert flash[2]["memory_budget_bytes"] == result["dense_weight_bytes"]  # bytes, the same for every system
    # The quantized copies (default q4 and q8), converted into the work directory: dense in memory for both,
    # q4 also under the budget, a share of the q4 copy as stored.
    assert result["settings"]["quant"] == ["q4", "q8"] and result["settings"]["quant_sparse"] == ["q4"]
    quant = [r for r in result["rows"] if r.get("quant")]
    assert [(r["quant"], r["sparsity"]) for r in quant] == [("q4", "dense"), ("q4", "hybrid"), ("q8", "dense")]
    for kind in ("q4", "q8"):
        q = result["quantized"][kind]
        assert q["flash_dir"] == str(tmp_path / "work" / f"flash-{kind}") and q["dtype"] == kind
        assert q["stored_weight_bytes"] == open_flash_model(q["flash_dir"], verify=False).stored_weight_bytes()
        dense_q = rows[("flashjax", f"{kind} dense (in memory)")]
        assert dense_q["weights_total_bytes"] == q["stored_weight_bytes"]
        assert dense_q["weights_bytes"] < rows[("flashjax", "dense")]["weights_bytes"] / 3
        assert dense_q["agreement"]["expected_identical"] is False
    q4_sparse = quant[1]
    assert q4_sparse["best_sparse"] and q4_sparse["memory_budget"] == 1.0 and q4_sparse["cold_page_cache"]
    assert q4_sparse["memory_budget_bytes"] == result["quantized"]["q4"]["stored_weight_bytes"]
    assert q4_sparse["budget_basis"] == "q4 as stored" and "@ 100% of q4 as stored" in q4_sparse["label"]
    assert q4_sparse["disk_bytes_per_token"] > 0 and q4_sparse["weights_total_bytes"] == q4_sparse["memory_budget_bytes"]
    # The exact (hybrid) q4 row streams what the q4 dense row holds: the same greedy tokens.
    assert q4_sparse["tokens"] == quant[0]["tokens"]
    hf = next(r for r in result["rows"] if r["system"] == "transformers")
    assert hf["agreement"]["first_difference"] is None  # same weights, same greedy tokens
    # No accelerate, no llama.cpp, no 50% or 80% budget in this run: no goal is judged, none against
    # a figure remembered from elsewhere.
    assert len(result["goals"]) == 6 and all(g["met"] is None for g in result["goals"]), result["goals"]
    assert "llama_cpp_cold_reference_ms" not in result
    # The report: markdown with the prompt's source and the results table, and real PNG files.
    md = (out / "results.md").read_text()
    assert prompt["sha256"] in md and "flashjax/bench/data/prompt.txt" in md
    assert "100% of q4 as stored" in md
    header = next(line for line in md.splitlines() if line.startswith("| system |"))
    table = md[md.index(header):].split("\n\n")[0].splitlines()
    assert len(table) == 2 + len(result["rows"])
    assert all(line.count("|") == header.count("|") for line in table)
    for name in ("latency_vs_memory.png", "latency_breakdown.png", "disk_probe.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, name
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] and saved["prompt"]["sha256"] == prompt["sha256"]


def _row(sparsity, budget, ms, **extra):
    return dict(system="flashjax", sparsity=sparsity, config=sparsity, memory_budget=budget, decode_ms_per_token=ms,
                sparse_candidate=True, series="flashjax best sparse (cold)", **extra)


def test_best_sparse_is_the_fastest_candidate_at_each_budget():
    from flashjax.bench.compare import pick_best_sparse

    rows = [_row("predictor", 0.5, 300.0), _row("hybrid", 0.5, 140.0), _row("predictor", 0.8, 90.0),
            _row("hybrid", 0.8, 100.0), _row("hybrid", 0.65, None, error="BudgetTooSmallError: ...")]
    pick_best_sparse(rows)
    assert [r["best_sparse"] for r in rows] == [False, True, True, False, False]
    assert rows[0]["series"] == "flashjax predictor (cold, not the best)"
    assert rows[1]["series"] == "flashjax best sparse (cold)"


@pytest.mark.parametrize("marked", [True, False])  # False: results written before oracle rows were marked
def test_pick_best_sparse_never_picks_the_oracle(marked):
    from flashjax.bench.compare import ORACLE_SERIES, pick_best_sparse

    oracle = {"measuring_device": True} if marked else {}
    rows = [_row("oracle", 0.5, 10.0, **oracle), _row("predictor", 0.5, 300.0), _row("oracle", 0.8, 5.0, **oracle)]
    pick_best_sparse(rows)
    assert [r["best_sparse"] for r in rows] == [False, True, False]  # at 80% only the oracle ran: no best
    assert rows[0]["series"] == rows[2]["series"] == ORACLE_SERIES


def _goals(rows):
    from flashjax.bench.compare import GOALS, goals, pick_best_sparse

    pick_best_sparse(rows)
    return {g["goal"]: g for g in goals(rows)}, GOALS


def test_a_goal_whose_peer_did_not_run_is_not_measured():
    dense = {"system": "flashjax", "config": "dense", "sparsity": "dense", "memory_budget": None,
             "decode_ms_per_token": 50.0}
    llama_failed = {"system": "llama.cpp", "config": "mmap, cold", "memory_budget": None, "cold_page_cache": True,
                    "skipped": "llama-cpp-python is not importable"}
    rows = [dense, _row("predictor", 0.5, 60.0), _row("predictor", 0.8, 55.0), llama_failed]
    by_goal, spec = _goals(rows)
    accelerate, llama, own = (by_goal[g.text] for g in spec[:3])
    assert accelerate["met"] is None and "of accelerate disk offload at 50% in this run" in accelerate["detail"]
    assert llama["met"] is None and "of llama.cpp with a cold page cache in this run" in llama["detail"]
    assert own["met"] is True and own["ratio"] == pytest.approx(55.0 / 50.0)


def test_the_oracle_never_counts_for_a_goal():
    peers = [{"system": "accelerate", "config": "disk offload", "memory_budget": 0.5, "decode_ms_per_token": 1000.0},
             {"system": "llama.cpp", "config": "mmap, cold", "memory_budget": None, "cold_page_cache": True,
              "decode_ms_per_token": 80.0}]
    by_goal, spec = _goals([_row("oracle", 0.5, 10.0, measuring_device=True), *peers])
    assert all(by_goal[g.text]["met"] is None for g in spec[:2])  # only the oracle ran at 50%
    by_goal, _ = _goals([_row("oracle", 0.5, 10.0, measuring_device=True), _row("hybrid", 0.5, 100.0), *peers])
    accelerate, llama = by_goal[spec[0].text], by_goal[spec[1].text]
    assert accelerate["met"] is True and accelerate["ratio"] == pytest.approx(10.0)  # hybrid's, not the oracle's
    assert llama["met"] is False and llama["ratio"] == pytest.approx(0.8)


def _llama(cold, ms, disk=None, **extra):
    return dict(system="llama.cpp", config="mmap, cold" if cold else "in memory", memory_budget=None,
                cold_page_cache=cold, decode_ms_per_token=ms, disk_bytes_per_token=disk, **extra)


def _q4(sparsity, budget, ms, disk=None, **extra):
    return dict(_row(sparsity, budget, ms, **extra), quant="q4", config=f"q4 {sparsity}", disk_bytes_per_token=disk,
                series="flashjax q4 best sparse (cold)")


def _quant_goals(by_goal, spec):
    return [by_goal[g.text] for g in spec[3:]]  # q4 sparse vs llama.cpp cold, q4 dense vs in memory, bytes


def test_quantized_goals_judge_the_q4_rows_against_llama_cpp():
    q4_dense = {"system": "flashjax", "config": "q4 dense (in memory)", "sparsity": "dense", "quant": "q4",
                "memory_budget": None, "decode_ms_per_token": 30.0}
    rows = [_row("hybrid", 0.5, 20.0),  # the float16 copy's best: faster, but not a q4 row
            _q4("predictor", 0.5, 40.0, disk=20e6), _q4("hybrid", 0.5, 50.0, disk=10e6),
            _q4("hybrid", 0.65, 25.0, disk=5e6), q4_dense,
            _llama(False, 20.0, disk=0), _llama(True, 150.0, disk=100e6)]
    by_goal, spec = _goals(rows)
    assert [r.get("best_sparse") for r in rows[:4]] == [True, True, False, True]  # each copy, each budget apart
    assert rows[2]["series"] == "flashjax q4 hybrid (cold, not the best)"
    speed, in_memory, reads = _quant_goals(by_goal, spec)
    # (a) the q4 best sparse at 50% (predictor, 40 ms) against llama.cpp cold: 3.75x, met; not the float16 row.
    assert speed["met"] is True and speed["ratio"] == pytest.approx(150.0 / 40.0)
    assert "q4 predictor" in speed["detail"] and "40.0 vs 150.0 ms/token" in speed["detail"]
    # (b) q4 dense 30 ms against llama.cpp in memory 20 ms: 1.5x its time, within 2x.
    assert in_memory["met"] is True and in_memory["ratio"] == pytest.approx(1.5)
    # (c) bytes of that same best row (20 MB) against llama.cpp cold's /proc/self/io (100 MB): 5x fewer.
    assert reads["met"] is True and reads["ratio"] == pytest.approx(5.0) and "20.00 vs 100.00 MB/token" in reads["detail"]
    # The float16 goals still judge the float16 row.
    assert by_goal[spec[1].text]["ratio"] == pytest.approx(150.0 / 20.0)


def test_quantized_goals_missed_and_not_measured():
    q4_dense = {"system": "flashjax", "config": "q4 dense (in memory)", "sparsity": "dense", "quant": "q4",
                "memory_budget": None, "decode_ms_per_token": 90.0}
    # Missed: 2x faster only, 3x llama.cpp's time in memory, 2x fewer bytes.
    by_goal, spec = _goals([_q4("hybrid", 0.5, 50.0, disk=50e6), q4_dense,
                            _llama(False, 30.0, disk=0), _llama(True, 100.0, disk=100e6)])
    assert [g["met"] for g in _quant_goals(by_goal, spec)] == [False, False, False]
    assert [g["ratio"] for g in _quant_goals(by_goal, spec)] == pytest.approx([2.0, 3.0, 2.0])
    # llama.cpp not installed: every quantized goal not measured, none met or missed against a remembered figure.
    skipped = [dict(_llama(c, None), skipped="llama-cpp-python is not importable") for c in (False, True)]
    by_goal, spec = _goals([_q4("hybrid", 0.5, 50.0, disk=50e6), dict(q4_dense), *skipped])
    assert all(g["met"] is None and g["ratio"] is None for g in _quant_goals(by_goal, spec))
    assert "of llama.cpp in memory in this run" in _quant_goals(by_goal, spec)[1]["detail"]
    # No configuration fits 50% of the q4 copy: not measured, and the detail says why.
    too_small = "BudgetTooSmallError: memory budget of 279.5 MB is too small: the minimum is 338.3 MB"
    by_goal, spec = _goals([dict(_q4("hybrid", 0.5, None), error=too_small), _llama(True, 100.0, disk=100e6)])
    speed, _, reads = _quant_goals(by_goal, spec)
    assert speed["met"] is None and reads["met"] is None and too_small in speed["detail"] and too_small in reads["detail"]
    # Only a q4 row at 65% (or a float16 one at 50%): nothing at 50% of q4 for goals (a) and (c).
    by_goal, spec = _goals([_q4("hybrid", 0.65, 10.0, disk=1e6), _row("hybrid", 0.5, 10.0),
                            _llama(True, 100.0, disk=100e6)])
    speed, _, reads = _quant_goals(by_goal, spec)
    assert speed["met"] is None and reads["met"] is None and "flashjax q4 best sparse at 50%" in speed["detail"]
    # A row without the goal's figure (no bytes counted) is not measured either; reading nothing meets it.
    by_goal, spec = _goals([_q4("hybrid", 0.5, 10.0, disk=0), _llama(True, 100.0, disk=None)])
    assert _quant_goals(by_goal, spec)[2]["met"] is None
    by_goal, spec = _goals([_q4("hybrid", 0.5, 10.0, disk=0), _llama(True, 100.0, disk=100e6)])
    assert _quant_goals(by_goal, spec)[2]["met"] is True and _quant_goals(by_goal, spec)[2]["ratio"] is None
    # The oracle is never the q4 row of a goal.
    by_goal, spec = _goals([_q4("oracle", 0.5, 1.0, disk=1, measuring_device=True), _llama(True, 100.0, disk=100e6)])
    assert all(g["met"] is None for g in _quant_goals(by_goal, spec))


def test_quantized_rows_budgets_are_shares_of_the_copy_as_stored(monkeypatch):
    import flashjax.sparsity
    from flashjax.bench.compare import build_specs, quant_formats

    monkeypatch.setattr(flashjax.sparsity, "has_predictors", lambda path: False)
    args = types.SimpleNamespace(new_tokens=4, runs=1, warmup_tokens=1, budgets=["50%", "65%"], quick=False,
                                 systems=["flashjax"], no_naive=True, no_float=False)
    info = {"dense_weight_bytes": 1000, "quantized": {
        "q4": {"flash_dir": "/w/flash-q4", "stored_weight_bytes": 200, "sparse": True, "calibrated": True},
        "q8": {"flash_dir": "/w/flash-q8", "stored_weight_bytes": 300, "sparse": False, "calibrated": False},
        "q2": {"flash_dir": "/w/flash-q2", "sparse": True, "error": "ConvertError: rows of 48"}}}
    specs = [s for s in build_specs(args, "/m.gguf", "/w/flash", [1], info, "/tmp") if s.get("quant")]
    dense = [s for s in specs if s.get("sparsity") == "dense"]
    assert [(s["quant"], s["model"], s["model_bytes"]) for s in dense] == [("q4", "/w/flash-q4", 200),
                                                                          ("q8", "/w/flash-q8", 300)]
    assert dense[0]["plot_x"] == pytest.approx(0.2) and dense[0]["label"] == "flashjax q4 dense (in memory)"
    sparse = [s for s in specs if s.get("sparse_candidate")]
    # q4 only (q8 is not in --quant-sparse), predictor and hybrid apart at each budget, in bytes of the copy.
    assert [(s["memory_budget_fraction"], s["memory_budget"], [c["sparsity"] for c in s["candidates"]])
            for s in sparse] == [(0.5, 100, ["predictor"]), (0.5, 100, ["hybrid"]),
                                 (0.65, 130, ["predictor"]), (0.65, 130, ["hybrid"])]
    assert all(s["flash_dir"] == "/w/flash-q4" and s["cold"] and s["budget_basis"] == "q4 as stored" for s in sparse)
    assert all(c["config"].startswith("q4 ") for s in sparse for c in s["candidates"])
    assert sparse[0]["label"] == "flashjax q4 best sparse @ 50% of q4 as stored"
    assert sparse[0]["plot_x"] == pytest.approx(0.1)
    failed = [s for s in specs if s["quant"] == "q2"]
    assert len(failed) == 1 and "ConvertError" in failed[0]["skip"]
    # --no-float: the same quantized rows and no float one
    args.no_float = True
    only_quant = build_specs(args, "/m.gguf", "/w/flash", [1], info, "/tmp")
    assert [s["label"] for s in only_quant] == [s["label"] for s in specs]
    # --quant / --quant-sparse
    assert quant_formats(None, None) == (["q4", "q8"], ["q4"])
    assert quant_formats(["q8"], None) == (["q8"], [])
    assert quant_formats(["none"], None) == ([], [])
    assert quant_formats(["q8", "q4"], ["q4", "q8"]) == (["q4", "q8"], ["q4", "q8"])
    assert quant_formats(None, ["none"]) == (["q4", "q8"], [])


def test_sparse_rows_run_at_the_engines_default_threshold_and_the_oracle_apart(monkeypatch):
    import flashjax.sparsity
    from flashjax.bench.compare import build_specs
    from flashjax.flash.runner import FlashOptions

    monkeypatch.setattr(flashjax.sparsity, "has_predictors", lambda path: True)
    args = types.SimpleNamespace(new_tokens=4, runs=1, warmup_tokens=1, budgets=["50%", "80%"], quick=False,
                                 systems=["flashjax"], no_naive=True, no_float=False)
    specs = build_specs(args, "/nowhere/model.gguf", "/nowhere/flash", [1, 2, 3], {"dense_weight_bytes": 1}, "/tmp")
    candidates = [c for s in specs for c in s.get("candidates", [])]
    assert {c["sparsity"] for c in candidates} == {"predictor", "hybrid"}
    for c in candidates:
        if c["sparsity"] == "predictor":
            assert c["flash_options"]["predictor_threshold"] == FlashOptions.predictor_threshold
            assert f"threshold {FlashOptions.predictor_threshold:g}" in c["config"]
    oracle = [s for s in specs if s.get("sparsity") == "oracle"]
    assert len(oracle) == 2 and all(s["measuring_device"] and not s.get("sparse_candidate") for s in oracle)
    assert all("measuring device" in s["config"] for s in oracle)
    args.quick = True
    specs = build_specs(args, "/nowhere/model.gguf", "/nowhere/flash", [1, 2, 3], {"dense_weight_bytes": 1}, "/tmp")
    assert not any(s.get("sparsity") == "oracle" or s.get("measuring_device") for s in specs)
    assert [[c["sparsity"] for c in s["candidates"]] for s in specs if "candidates" in s] == [["predictor", "hybrid"]] * 2


def test_report_names_the_prompt_and_marks_the_oracle():
    from flashjax.bench.common import prompt_record
    from flashjax.bench.report import markdown

    ok = {"decode_ms_per_token": 10.0, "prefill_tokens_per_s": 100.0, "peak_rss_bytes": 1e6, "disk_bytes_per_token": 0}
    rows = [dict(_row("oracle", 0.5, 5.0, measuring_device=True), **ok),
            dict(_row("hybrid", 0.5, 10.0, best_sparse=True), **ok)]
    prompt = prompt_record([5, 6, 7])
    md = markdown({"model": "m", "rows": rows, "prompt": prompt})
    assert prompt["sha256"] in md and "the first 3 tokens of flashjax/bench/data/prompt.txt" in md
    lines = [line for line in md.splitlines() if line.startswith("| flashjax |")]
    assert "(measuring device)" in lines[0] and "best sparse" not in lines[0]
    assert "**best sparse**" in lines[1]


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
    from flashjax.bench.common import prompt_ids, prompt_text, text_source
    from flashjax.bench.text import PROMPT_NAME, PROMPT_PATH

    class Words:  # a stand-in tokenizer: one id per word
        def encode(self, text, add_special_tokens=False):
            return [len(w) for w in text.split()]

    assert len(prompt_text().split()) > 1000
    assert prompt_ids(Words(), 128) == [len(w) for w in prompt_text().split()][:128]
    # A file inside the package (shipped as package data), named the same on every machine.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert PROMPT_PATH.samefile(os.path.join(root, PROMPT_NAME))
    assert text_source() == {"path": PROMPT_NAME, "built_in": True, "bytes": PROMPT_PATH.stat().st_size,
                             "sha256": hashlib.sha256(PROMPT_PATH.read_bytes()).hexdigest()}
    own = tmp_path / "prompt.txt"
    own.write_text("one two three four")
    assert prompt_ids(Words(), 3, own) == [3, 3, 5]
    assert text_source(own)["path"] == str(own) and not text_source(own)["built_in"]


def test_compare_script_adds_only_the_shared_calibration_text():
    """benchmarks/bench_compare.py: `flashjax bench` with ../shared/data's calibration text as its default,
    when present; the prompt stays the package's own, so a figure can be reproduced from the repository."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench_compare.py")
    spec = importlib.util.spec_from_file_location("bench_compare_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = script.with_shared_texts(["--quick", "--prompt-text", "mine.txt"])
    assert argv[-3:] == ["--quick", "--prompt-text", "mine.txt"]  # given options come last: they win
    added = argv[:-3]
    assert "--prompt-text" not in script.with_shared_texts([])
    assert all(os.path.isfile(p) for p in added[1::2]) and set(added[::2]) <= {"--calibration-text"}
