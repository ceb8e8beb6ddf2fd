"""Dense engine vs Hugging Face transformers on the same machine, in the same run.

Decode ms/token and prefill tokens/s for: flashjax dense (float32, every weight
resident) and transformers (PyTorch CPU, float32), same prompt (128 tokens of the
prose shipped in the package, or of --prompt-text FILE; the report records the file
and its sha256), 256 generated greedily, each warmed up and then measured over
repeated runs.
Also measures XLA:CPU's matrix-vector streaming rate in this run, to say how
far the dense decode is from the floor (weight bytes read per token / rate).

    python benchmarks/bench_dense.py [--model smollm2] [--runs 3] [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from flashjax.bench.common import (
    finish,
    log,
    machine,
    peak_rss_bytes,
    prompt_ids,
    prompt_record,
    summary,
)
from flashjax.engine import drain


def run_flashjax(llm, ids, n_new, runs):
    decode, prefill, tokens = [], [], None
    for r in range(runs + 1):  # run 0 warms up (compiles)
        out, stats = drain(llm.generate_ids(ids, max_tokens=n_new, stop_at_eos=False))
        log(f"  flashjax run {r}: decode {stats['decode_ms_per_token']:.2f} ms/token, "
            f"prefill {stats['prefill_tokens_per_s']:.0f} tok/s{' (warm-up)' if r == 0 else ''}")
        if r:
            decode.append(stats["decode_ms_per_token"])
            prefill.append(stats["prefill_tokens_per_s"])
        tokens = out
    return decode, prefill, tokens


def run_transformers(model, ids, n_new, runs):
    import torch

    decode, prefill, tokens = [], [], None
    inputs = torch.tensor([ids])
    for r in range(runs + 1):
        with torch.no_grad():
            t0 = time.perf_counter()
            model(inputs)
            prefill_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = model.generate(inputs, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
            total_s = time.perf_counter() - t0
        # generate() runs the prefill again, then n_new - 1 decode steps.
        ms = (total_s - prefill_s) * 1e3 / (n_new - 1)
        log(f"  transformers run {r}: decode {ms:.2f} ms/token, prefill {len(ids) / prefill_s:.0f} tok/s"
            f"{' (warm-up)' if r == 0 else ''}")
        if r:
            decode.append(ms)
            prefill.append(len(ids) / prefill_s)
        tokens = out[0, len(ids):].tolist()
    return decode, prefill, tokens


def matvec_rate_gb_s() -> float:
    """XLA:CPU float32 matrix-vector streaming rate (GB/s), on a matrix far larger than the caches."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    w = jnp.asarray(np.random.RandomState(0).randn(65536, 1024).astype(np.float32))  # 256 MiB
    x = jnp.ones((1, 1024), jnp.float32)
    f = jax.jit(lambda x, w: jnp.einsum("bd,vd->bv", x, w))
    f(x, w).block_until_ready()
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        f(x, w).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return w.nbytes / best / 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--prompt-text", default=None, metavar="FILE",
                   help="text the prompt is cut from (default: the prose shipped in the package)")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--out", default=None, help="write the JSON report here too")
    p.add_argument("--json", action="store_true", help="print the JSON report as the last line of stdout")
    args = p.parse_args(argv)

    import flashjax
    from flashjax.hub import default_model_path

    log(f"loading {args.model} into flashjax")
    llm = flashjax.load(args.model, progress=False)
    ids = prompt_ids(llm.tokenizer, args.prompt_tokens, args.prompt_text)
    rows = []
    fj_decode, fj_prefill, fj_tokens = run_flashjax(llm, ids, args.new_tokens, args.runs)
    rate = matvec_rate_gb_s()
    weight_bytes = llm.weight_bytes
    # Per decode token every weight is read once, except the embedding gather (one row), while a tied
    # lm_head reads the whole table: so the bytes read equal the resident weights.
    floor_ms = weight_bytes / (rate * 1e9) * 1e3
    rows.append({"system": "flashjax", "config": "dense float32", "memory_budget": None,
                 "decode_ms_per_token": summary(fj_decode)["median"], "decode_ms_spread": summary(fj_decode),
                 "prefill_tokens_per_s": summary(fj_prefill)["median"], "weight_bytes": weight_bytes,
                 "disk_bytes_per_token": 0, "peak_rss_bytes": peak_rss_bytes()})
    report = {"benchmark": "dense", "machine": machine(), "model": args.model,
              "prompt_tokens": args.prompt_tokens, "prompt": prompt_record(ids, args.prompt_text),
              "new_tokens": args.new_tokens, "xla_matvec_gb_per_s": rate, "dense_floor_ms_per_token": floor_ms, "rows": rows}
    if not args.skip_transformers:
        import torch
        from transformers import AutoModelForCausalLM

        path = llm.name if os.path.exists(llm.name) else str(default_model_path())
        kwargs = {"gguf_file": os.path.basename(path)} if path.endswith(".gguf") else {}
        directory = os.path.dirname(path) if path.endswith(".gguf") else path
        log(f"loading {path} into transformers (torch {torch.__version__}, {torch.get_num_threads()} threads)")
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs).eval()
        hf_decode, hf_prefill, hf_tokens = run_transformers(model, ids, args.new_tokens, args.runs)
        rows.append({"system": "transformers", "config": "float32, PyTorch CPU", "memory_budget": None,
                     "decode_ms_per_token": summary(hf_decode)["median"], "decode_ms_spread": summary(hf_decode),
                     "prefill_tokens_per_s": summary(hf_prefill)["median"], "disk_bytes_per_token": 0,
                     "peak_rss_bytes": peak_rss_bytes()})
        same = next((i for i, (a, b) in enumerate(zip(fj_tokens, hf_tokens)) if a != b), None)
        report["greedy_tokens_identical"] = same is None
        report["first_token_difference"] = same
        report["decode_speedup_vs_transformers"] = rows[1]["decode_ms_per_token"] / rows[0]["decode_ms_per_token"]
        report["prefill_speedup_vs_transformers"] = rows[0]["prefill_tokens_per_s"] / rows[1]["prefill_tokens_per_s"]

    print("| system | config | decode ms/token (median, min-max) | prefill tok/s |")
    print("|---|---|---|---|")
    for row in rows:
        s = row["decode_ms_spread"]
        print(f"| {row['system']} | {row['config']} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) "
              f"| {row['prefill_tokens_per_s']:.0f} |")
    print(f"XLA:CPU matvec rate {rate:.1f} GB/s -> dense floor {floor_ms:.1f} ms/token "
          f"({weight_bytes / 1e6:.0f} MB of float32 weights)")
    if "decode_speedup_vs_transformers" in report:
        print(f"decode speed-up vs transformers: {report['decode_speedup_vs_transformers']:.2f}x; "
              f"greedy tokens identical: {report['greedy_tokens_identical']}")
    return finish(report, args)


if __name__ == "__main__":
    sys.exit(main())
