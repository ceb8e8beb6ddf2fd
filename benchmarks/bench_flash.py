"""The paper's per-token latency breakdown on this machine: naive -> hybrid -> oracle -> +windowing -> +bundling.

For each configuration: per-token I/O wait, memory management and compute ms,
total, bytes read from disk per token (and as a share of the FFN), cache hit
rate, weights held vs the budget, peak RSS. The page cache is evicted before
every token (cold reads) unless --warm. "Bundling off" runs on a copy of the
model converted with separate gate/up/down arrays; all other rows that precede
"+bundling" in the paper's order also run unbundled, as in the paper.

Each row is also held to a throughput bound, measured once before the rows:
host->device bandwidth (jax.device_put of 256 MiB of float16, best of 3; a copy
on the CPU) and cold disk reads at the store's block size (disk_probe.py), and

    bound_ms_per_token = disk bytes per token / disk B/s + bytes moved to the device per token / h2d B/s

where disk bytes are the bytes read from the model's files (none with --warm:
the page cache, host RAM, serves them; with a host-RAM tier, only its misses)
and bytes moved to the device are the neuron records handed to the device
(from the disk or the host tier). ratio_to_bound = decode ms per token / bound.

    python benchmarks/bench_flash.py --model smollm2 --budgets 50% 65% [--json] [--out FILE]
    python benchmarks/bench_flash.py --synthetic opt-1.3b --budgets 50% --new-tokens 32
    python benchmarks/bench_flash.py --synthetic opt-6.7b --budgets 50% --warm --host-cache 100% [--devices N]
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import time

from flashjax.bench.common import (
    finish,
    ids_sha256,
    log,
    machine,
    peak_rss_bytes,
    prompt_ids,
    prompt_record,
)
from flashjax.bench.disk_probe import probe, throughput_for
from flashjax.engine import drain

CONFIGS = [
    # (row name, sparsity, window, bundled)
    ("naive", "naive", 1, False),
    ("hybrid (half resident)", "hybrid", 1, False),
    ("oracle, window 1 (no windowing)", "oracle", 1, False),
    ("oracle + windowing", "oracle", 5, False),
    ("oracle + windowing + bundling", "oracle", 5, True),
]


def prepare(args, workdir):
    """Returns (bundled dir, unbundled dir, prompt ids, the prompt's record for the report)."""
    from flashjax.store import convert, is_flash_dir

    bundled = os.path.join(workdir, "bundled")
    unbundled = os.path.join(workdir, "unbundled")
    if args.synthetic:
        from synthetic import (  # benchmarks/synthetic.py, beside this script
            SyntheticSource,
            synthetic_config,
        )

        cfg = synthetic_config(args.synthetic)
        for path, bundle in ((bundled, True), (unbundled, False)):
            if not is_flash_dir(path):
                log(f"writing synthetic {args.synthetic} model ({'bundled' if bundle else 'unbundled'}) to {path}")
                convert(SyntheticSource(cfg, args.active), path, dtype="float16", bundle=bundle)
        import numpy as np
        ids = np.random.RandomState(0).randint(4, cfg.vocab_size, size=args.prompt_tokens).tolist()
        return bundled, unbundled, ids, {"source": "random token ids, numpy RandomState(0) (a synthetic model)",
                                         "path": None, "sha256": None, "ids_sha256": ids_sha256(ids)}
    for path, bundle in ((bundled, True), (unbundled, False)):
        if not is_flash_dir(path):
            log(f"converting {args.model} ({'bundled' if bundle else 'unbundled'}) to {path}")
            convert(args.model, path, dtype="float16", bundle=bundle)
    from flashjax.store import open_flash_model
    ids = prompt_ids(open_flash_model(bundled, verify=False).tokenizer(), args.prompt_tokens, args.prompt_text)
    return bundled, unbundled, ids, prompt_record(ids, args.prompt_text)


def measure_throughput(args, model_dir) -> dict:
    """Host->device and cold disk read throughput (B/s): what bounds a token's reads and transfers."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from flashjax.store import open_flash_model

    devices = jax.devices()[:args.devices or 1]
    target = (devices[0] if len(devices) == 1 else
              NamedSharding(Mesh(np.array(devices), ("d",)), PartitionSpec("d")))  # each device its share
    host = np.ones((128 << 20) // len(devices) * len(devices), np.float16)  # 256 MiB
    copy = {"may_alias": False} if "may_alias" in inspect.signature(jax.device_put).parameters else {}  # CPU: a copy
    seconds = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.device_put(host, target, **copy).block_until_ready()
        seconds.append(time.perf_counter() - t0)
    h2d = host.nbytes / min(seconds)
    manifest = open_flash_model(model_dir, verify=False).manifest
    block = manifest.layout.ffn_block * manifest.layout.record_width * manifest.np_dtype.itemsize
    chunk = max(4096, round(block / 4096) * 4096)
    # On the disk the model lives on, beside it (not inside: its file list is checked).
    disk = probe(os.path.dirname(os.path.abspath(model_dir)), args.probe_mib, chunks=[chunk], threads=[1, 8, 32])
    disk_bps = throughput_for(disk, chunk)[1] * 1e6
    log(f"throughput: host->device {h2d / 1e9:.2f} GB/s ({len(devices)} device(s)), cold disk reads of "
        f"{chunk >> 10} KiB {disk_bps / 1e9:.2f} GB/s")
    return {"h2d_bytes_per_s": h2d, "h2d_devices": len(devices), "disk_bytes_per_s": disk_bps,
            "disk_chunk_bytes": chunk, "store_block_bytes": block,
            "disk_reads_reached_device": disk["reads_reached_device"]}


def bound_ms(s, throughput, warm) -> tuple[float, float]:
    """(bytes moved to the device per token, the throughput bound in ms per token) for a row's stats."""
    disk = 0 if warm else s.get("disk_bytes_per_token", s["bytes_read_per_token"])
    # Every record read, from the disk (neurons_read) or host RAM (host_hits), goes to the device.
    to_device = (s["neurons_read_per_token"] + s.get("host_hits_per_token", 0)) * s["record_nbytes"]
    return to_device, 1e3 * (disk / throughput["disk_bytes_per_s"] + to_device / throughput["h2d_bytes_per_s"])


def run_config(path, sparsity, window, budget, ids, args, oracle_params):
    from flashjax.api import LLM
    from flashjax.config import EngineConfig
    from flashjax.flash.runner import FlashOptions, FlashRunner
    from flashjax.store import open_flash_model

    extra = {k: v for k, v in (("devices", args.devices), ("host_cache", args.host_cache)) if v is not None}
    options = FlashOptions(sparsity=sparsity, memory_budget=budget, window=window,
                           evict_page_cache=not args.warm, verify=False, **extra)
    model = open_flash_model(path, verify=False)
    runner = FlashRunner(model, options, EngineConfig(), verbose=True,
                         oracle_params=oracle_params if sparsity == "oracle" else None)
    llm = LLM(model.config, runner.params, None, EngineConfig(), name=path, runner=runner)
    tokens, stats = drain(llm.generate_ids(ids, max_tokens=args.new_tokens, stop_at_eos=False))
    runner.close()
    cfg = model.config
    return tokens, dict(stats, record_nbytes=stats["ffn_bytes"] / (cfg.n_layers * cfg.d_ffn))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--synthetic", default=None, help="synthetic ReLU model shape instead: opt-1.3b, opt-6.7b, tiny")
    p.add_argument("--active", type=float, default=0.03)
    p.add_argument("--budgets", nargs="+", default=["50%", "65%"])
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--prompt-text", default=None, metavar="FILE",
                   help="text the prompt is cut from (default: the prose shipped in the package)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--workdir", default=None, help="where converted models are kept (reused if present)")
    p.add_argument("--warm", action="store_true", help="keep the page cache (default: evict before every token)")
    p.add_argument("--configs", nargs="*", default=None, help="subset of row names")
    p.add_argument("--devices", type=int, default=None, help="split each layer's neurons across N local devices")
    p.add_argument("--host-cache", default=None, help="host-RAM tier of neuron blocks: 4GB, 100%% of the FFN, ...")
    p.add_argument("--probe-mib", type=int, default=1024, help="size of the disk probe's file (in --workdir)")
    p.add_argument("--out", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)

    workdir = args.workdir or tempfile.mkdtemp(prefix="flashjax-bench-")
    bundled, unbundled, ids, prompt = prepare(args, workdir)
    from flashjax.model.params import load_params
    from flashjax.store import open_flash_source

    log("loading the oracle's full copy of the model (a measuring device, outside budget and timings)")
    oracle_params = load_params(open_flash_source(bundled, verify=False), progress=False)
    throughput = measure_throughput(args, bundled)
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
                   "decode_ms_per_token": s["decode_ms_per_token"], "io_ms": s["io_ms"], "memory_management_ms": s["memory_management_ms"],
                   "compute_ms": s["compute_ms"], "disk_bytes_per_token": s["bytes_read_per_token"],
                   "ffn_share_read": s["bytes_read_per_token"] / s["ffn_bytes"],
                   "read_ops_per_token": s["read_ops_per_token"], "cache_hit_rate": s["cache_hit_rate"],
                   "weights_bytes": s["weights_bytes"], "memory_budget_bytes": s["memory_budget_bytes"],
                   "prefill_tokens_per_s": s["prefill_tokens_per_s"], "peak_rss_bytes": peak_rss_bytes(),
                   "tokens_match_first_row": tokens == reference_tokens}
            row.update({k: v for k, v in s.items() if k.startswith("host_")})  # the host-RAM tier's stats
            row["device_bytes_per_token"], row["bound_ms_per_token"] = bound_ms(s, throughput, args.warm)
            bound = row["bound_ms_per_token"]
            row["ratio_to_bound"] = row["decode_ms_per_token"] / bound if bound else None  # None: nothing moved
            ratio = "-" if not bound else f"{row['ratio_to_bound']:.1f}"
            log(f"  {row['decode_ms_per_token']:.1f} ms/token (io {row['io_ms']:.1f}, mm {row['memory_management_ms']:.1f}, "
                f"compute {row['compute_ms']:.1f}); {row['disk_bytes_per_token'] / 1e6:.2f} MB/token "
                f"({100 * row['ffn_share_read']:.1f}% of FFN); {ratio}x the bound "
                f"{row['bound_ms_per_token']:.1f} ms")
            rows.append(row)

    print("| budget | configuration | I/O ms | mem. mgmt ms | compute ms | total ms/token | MB read/token | % of FFN | hit rate | weights MB / budget MB | bound ms/token | x bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['memory_budget']} | {r['config']} | skipped: {r['error'][:60]} |||||||||")
            continue
        hit = "-" if r["cache_hit_rate"] is None else f"{r['cache_hit_rate']:.2f}"
        ratio = "-" if r["ratio_to_bound"] is None else f"{r['ratio_to_bound']:.1f}"
        print(f"| {r['memory_budget']} | {r['config']} | {r['io_ms']:.1f} | {r['memory_management_ms']:.1f} | {r['compute_ms']:.1f} "
              f"| {r['decode_ms_per_token']:.1f} | {r['disk_bytes_per_token'] / 1e6:.2f} | {100 * r['ffn_share_read']:.2f} "
              f"| {hit} | {r['weights_bytes'] / 1e6:.0f} / {r['memory_budget_bytes'] / 1e6:.0f} "
              f"| {r['bound_ms_per_token']:.2f} | {ratio} |")
    print(f"bound: disk {throughput['disk_bytes_per_s'] / 1e9:.2f} GB/s ({'not used: --warm' if args.warm else 'cold'}), "
          f"host->device {throughput['h2d_bytes_per_s'] / 1e9:.2f} GB/s")
    by_budget = {}
    for r in rows:
        if "error" not in r:
            by_budget.setdefault(r["memory_budget"], {})[r["config"]] = r["decode_ms_per_token"]
    speedups = {b: v["naive"] / v["oracle + windowing + bundling"] for b, v in by_budget.items()
                if "naive" in v and "oracle + windowing + bundling" in v}
    for b, x in speedups.items():
        print(f"[{b}] oracle + windowing + bundling is {x:.1f}x faster per token than naive "
              f"(the oracle is a measuring device: what a perfect predictor could do)")
    import jax

    info = dict(machine(), jax_backend=jax.default_backend(),
                devices=[{"id": d.id, "kind": d.device_kind, "platform": d.platform} for d in jax.devices()])
    report = {"benchmark": "flash-breakdown", "machine": info, "model": args.synthetic or args.model,
              "synthetic": bool(args.synthetic), "cold_page_cache": not args.warm,
              "devices": args.devices, "host_cache": args.host_cache, "throughput": throughput,
              "prompt_tokens": args.prompt_tokens, "prompt": prompt, "new_tokens": args.new_tokens, "rows": rows,
              "speedup_vs_naive": speedups}
    return finish(report, args)


if __name__ == "__main__":
    sys.exit(main())
