"""One process of four devices against two processes of two (jax.distributed over localhost), flash engine.

    python benchmarks/bench_multiprocess.py models/smollm2-flash --budget 240MB --new-tokens 16
    python benchmarks/bench_multiprocess.py qwen2.5-coder-0.5b --work /tmp/bench-mp --budget 60% --json

MODEL is a converted model, or anything `flashjax convert` takes (converted once into WORK). Each row
is real `flashjax generate --json` commands with the same prompt, budget (per device) and sparsity,
the CPU split into devices with XLA_FLAGS=--xla_force_host_platform_device_count:

- 1 x 4: one process, `--devices 4`;
- 2 x 2: two processes of two devices on a free localhost port (`--coordinator`), Gloo collectives.

Reported per row: decode ms/token and prefill ms (process 0's figures; compile time excluded), and per
process the FFN bytes read per decode token and over the whole run, prompt included (2 x 2: each
process's own ledger, `stats.processes`; 1 x 4: the whole FFN once for the prompt plus the decode
steps' reads). Whether the tokens of the rows agree is checked.
All processes share this machine's cores: a measure of what the cross-process path costs, not of
what more hosts would gain. The last line with --json is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

DEFAULT_PROMPT = "The capital of France is"


def _env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate_args(args, model: str) -> list[str]:
    out = [sys.executable, "-m", "flashjax", "generate", "--model", model, "--memory-budget", args.budget,
           "--max-tokens", str(args.new_tokens), "--prompt", args.prompt, "--json"]
    if args.sparsity:
        out += ["--sparsity", args.sparsity]
    return out


def _run(commands: list[tuple[list[str], dict]], timeout: float) -> list[subprocess.CompletedProcess]:
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd, env in commands]
    done = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit(f"bench_multiprocess: {p.args} ran past {timeout} s")
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    for d in done:
        if d.returncode != 0:
            raise SystemExit(f"bench_multiprocess: {' '.join(d.args)} failed ({d.returncode}):\n{d.stderr[-3000:]}")
    return done


def _result(done: subprocess.CompletedProcess) -> dict:
    return json.loads(done.stdout.strip().splitlines()[-1])


def one_process(args, model: str) -> dict:
    t0 = time.perf_counter()
    done, = _run([(_generate_args(args, model) + ["--devices", "4"], _env(4))], args.timeout)
    r = _result(done)
    s = r["stats"]
    return {"config": "1 process x 4 devices", "processes": 1, "devices_per_process": 4, "tokens": r["tokens"],
            "decode_ms_per_token": s["decode_ms_per_token"], "prefill_ms": s["prefill_ms"],
            "bytes_read_per_token": [s["bytes_read_per_token"]],
            # The prompt streams the whole FFN once (uncached), then each decode step its own reads.
            "bytes_read": [s["ffn_bytes"] + s["bytes_read_per_token"] * max(s["generated_tokens"] - 1, 0)],
            "cache_rows_per_layer": s["cache_rows_per_layer"], "sparsity": s["sparsity"],
            "wall_s": time.perf_counter() - t0}


def two_processes(args, model: str) -> dict:
    t0 = time.perf_counter()
    port = _free_port()
    base = _generate_args(args, model) + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    done = _run([(base + ["--process-id", str(i)], _env(2)) for i in range(2)], args.timeout)
    r = _result(done[0])
    s = r["stats"]
    procs = s["processes"]
    return {"config": "2 processes x 2 devices", "processes": 2, "devices_per_process": 2, "tokens": r["tokens"],
            "decode_ms_per_token": s["decode_ms_per_token"], "prefill_ms": s["prefill_ms"],
            "bytes_read_per_token": [p["bytes_read_per_token"] for p in procs],
            "bytes_read": [p["bytes_read"] for p in procs],
            "neurons": [p["neurons"] for p in procs],
            "decode_ms_per_token_per_process": [p["decode_ms_per_token"] for p in procs],
            "cache_rows_per_layer": s["cache_rows_per_layer"], "sparsity": s["sparsity"],
            "wall_s": time.perf_counter() - t0}


def _flash_dir(args) -> str:
    from flashjax.store import is_flash_dir

    if is_flash_dir(args.model):
        return args.model
    out = pathlib.Path(args.work) / (re.sub(r"[^A-Za-z0-9_.-]+", "_", args.model) + "-flash")
    if not is_flash_dir(str(out)):
        print(f"bench_multiprocess: converting {args.model} -> {out}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "flashjax", "convert", args.model, str(out)], check=True,
                       env=_env(1))
    return str(out)


def _mb(x) -> str:
    if isinstance(x, list):
        return " / ".join(_mb(v) for v in x)
    return "-" if x is None else f"{x / 1e6:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| config | decode ms/token | prefill ms | MB read per token, per process | MB read in all, per process |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['decode_ms_per_token']:.1f} | {r['prefill_ms']:.0f} | "
                     f"{_mb(r['bytes_read_per_token'])} | {_mb(r['bytes_read'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a converted model, or anything `flashjax convert` takes (converted into --work)")
    p.add_argument("--work", default="bench-multiprocess", help="where a model is converted")
    p.add_argument("--budget", default="240MB", help="memory budget per device (bytes or a share of the model)")
    p.add_argument("--sparsity", default=None, help="flash mode (default: flashjax's default under a budget)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--timeout", type=float, default=1800, help="seconds a row may take")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = p.parse_args(argv)
    model = _flash_dir(args)
    rows = [one_process(args, model), two_processes(args, model)]
    same = rows[0]["tokens"] == rows[1]["tokens"]
    print(f"model {args.model} ({model}), budget {args.budget} per device, sparsity {rows[0]['sparsity']}, "
          f"{args.new_tokens} tokens, cache rows per layer and device {rows[0]['cache_rows_per_layer']}")
    print(table(rows))
    print(f"tokens equal across the rows: {same}")
    if args.json:
        print(json.dumps({"model": args.model, "flash_dir": model, "budget": args.budget,
                          "new_tokens": args.new_tokens, "prompt": args.prompt, "tokens_equal": same,
                          "machine": {"cpus": os.cpu_count()}, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
