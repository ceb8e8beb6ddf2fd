"""The comparison's report: a markdown page and PNG plots (matplotlib, Agg backend) from results.json.

    python benchmarks/report.py results.json --out DIR      # (re)writes DIR/results.md and the PNGs
    python -m flashjax.bench.report results.json --out DIR  # the same, without the repository

Plots: latency per token against the weights' memory budget for every system (the paper's
latency-vs-DRAM-share figure; systems without a budget are drawn at 100% or as horizontal
reference lines), the flashjax rows' per-token latency split into I/O, memory management and
compute (stacked bars), and the disk probe's throughput by chunk size. matplotlib is optional
(`pip install matplotlib`, or the `bench` extra): it is imported only to draw, and its absence is
a clear error (`plots_available()` tells beforehand).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

MB = 1e6
MATPLOTLIB_MISSING = ("the benchmark's PNG plots need matplotlib, which is not installed: "
                      "pip install matplotlib (or flashjax[bench])")


def _f(x, fmt="{:.1f}", none="-"):
    return none if x is None else fmt.format(x)


def budget_text(r: dict) -> str | None:
    """A row's budget: a share of the dense float32 model, or, for a quantized copy, "of q4 as stored"."""
    budget = r.get("memory_budget")
    if budget is None:
        return None
    return f"{budget:.0%}" + (f" of {r['budget_basis']}" if r.get("budget_basis") else "")


def row_label(r: dict) -> str:
    budget = budget_text(r)
    return f"{r['system']} {r.get('config') or ''}".strip() + (f" @ {budget}" if budget is not None else "")


def is_measuring_device(r: dict) -> bool:
    """The oracle finds each token's active neurons with a full dense computation held outside the budget
    and run outside the timings: it shows what a perfect predictor could do, and no user can run it. So
    it is never a best row and never counts for a goal (also in results written before it was marked)."""
    return bool(r.get("measuring_device")) or r.get("sparsity") == "oracle"


def config_cell(r: dict) -> str:
    """The configuration as the table shows it: which row is the best sparse one at its budget, and
    which is the oracle."""
    text = r.get("config") or ""
    if is_measuring_device(r):
        return text + ("" if "measuring device" in text else " (measuring device)")
    return text + (" — **best sparse**" if r.get("best_sparse") else "")


def _status(r: dict) -> str | None:
    if r.get("skipped"):
        return f"skipped: {r['skipped']}"
    if r.get("error"):
        return f"error: {r['error']}"
    return None


