"""The paper's per-token latency breakdown on this machine: naive -> hybrid -> oracle -> +windowing -> +bundling.

For each configuration: per-token I/O wait, memory management and compute ms,
total, bytes read from disk per token (and as a share of the FFN), cache hit
rate, weights held vs the budget, peak RSS. The page cache is evicted before
every token (cold reads) unless --warm. "Bundling off" runs on a copy of the
model converted with separate gate/up/down arrays; all other rows that precede
"+bundling" in the paper's order also run unbundled, as in the paper.

    python benchmarks/bench_flash.py --model smollm2 --budgets 50% 65% [--json] [--out FILE]
    python benchmarks/bench_flash.py --synthetic opt-1.3b --budgets 50% --new-tokens 32
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import drain, finish, log, machine, peak_rss_bytes, prompt_ids  # noqa: E402

CONFIGS = [
    # (row name, sparsity, window, bundled)
    ("naive", "naive", 1, False),
    ("hybrid (half resident)", "hybrid", 1, False),
    ("oracle, window 1 (no windowing)", "oracle", 1, False),
    ("oracle + windowing", "oracle", 5, False),
    ("oracle + windowing + bundling", "oracle", 5, True),
]


def prepare(args, workdir):
    """Returns (bundled dir, unbundled dir, prompt ids)."""
    from flashjax.store import convert, is_flash_dir

    bundled = os.path.join(workdir, "bundled")
    unbundled = os.path.join(workdir, "unbundled")
    if args.synthetic:
        from benchmarks.synthetic import SyntheticSource, synthetic_config

        cfg = synthetic_config(args.synthetic)
        for path, bundle in ((bundled, True), (unbundled, False)):
            if not is_flash_dir(path):
                log(f"writing synthetic {args.synthetic} model ({'bundled' if bundle else 'unbundled'}) to {path}")
                convert(SyntheticSource(cfg, args.active), path, dtype="float16", bundle=bundle)
        import numpy as np
        ids = np.random.RandomState(0).randint(4, cfg.vocab_size, size=args.prompt_tokens).tolist()
        return bundled, unbundled, ids
    for path, bundle in ((bundled, True), (unbundled, False)):
        if not is_flash_dir(path):
            log(f"converting {args.model} ({'bundled' if bundle else 'unbundled'}) to {path}")
            convert(args.model, path, dtype="float16", bundle=bundle)
    from flashjax.store import open_flash_model
    return bundled, unbundled, prompt_ids(open_flash_model(bundled, verify=False).tokenizer(), args.prompt_tokens)


def run_config(path, sparsity, window, budget, ids, args, oracle_params):
    import flashjax
    from flashjax.api import LLM
    from flashjax.config import EngineConfig
    from flashjax.flash.runner import FlashOptions, FlashRunner
    from flashjax.store import open_flash_model

    options = FlashOptions(sparsity=sparsity, memory_budget=budget, window=window,
                           evict_page_cache=not args.warm, verify=False)
    model = open_flash_model(path, verify=False)
    runner = FlashRunner(model, options, EngineConfig(), verbose=True,
                         oracle_params=oracle_params if sparsity == "oracle" else None)
    llm = LLM(model.config, runner.params, None, EngineConfig(), name=path, runner=runner)
    tokens, stats = drain(llm.generate_ids(ids, max_tokens=args.new_tokens, stop_at_eos=False))
    runner.close()
    return tokens, stats


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--synthetic", default=None, help="synthetic ReLU model shape instead: opt-1.3b, opt-6.7b, tiny")
    p.add_argument("--active", type=float, default=0.03)
    p.add_argument("--budgets", nargs="+", default=["50%", "65%"])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--workdir", default=None, help="where converted models are kept (reused if present)")
    p.add_argument("--warm", action="store_true", help="keep the page cache (default: evict before every token)")
    p.add_argument("--configs", nargs="*", default=None, help="subset of row names")
    p.add_argument("--out", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    workdir = args.workdir or tempfile.mkdtemp(prefix="flashjax-bench-")
    bundled, unbundled, ids = prepare(args, workdir)
    from flashjax.model.params import load_params
    from flashjax.store import open_flash_source

    log("loading the oracle's full copy of the model (a measuring device, outside budget and timings)")
    oracle_params = load_params(open_flash_source(bundled, verify=False), progress=False)
    rows = []
    reference_tokens = None
    for budget in args.budgets:
        for name, sparsity, window, bundle in CONFIGS:
            if args.configs and name not in args.configs:
                continue
            log(f"[{budget}] {name}")
            try:
                tokens, s = run_config(bundled if bundle else unbundled, sparsity, window, budget, ids, args,
                                       oracle_params)
            except ValueError as e:  # e.g. the budget is below what the configuration needs
                log(f"  skipped: {e}")
                rows.append({"system": "flashjax", "config": name, "memory_budget": budget, "error": str(e)})
                continue
            reference_tokens = reference_tokens or tokens
            row = {"system": "flashjax", "config": name, "memory_budget": budget,
                   "decode_ms_per_token": s["decode_ms_per_token"], "io_ms": s["io_ms"], "mm_ms": s["mm_ms"],
                   "compute_ms": s["compute_ms"], "disk_bytes_per_token": s["bytes_read_per_token"],
                   "ffn_share_read": s["bytes_read_per_token"] / s["ffn_bytes"],
                   "read_ops_per_token": s["read_ops_per_token"], "cache_hit_rate": s["cache_hit_rate"],
                   "weights_bytes": s["weights_bytes"], "memory_budget_bytes": s["memory_budget_bytes"],
                   "prefill_tokens_per_s": s["prefill_tokens_per_s"], "peak_rss_bytes": peak_rss_bytes(),
                   "tokens_match_first_row": tokens == reference_tokens}
            log(f"  {row['decode_ms_per_token']:.1f} ms/token (io {row['io_ms']:.1f}, mm {row['mm_ms']:.1f}, "
                f"compute {row['compute_ms']:.1f}); {row['disk_bytes_per_token'] / 1e6:.2f} MB/token "
                f"({100 * row['ffn_share_read']:.1f}% of FFN)")
            rows.append(row)

    print("| budget | configuration | I/O ms | mem. mgmt ms | compute ms | total ms/token | MB read/token | % of FFN | hit rate | weights MB / budget MB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['memory_budget']} | {r['config']} | skipped: {r['error'][:60]} |||||||")
            continue
        hit = "-" if r["cache_hit_rate"] is None else f"{r['cache_hit_rate']:.2f}"
        print(f"| {r['memory_budget']} | {r['config']} | {r['io_ms']:.1f} | {r['mm_ms']:.1f} | {r['compute_ms']:.1f} "
              f"| {r['decode_ms_per_token']:.1f} | {r['disk_bytes_per_token'] / 1e6:.2f} | {100 * r['ffn_share_read']:.2f} "
              f"| {hit} | {r['weights_bytes'] / 1e6:.0f} / {r['memory_budget_bytes'] / 1e6:.0f} |")
    by_budget = {}
    for r in rows:
        if "error" not in r:
            by_budget.setdefault(r["memory_budget"], {})[r["config"]] = r["decode_ms_per_token"]
    speedups = {b: v["naive"] / v["oracle + windowing + bundling"] for b, v in by_budget.items()
                if "naive" in v and "oracle + windowing + bundling" in v}
    for b, x in speedups.items():
        print(f"[{b}] oracle + windowing + bundling is {x:.1f}x faster per token than naive")
    report = {"benchmark": "flash-breakdown", "machine": machine(), "model": args.synthetic or args.model,
              "synthetic": bool(args.synthetic), "cold_page_cache": not args.warm,
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "rows": rows,
              "speedup_vs_naive": speedups}
    return finish(report, args)


if __name__ == "__main__":
    sys.exit(main())
