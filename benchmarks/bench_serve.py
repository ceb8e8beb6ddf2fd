"""Serving: time to first token and tokens/s per client for 1, 4 and 16 concurrent clients, flashjax
serve beside llama-cpp-python's OpenAI server (`python -m llama_cpp.server`) on the same GGUF.

Each server runs in its own process on a free localhost port. For each number of clients, that many
clients start a streamed chat request at the same moment (each its own prompt, greedy, the same
max_tokens) and time, from their side: the first token (time to first token, queueing included) and
the tokens after it (tokens/s per client), and the wall time of the whole round (aggregate tokens/s).
Both servers queue requests and serve one at a time, so with N clients the last one waits for N-1
others: the goal here is that none starves (every client finishes), not a speed.

llama.cpp is measured only when llama-cpp-python and its server extra import (`pip install
'llama-cpp-python[server]'`); otherwise it is reported as not measured, with the reason. It runs with
as many threads as flashjax's XLA uses (every core) and with `--interrupt_requests False` (its default
cuts a running stream when another request arrives).

    python benchmarks/bench_serve.py [--model smollm2] [--clients 1 4 16] [--max-tokens 64] [--json] [--out FILE]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from flashjax.bench.common import finish, log, machine

SUBJECTS = ["a dragon", "the sea", "a robot", "a lighthouse", "a forest", "a city at night", "a violin", "winter",
            "a cat", "the moon", "a library", "a train journey", "a garden", "a storm", "a mountain", "a clock"]


class ServerProcess:
    """A server subprocess whose output goes to a log file."""

    def __init__(self, name: str, cmd: list[str], port: int | None, log_dir: pathlib.Path):
        self.name, self.cmd = name, cmd
        self.log_path = log_dir / f"{name}.log"
        with open(self.log_path, "wb") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.port = port

    def log_tail(self, n: int = 1500) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            if self.port is None:  # flashjax serve --port 0 logs the port it took
                match = re.search(r"on http://127\.0\.0\.1:(\d+)", self.log_path.read_text(errors="replace"))
                self.port = int(match.group(1)) if match else None
            if self.port is not None:
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                    conn.request("GET", path)
                    if conn.getresponse().status == 200:
                        return
                except OSError:
                    pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} was not ready after {timeout:.0f} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_client(port: int, model: str, subject: str, max_tokens: int, start: threading.Barrier) -> dict:
    """One streamed chat request, timed from the client's side."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": f"Write a long story about {subject}."}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start.wait()
    sent = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        return {"error": f"HTTP {response.status}: {response.read()[:300]!r}"}
    times, usage = [], None
    while True:
        line = response.readline()
        if not line:
            break
        line = line.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if chunk.get("usage"):
            usage = chunk["usage"]
        if chunk.get("choices") and chunk["choices"][0].get("delta", {}).get("content"):
            times.append(time.perf_counter())
    done = time.perf_counter()
    conn.close()
    if not times:
        return {"error": "no text came back"}
    # Tokens: the server's own count when it reports usage, else one per text chunk.
    tokens = usage["completion_tokens"] if usage else len(times)
    decode_s = times[-1] - times[0]
    return {"ttft_s": times[0] - sent, "tokens": tokens, "chunks": len(times), "total_s": done - sent,
            "tokens_per_s": (tokens - 1) / decode_s if tokens > 1 and decode_s > 0 else None}


def run_round(port: int, model: str, clients: int, max_tokens: int) -> dict:
    start = threading.Barrier(clients)
    results: list[dict] = [{}] * clients

    def client(i: int) -> None:
        try:
            results[i] = one_client(port, model, SUBJECTS[i % len(SUBJECTS)], max_tokens, start)
        except Exception as e:  # noqa: BLE001 - a failed client is a result, not a crash
            results[i] = {"error": f"{type(e).__name__}: {e}"}

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttft = [r["ttft_s"] for r in ok]
    rates = [r["tokens_per_s"] for r in ok if r["tokens_per_s"]]
    return {
        "clients": clients, "completed": len(ok), "errors": [r["error"] for r in results if "error" in r],
        "ttft_s": {"mean": _mean(ttft), "median": _median(ttft), "max": max(ttft, default=None)},
        "tokens_per_s_per_client": {"mean": _mean(rates), "min": min(rates, default=None)},
        "tokens": sum(r["tokens"] for r in ok), "wall_s": wall,
        "aggregate_tokens_per_s": sum(r["tokens"] for r in ok) / wall if wall else None,
        "no_client_starved": len(ok) == clients,
        "per_client": results,
    }


def _mean(values):
    return statistics.fmean(values) if values else None


def _median(values):
    return statistics.median(values) if values else None