def results_table(result: dict) -> str:
    lines = ["| system | configuration | budget | decode ms/token (median, min-max) | prefill tok/s | disk MB/token "
             "| peak RSS MB | weights in memory MB (share of model) | I/O / mem. mgmt / compute ms | greedy tokens vs flashjax dense "
             "| CPU used by other work |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        budget = budget_text(r) or "-"
        status = _status(r)
        if status:
            lines.append(f"| {r['system']} | {config_cell(r)} | {budget} | {status} ||||||||")
            continue
        spread = r.get("decode_ms_spread") or {}
        dec = _f(r.get("decode_ms_per_token"))
        if spread.get("runs", 0) > 1:
            dec += f" ({_f(spread['min'])}-{_f(spread['max'])}, {spread['runs']} runs)"
        share = r.get("weights_share")
        weights = "-" if r.get("weights_bytes") is None else (
            f"{r['weights_bytes'] / MB:.{0 if r['weights_bytes'] >= 10 * MB else 2}f}" + ("" if share is None else f" ({share:.0%})"))
        split = "-"
        if r["system"] == "flashjax" and r.get("io_ms") is not None:
            split = f"{r['io_ms']:.1f} / {r['memory_management_ms']:.1f} / {r['compute_ms']:.1f}"
        agree = r.get("agreement")
        agree_s = "-" if agree is None else ("reference" if agree.get("reference") else (
            f"identical ({agree['compared']})" if agree["first_difference"] is None
            else f"differ from token {agree['first_difference']} of {agree['compared']}"))
        lines.append(f"| {r['system']} | {config_cell(r)} | {budget} | {dec} | {_f(r.get('prefill_tokens_per_s'), '{:.0f}')} "
                     f"| {_f(None if r.get('disk_bytes_per_token') is None else r['disk_bytes_per_token'] / MB, '{:.2f}')} "
                     f"| {_f(None if r.get('peak_rss_bytes') is None else r['peak_rss_bytes'] / MB, '{:.0f}')} "
                     f"| {weights} | {split} | {agree_s} | {_f(r.get('other_cpu_share'), '{:.0%}')} |")
    return "\n".join(lines)


def io_ceiling_table(result: dict) -> str | None:
    rows = [r for r in result["rows"] if r.get("io_ceiling")]
    if not rows:
        return None
    lines = ["| flashjax row | MB read/token | reads/token | mean read KiB | probe chunk KiB | probe MB/s (best in flight) "
             "| bytes ÷ throughput ms | I/O wait ms spent | share of ceiling |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["io_ceiling"]
        lines.append(f"| {row_label(r)} | {r['disk_bytes_per_token'] / MB:.2f} | {_f(r.get('read_ops_per_token'), '{:.0f}')} "
                     f"| {c['mean_read_bytes'] / 1024:.0f} | {c['chunk_bytes'] // 1024} | {c['mb_per_s']:.0f} "
                     f"| {c['ceiling_io_ms']:.1f} | {r['io_ms']:.1f} | {_f(c.get('efficiency'), '{:.0%}')} |")
    return "\n".join(lines)


def goals_section(result: dict) -> list[str]:
    out = []
    for g in result.get("goals", []):
        mark = {True: "met", False: "NOT met", None: "not measured"}[g.get("met")]
        out.append(f"- **{mark}** — {g['goal']}: {g['detail']}")
    return out


def agreement_section(result: dict) -> list[str]:
    ag = result.get("greedy_agreement")
    if not ag:
        return []
    out = [f"Reference: {ag['reference']} ({ag['compared_tokens']} tokens per run compared)."]
    for item in ag["rows"]:
        what = "identical" if item["first_difference"] is None else f"first differs at token {item['first_difference']}"
        exp = " (expected to agree)" if item.get("expected") else " (sparse: may differ)"
        out.append(f"- {item['label']}: {what}{exp}")
    return out


def prompt_line(prompt: dict | None) -> str | None:
    """Where the prompt came from: the file and its sha256 (results.json holds the same record)."""
    if not prompt:
        return None
    line = f"Prompt, the same token ids for every system: {prompt.get('source') or prompt.get('path')}"
    if prompt.get("built_in"):
        line += " (shipped in the flashjax package)"
    if prompt.get("sha256"):
        line += f", sha256 `{prompt['sha256']}`"
    return line + "."


def calibration_line(calibration: dict | None) -> str | None:
    if not (calibration or {}).get("predictors"):
        return None
    line = f"Predictors: {calibration['predictors']}"
    if calibration.get("path"):
        line += f", on {calibration['path']} (sha256 `{calibration['sha256']}`)"
    elif calibration.get("source"):
        line += f", on {calibration['source']}"
    return line + "."


def quantized_basis(result: dict) -> str:
    """The quantized copies' sizes as stored, which their rows' budgets are shares of."""
    sizes = [f"{k} {q['stored_weight_bytes'] / MB:.0f} MB" for k, q in (result.get("quantized") or {}).items()
             if q.get("stored_weight_bytes")]
    return f"; the quantized copies' rows, of that copy's weights as stored ({', '.join(sizes)})" if sizes else ""


def markdown(result: dict, plots: dict | None = None) -> str:
    m = result.get("machine", {})
    s = result.get("settings", {})
    parts = [f"# flashjax beside the alternatives: {result.get('model')}", "",
             f"Machine: {m.get('cpu_model', m.get('processor', '?'))}, {m.get('cpu_count')} CPUs, "
             f"{(m.get('ram_bytes') or 0) / 2**30:.1f} GiB RAM; {m.get('platform', '')}; "
             f"disk: {m.get('disk', {}).get('device', '?')} ({m.get('disk', {}).get('fstype', '?')}); "
             f"load average {_f((m.get('loadavg_start') or [None])[0], '{:.1f}')} at the start, "
             f"{_f((m.get('loadavg_end') or [None])[0], '{:.1f}')} at the end.", "",
             f"Prompt {s.get('prompt_tokens')} tokens, {s.get('new_tokens')} generated greedily, batch 1; "
             f"warm-up then {s.get('runs')} measured run(s) per system; each system in its own process. "
             f"Budgets are shares of the dense float32 model's weights ({(result.get('dense_weight_bytes') or 0) / MB:.0f} MB)"
             + quantized_basis(result) + ". "
             "Cold rows evict the weights' files from the page cache before every token (outside the timings).", ""]
    for line in (prompt_line(result.get("prompt")), calibration_line(result.get("calibration"))):
        if line:
            parts += [line, ""]
    parts += ["## Results", "", results_table(result), ""]
    notes = result.get("notes") or []
    if notes:
        parts += [f"- {n}" for n in notes] + [""]
    if result.get("goals"):
        parts += ["## Goals", ""] + goals_section(result) + [""]
    if result.get("greedy_agreement"):
        parts += ["## Greedy tokens", ""] + agreement_section(result) + [""]
    probe = result.get("disk_probe")
    if probe and probe.get("points"):
        from flashjax.bench.disk_probe import markdown as probe_md
        parts += ["## I/O ceiling (disk probe)", "",
                  f"Cold random reads of a {probe['file_bytes'] >> 20} MiB file in {probe['directory']}, "
                  f"readahead off, MB/s by chunk size and reads in flight (ceiling {probe['ceiling_mb_per_s']:.0f} MB/s):", "",
                  probe_md(probe), ""]
        table = io_ceiling_table(result)
        if table:
            parts += ["How close each flashjax row came: its bytes per token divided by the probe's best throughput "
                      "at the chunk size nearest its mean read, beside the I/O wait it actually spent "
                      "(I/O overlapped with compute is not waited for, so the spent figure can be lower).", "", table, ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{k}]({os.path.basename(v)})" for k, v in plots.items()] + [""]
    cmd = result.get("command")
    if cmd:
        parts += ["## Command", "", f"```\n{cmd}\n```", f"Wall time: {result.get('wall_s', 0) / 60:.1f} min.", ""]
    return "\n".join(parts)


# ---- plots --------------------------------------------------------------------------------------------


def plots_available() -> bool:
    """Whether matplotlib, needed to draw the plots, is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def _plt():
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError(MATPLOTLIB_MISSING) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latency_vs_memory(result: dict, path: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ok = [r for r in result["rows"] if not _status(r) and r.get("decode_ms_per_token")]
    series: dict[str, list] = {}
    for r in ok:
        series.setdefault(r.get("series") or row_label(r), []).append(r)
    markers = {"flashjax": "o", "transformers": "s", "accelerate": "^", "llama.cpp": "D"}
    lines_drawn = 0
    for name, rows in series.items():
        system = rows[0]["system"]
        # plot_x first: a quantized copy's budget is a share of that copy, drawn as a share of the float32 model.
        xs = [r.get("plot_x") if r.get("plot_x") is not None else r.get("memory_budget") for r in rows]
        if all(x is None for x in xs):
            # No budget of its own (llama.cpp): a horizontal reference line per row.
            for r in rows:
                ax.axhline(r["decode_ms_per_token"], ls="--", lw=1.2, color=f"C{(lines_drawn + 4) % 10}",
                           label=f"{name}: {r['decode_ms_per_token']:.0f} ms")
                lines_drawn += 1
            continue
        pts = sorted((x, r["decode_ms_per_token"], r) for x, r in zip(xs, rows) if x is not None)
        xv = [100 * p[0] for p in pts]
        yv = [p[1] for p in pts]
        lo = [p[1] - (p[2].get("decode_ms_spread") or {}).get("min", p[1]) for p in pts]
        hi = [(p[2].get("decode_ms_spread") or {}).get("max", p[1]) - p[1] for p in pts]
        # The oracle drawn apart (dashed, hollow): a measuring device, not something to compare against.
        style = {"ls": "--", "mfc": "none"} if any(is_measuring_device(r) for r in rows) else {}
        ax.errorbar(xv, yv, yerr=[lo, hi], marker=markers.get(system, "o"), capsize=3, label=name, **style)
        if any(p[2].get("best_sparse") for p in pts):
            for x, y, (_, _, r) in zip(xv, yv, pts):  # which configuration fitted each budget
                ax.annotate(r.get("sparsity") or "", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlabel("memory for weights (% of the dense float32 model)")
    ax.set_ylabel("decode latency (ms/token, log scale)")
    ax.set_yscale("log")
    ax.set_xlim(0, 110)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(f"Latency per token vs memory budget — {result.get('model')}", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return _save(plt, fig, path)


def plot_breakdown(result: dict, path: str) -> str:
    plt = _plt()
    rows = [r for r in result["rows"] if r["system"] == "flashjax" and not _status(r) and r.get("io_ms") is not None]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows) + 2), 5))
    labels = [(f"{r['quant']} " if r.get("quant") else "") + (r.get("sparsity") or r.get("config") or "") +
              ("" if r.get("memory_budget") is None else f"\n@ {r['memory_budget']:.0%}") for r in rows]
    x = range(len(rows))
    bottom = [0.0] * len(rows)
    for key, name, color in (("io_ms", "I/O wait", "C3"), ("memory_management_ms", "memory management", "C1"),
                             ("compute_ms", "compute", "C0")):
        vals = [r.get(key) or 0.0 for r in rows]
        ax.bar(x, vals, bottom=bottom, label=name, color=color)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, total in enumerate(bottom):
        ax.text(i, total, f"{total:.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("ms per token")
    ax.set_title(f"flashjax per-token latency breakdown — {result.get('model')}", fontsize=10)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def plot_disk_probe(probe: dict, path: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    threads = sorted({p["threads"] for p in probe["points"]})
    for t in threads:
        pts = sorted((p["chunk_bytes"], p["mb_per_s"]) for p in probe["points"] if p["threads"] == t)
        ax.plot([c / 1024 for c, _ in pts], [v for _, v in pts], marker="o", label=f"{t} in flight")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("chunk size (KiB)")
    ax.set_ylabel("MB/s (cold random reads)")
    ax.set_title("disk probe: the I/O ceiling", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(plt, fig, path)


def write_report(result: dict, out_dir: str) -> dict:
    """Writes results.json, results.md and the PNGs into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    plots = {"latency vs memory budget": plot_latency_vs_memory(result, os.path.join(out_dir, "latency_vs_memory.png"))}
    if any(r["system"] == "flashjax" and not _status(r) for r in result["rows"]):
        plots["flashjax latency breakdown"] = plot_breakdown(result, os.path.join(out_dir, "latency_breakdown.png"))
    if (result.get("disk_probe") or {}).get("points"):
        plots["disk probe"] = plot_disk_probe(result["disk_probe"], os.path.join(out_dir, "disk_probe.png"))
    result = dict(result, plots={k: os.path.abspath(v) for k, v in plots.items()})
    paths["json"] = os.path.join(out_dir, "results.json")
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=2)
    paths["markdown"] = os.path.join(out_dir, "results.md")
    with open(paths["markdown"], "w") as f:
        f.write(markdown(result, plots))
    paths.update(plots)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="results.json written by `flashjax bench` (benchmarks/bench_compare.py)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    with open(args.results) as f:
        result = json.load(f)
    for k, v in write_report(result, args.out).items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