def measure(server: ServerProcess, model: str, clients_list: list[int], max_tokens: int) -> list[dict]:
    log(f"{server.name}: warm-up request")
    run_round(server.port, model, 1, min(8, max_tokens))
    rounds = []
    for clients in clients_list:
        r = run_round(server.port, model, clients, max_tokens)
        t, s = r["ttft_s"], r["tokens_per_s_per_client"]
        log(f"{server.name}: {clients:2d} clients: {r['completed']}/{clients} completed; time to first token "
            f"mean {_fmt(t['mean'])} s, max {_fmt(t['max'])} s; tokens/s per client mean {_fmt(s['mean'], 1)}, "
            f"min {_fmt(s['min'], 1)}; aggregate {_fmt(r['aggregate_tokens_per_s'], 1)} tokens/s")
        rounds.append(r)
    return rounds


def _fmt(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def gguf_for(model: str) -> str | None:
    """The GGUF both servers load: the built-in default's file, or the path given."""
    if model == "smollm2":
        from flashjax.hub import default_model_path
        return str(default_model_path())
    return model if model.endswith(".gguf") and os.path.exists(model) else None


def llama_cpp_server_missing() -> str | None:
    try:
        import llama_cpp.server.app  # noqa: F401 - the server extra: fastapi, sse-starlette, ...
    except Exception as e:  # noqa: BLE001 - ImportError or a broken native build
        return (f"llama_cpp.server does not import ({type(e).__name__}: {e}); install "
                f"'llama-cpp-python[server]' to measure it")
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2", help="smollm2 or a .gguf path (llama.cpp needs a GGUF)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--max-tokens", type=int, default=64, help="tokens each request asks for (greedy)")
    p.add_argument("--skip-llama-cpp", action="store_true")
    p.add_argument("--out", default=None, help="write the JSON report here too")
    p.add_argument("--json", action="store_true", help="print the JSON report as the last line of stdout")
    args = p.parse_args(argv)

    gguf = gguf_for(args.model)
    model = gguf or args.model
    threads = os.cpu_count() or 1
    report = {"benchmark": "serve", "machine": machine(), "model": model, "clients": args.clients,
              "max_tokens": args.max_tokens, "systems": {}}
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        log_dir = pathlib.Path(tmp)
        servers = [("flashjax", lambda: ServerProcess(
            "flashjax", [sys.executable, "-m", "flashjax", "serve", "--model", model, "--port", "0",
                         "--queue-limit", str(max(args.clients) + 1), "--default-max-tokens", str(args.max_tokens)],
            None, log_dir), "/health")]
        reason = "--skip-llama-cpp" if args.skip_llama_cpp else (
            "llama.cpp needs a GGUF: pass --model smollm2 or a .gguf path" if gguf is None else
            llama_cpp_server_missing())
        if reason is None:
            port = free_port()
            servers.append(("llama.cpp", lambda: ServerProcess(
                "llama.cpp", [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1",
                              "--port", str(port), "--n_ctx", "2048", "--n_threads", str(threads),
                              "--n_threads_batch", str(threads), "--interrupt_requests", "False",
                              "--verbose", "False"], port, log_dir), "/v1/models"))
        else:
            report["systems"]["llama.cpp"] = {"measured": False, "reason": reason}
            log(f"llama.cpp: not measured: {reason}")
        for name, start, ready_path in servers:
            log(f"{name}: starting")
            server = start()
            try:
                server.wait_ready(ready_path, timeout=600)
                report["systems"][name] = {"measured": True, "command": server.cmd,
                                           "rounds": measure(server, model, args.clients, args.max_tokens)}
            except RuntimeError as e:
                report["systems"][name] = {"measured": False, "reason": str(e)}
                log(f"{name}: not measured: {e}")
            finally:
                server.stop()

    print("| system | clients | completed | TTFT mean s | TTFT max s | tok/s per client (mean, min) | aggregate tok/s |")
    print("|---|---|---|---|---|---|---|")
    for name, result in report["systems"].items():
        if not result["measured"]:
            print(f"| {name} | not measured: {result['reason'].splitlines()[0][:120]} | | | | | |")
            continue
        for r in result["rounds"]:
            t, s = r["ttft_s"], r["tokens_per_s_per_client"]
            print(f"| {name} | {r['clients']} | {r['completed']}/{r['clients']} | {_fmt(t['mean'])} | {_fmt(t['max'])} "
                  f"| {_fmt(s['mean'], 1)}, {_fmt(s['min'], 1)} | {_fmt(r['aggregate_tokens_per_s'], 1)} |")
    return finish(report, args)


if __name__ == "__main__":
    sys.exit(main())
