"""Several processes (jax.distributed) on one machine, talking over localhost, as JAX's own
multi-process tests run: every test starts real `flashjax` commands, two processes of two CPU
devices each (XLA_FLAGS=--xla_force_host_platform_device_count=2 per process), on a free port.

- the flash engine (the default model converted, gate selection under a budget that makes every
  device cache, evict and stream) gives the one-process one-device tokens; each process reads only
  its own devices' neurons, and together they read all of them;
- the dense engine with --devices 4 across the two processes gives the one-process tokens;
- a process killed mid-generation: the other exits non-zero within 60 s naming the lost process;
- clear errors: an unreachable coordinator, mismatched process counts, a model path missing on one
  host.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import flashjax

PROMPT = "1, 2, 3, 4, 5,"  # greedy margins of 3+ logits: rounding across devices cannot flip a token
TOKENS = 8
BUDGET = "240MB"  # the default model with gate selection: 111 cache rows per layer and device (of 384 per device)
SCRATCH_ROWS = 32  # a layer's surplus streams in several chunks per device: 12 for the prompt, 2 or more for a token
REPO = pathlib.Path(__file__).resolve().parents[1]


# ---- starting processes ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(devices: int = 2, **extra) -> dict:
    """The environment of one engine process: N CPU devices (not conftest's four), no inherited
    distributed settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COORDINATOR")
           and k not in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "FLASHJAX_DISTRIBUTED_SUPERVISOR")}
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


class Proc:
    """One `flashjax` command, in its own session (killing the session is losing the host)."""

    def __init__(self, args, tmp: pathlib.Path, name: str, cwd=None, env=None):
        tmp.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = tmp / f"{name}.out", tmp / f"{name}.err"
        self._out, self._err = open(self.out_path, "wb"), open(self.err_path, "wb")
        self.started = time.monotonic()
        self.popen = subprocess.Popen([sys.executable, "-m", "flashjax", *map(str, args)], stdout=self._out,
                                      stderr=self._err, cwd=cwd or REPO, env=env or process_env(),
                                      start_new_session=True)

    def wait(self, timeout: float) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.popen.args} still running after {timeout} s; stderr:\n{self.err[-3000:]}")

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait()

    @property
    def out(self) -> str:
        self._out.flush()
        return self.out_path.read_text(errors="replace")

    @property
    def err(self) -> str:
        self._err.flush()
        return self.err_path.read_text(errors="replace")

    def last_json(self) -> dict:
        lines = self.out.strip().splitlines()
        assert lines, f"no output; stderr:\n{self.err[-3000:]}"
        return json.loads(lines[-1])


def start_cluster(args, tmp, n: int = 2, port: int | None = None, per_process=None, **kwargs) -> list[Proc]:
    port = port or free_port()
    procs = []
    for i in range(n):
        extra = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", n, "--process-id", i]
        if per_process is not None:
            extra = per_process(i, extra)
        procs.append(Proc([*args, *extra], tmp, f"p{i}", **kwargs))
    return procs


def cleanup(procs) -> None:
    for p in procs:
        if p.popen.poll() is None:
            p.kill()


def finish(procs, timeout: float = 600) -> list[int]:
    try:
        return [p.wait(timeout) for p in procs]
    finally:
        cleanup(procs)


def failure_text(procs) -> str:
    return "\n".join(f"--- process {i} (rc {p.popen.returncode}) stderr:\n{p.err[-4000:]}" for i, p in enumerate(procs))


# ---- the models ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gate_model(default_gguf, tmp_path_factory) -> str:
    """The default model converted, with the gate thresholds calibrated (training-free, on the README)."""
    from flashjax.sparsity import calibrate
    from flashjax.store import convert

    out = str(tmp_path_factory.mktemp("multiprocess") / "smollm2-flash")
    convert(str(default_gguf), out, progress=False)
    calibrate(out, texts=[(REPO / "README.md").read_text()], tokens=512, seq_len=128, kind="gate", progress=False)
    return out


# ---- one engine across two processes ---------------------------------------------------------------------

def test_flash_engine_across_two_processes(gate_model, tmp_path):
    with flashjax.load(gate_model, sparsity="gate", memory_budget=BUDGET, scratch_rows=SCRATCH_ROWS) as llm:
        one = llm.generate(PROMPT, max_tokens=TOKENS)
    procs = start_cluster(["generate", "--model", gate_model, "--sparsity", "gate", "--memory-budget", BUDGET,
                           "--scratch-rows", SCRATCH_ROWS, "--max-tokens", TOKENS, "--json", "--prompt", PROMPT],
                          tmp_path)
    assert finish(procs) == [0, 0], failure_text(procs)
    assert procs[1].out == "", "only process 0 prints"
    result = procs[0].last_json()
    assert result["tokens"] == one.tokens
    stats = result["stats"]
    assert stats["devices"] == 4
    # Every device caches, evicts and streams: each needs more neurons per token than its cache holds.
    rows, n_layers = stats["cache_rows_per_layer"], len(stats["processes"][0]["read_ranges"])
    assert 0 < rows < 1536 // 4
    assert stats["needed_neurons_per_token"] / n_layers / 4 > rows
    # ... and streams its surplus in more than one chunk (every chunk is a collective across the
    # processes: each must dispatch the same chunks, sized alike, from its own devices' reads).
    assert stats["needed_neurons_per_token"] / n_layers / 4 - rows > SCRATCH_ROWS
    assert stats["evicted_per_token"] > 0 and stats["cache_hit_rate"] > 0
    # Each process read only its own devices' neurons (whole blocks); together, every neuron.
    first, second = stats["processes"]
    assert (first["devices"], second["devices"]) == ([0, 1], [2, 3])
    assert (first["neurons"], second["neurons"]) == ([0, 768], [768, 1536])
    for p in (first, second):
        lo, hi = p["neurons"]
        assert p["bytes_read"] > 0 and p["bytes_read_per_token"] > 0
        for ranges in p["read_ranges"]:
            assert ranges and all(lo <= a < b <= hi for a, b in ranges), (p["process"], ranges)
    for layer in range(n_layers):
        # The prompt streams every neuron of every layer: each process its own half, no overlap.
        assert first["read_ranges"][layer] + second["read_ranges"][layer] == [[0, 768], [768, 1536]]


def test_dense_engine_across_two_processes(default_gguf, default_llm, tmp_path):
    one = default_llm.generate(PROMPT, max_tokens=TOKENS)
    procs = start_cluster(["generate", "--model", default_gguf, "--devices", 4, "--max-tokens", TOKENS, "--json",
                           "--prompt", PROMPT], tmp_path)
    assert finish(procs) == [0, 0], failure_text(procs)
    assert procs[1].out == ""
    result = procs[0].last_json()
    assert result["tokens"] == one.tokens
    assert result["stats"]["sparsity"] == "dense" and result["stats"]["devices"] == 4
    assert [p["devices"] for p in result["stats"]["processes"]] == [[0, 1], [2, 3]]


def _generating(procs, deadline_s: float = 400) -> None:
    """Waits until process 0 streams text: the generation is under way."""
    deadline = time.monotonic() + deadline_s
    while not procs[0].out.strip():
        assert all(p.popen.poll() is None for p in procs), failure_text(procs)
        assert time.monotonic() < deadline, failure_text(procs)
        time.sleep(0.2)
    time.sleep(1.0)


def test_a_killed_process_stops_the_others(default_gguf, tmp_path):
    """Losing a host mid-generation (its whole session killed), with the default heartbeat timeout:
    the survivor exits non-zero within 60 s, its last line naming the lost process. Once a worker
    (process 1: missed heartbeats), once the coordinator (process 0: at once); the second cluster
    loads while the first waits out its heartbeats."""
    args = ["generate", "--model", default_gguf, "--max-tokens", 2000, "--prompt", "Once upon a time"]
    clusters = {1: start_cluster(args, tmp_path / "lose1")}
    survivors, killed_at, exited = {}, {}, {}

    def time_exit(lost, survivor):
        survivor.popen.wait()
        exited[lost] = time.monotonic()

    try:
        for lost in (1, 0):
            procs = clusters[lost]
            _generating(procs)
            procs[lost].kill()
            killed_at[lost] = time.monotonic()
            survivors[lost] = procs[1 - lost]
            threading.Thread(target=time_exit, args=(lost, survivors[lost]), daemon=True).start()
            if lost == 1:
                clusters[0] = start_cluster(args, tmp_path / "lose0")
        while len(exited) < 2 and time.monotonic() - killed_at[0] < 120:
            time.sleep(0.1)
        for lost in (1, 0):
            survivor, text = survivors[lost], failure_text(clusters[lost])
            assert lost in exited, f"process {1 - lost} still running 120 s after losing process {lost}\n{text}"
            took = exited[lost] - killed_at[lost]
            assert survivor.popen.returncode != 0, text
            assert took < 60, f"the survivor took {took:.0f} s to stop\n{text}"
            last = survivor.err.strip().splitlines()[-1]
            assert last.startswith("flashjax: error:") and f"process {lost} of 2" in last, text
            assert "stopped answering" in last, last
            if lost == 0:
                assert "lost the coordinator" in last, last
    finally:
        for procs in clusters.values():
            cleanup(procs)


# ---- errors ----------------------------------------------------------------------------------------------

def test_unreachable_coordinator(tmp_path):
    port = free_port()
    p = Proc(["generate", "--prompt", "x", "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
              "--process-id", 1, "--join-timeout", 3], tmp_path, "alone")
    rc = p.wait(60)
    assert rc != 0
    assert f"process 1 of 2 could not reach the coordinator at 127.0.0.1:{port} within 3 s" in p.err, p.err


def test_mismatched_process_counts(tmp_path):
    """Process 1 says three processes (through the environment variables), process 0 two: both stop,
    naming process 1 and its count."""
    port = free_port()
    first = Proc(["generate", "--prompt", "x", "--coordinator", f"127.0.0.1:{port}", "--num-processes", 2,
                  "--process-id", 0], tmp_path, "p0")
    second = Proc(["generate", "--prompt", "x"], tmp_path, "p1",
                  env=process_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="3",
                                  JAX_PROCESS_ID="1"))
    procs = [first, second]
    rcs = finish(procs, 120)
    assert all(rc != 0 for rc in rcs), failure_text(procs)
    assert "process 1 of 2" in first.err and "--num-processes 3" in first.err, failure_text(procs)
    assert "--num-processes 3" in second.err and "started with 2" in second.err, failure_text(procs)


def test_model_path_missing_on_one_host(gate_model, tmp_path):
    """The same relative path, found from process 0's directory but not from process 1's (another host)."""
    here, there = tmp_path / "host0", tmp_path / "host1"
    (here / "models").mkdir(parents=True)
    (there / "models").mkdir(parents=True)
    os.symlink(gate_model, here / "models" / "m")
    cwd = {0: here, 1: there}
    port = free_port()
    procs = [Proc(["generate", "--model", "models/m", "--prompt", "x", "--coordinator", f"127.0.0.1:{port}",
                   "--num-processes", 2, "--process-id", i], tmp_path, f"p{i}", cwd=cwd[i]) for i in range(2)]
    rcs = finish(procs, 120)
    assert all(rc != 0 for rc in rcs), failure_text(procs)
    host = socket.gethostname()
    for p in procs:
        assert (f"the model path models/m is missing on {host} (process 1 of 2, as {there / 'models' / 'm'})"
                in p.err), failure_text(procs)


# ---- the pieces, without processes ---------------------------------------------------------------------

def _parsed(*argv):
    from flashjax.cli import build_parser
    return build_parser().parse_args(["generate", "--prompt", "x", *argv])


def test_settings_from_flags_then_environment():
    from flashjax.distributed import settings_from

    assert settings_from(_parsed(), {}) is None
    s = settings_from(_parsed("--coordinator", "h:1234", "--num-processes", "2", "--process-id", "1"), {})
    assert (s.coordinator, s.num_processes, s.process_id, s.host_port) == ("h:1234", 2, 1, ("h", 1234))
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:99", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    s = settings_from(_parsed("--process-id", "2"), env)  # a flag wins over its variable
    assert (s.coordinator, s.num_processes, s.process_id) == ("10.0.0.1:99", 4, 2)
    with pytest.raises(ValueError, match="--num-processes .* missing"):
        settings_from(_parsed("--coordinator", "h:1"), {"JAX_PROCESS_ID": "0"})
    with pytest.raises(ValueError, match="out of range"):
        settings_from(_parsed("--coordinator", "h:1", "--num-processes", "2", "--process-id", "2"), {})
    with pytest.raises(ValueError, match="HOST:PORT"):
        settings_from(_parsed("--coordinator", "h", "--num-processes", "2", "--process-id", "0"), {})
    assert s.collective_timeout_s == 600
    s = settings_from(_parsed("--collective-timeout", "45"), env)
    assert s.collective_timeout_s == 45
    with pytest.raises(ValueError, match="--collective-timeout must be at least 1 second"):
        settings_from(_parsed("--collective-timeout", "0"), env)
    from flashjax.cli import build_parser
    assert settings_from(build_parser().parse_args(["convert", "a", "b"]), env) is None  # runs alone


def test_the_engine_process_gets_the_collective_timeout():
    """A step whose peers never arrive fails after --collective-timeout instead of XLA:CPU's 30
    minutes: the supervisor puts the flag in the engine's XLA_FLAGS, keeping the user's flags and a
    timeout the user set there."""
    from flashjax.distributed import SUPERVISOR_ENV, Settings
    from flashjax.distributed.supervisor import engine_environment

    settings = Settings("h:1", 2, 0, collective_timeout_s=45)
    env = engine_environment(settings, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "A": "b"})
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2 --xla_cpu_collective_timeout_seconds=45"
    assert env["A"] == "b" and env[SUPERVISOR_ENV] == str(os.getpid())
    assert engine_environment(settings, {})["XLA_FLAGS"] == "--xla_cpu_collective_timeout_seconds=45"
    mine = {"XLA_FLAGS": "--xla_cpu_collective_timeout_seconds=7"}
    assert engine_environment(settings, mine)["XLA_FLAGS"] == "--xla_cpu_collective_timeout_seconds=7"


# What JAX's runtime logged in the runs above (trimmed), and what the supervisor makes of it.
_TABLE = "flashjax: 2 processes, 4 cpu devices: process 0 on host-a (devices 0-1), process 1 on host-b (devices 2-3)\n"
_HEARTBEAT = ("F1202 client.h:80] Terminating process because the JAX distributed service detected fatal errors. "
              "absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n{}\n"
              "The tasks have crashed. Check the task logs for an earlier error\n")


@pytest.mark.parametrize("me,log,expect", [
    (0, _TABLE + _HEARTBEAT.format("1"), "process 1 of 2 (on host-b) stopped answering: no heartbeat for 30 s"),
    (0, _TABLE + _HEARTBEAT.format("0\n1"), "this process among them"),
    (1, _TABLE + "F1202 client.h:80] Terminating process ... absl::Status: UNAVAILABLE: Failed to send RPC to "
                 "coordination service. Either the leader task was preempted/died", "lost the coordinator: process 0 "
                                                                                    "of 2 (on host-a), at h:1"),
    (1, "F1202 ... absl::Status: DEADLINE_EXCEEDED: Deadline Exceeded\n\nRPC: /xla.coordination."
        "CoordinationService/RegisterTask", "not every process joined the coordinator at h:1 within 120 s"),
    (1, "absl::Status: INVALID_ARGUMENT: Unexpected task registered with task=2", "does not expect process 2"),
    # Two processes fallen out of step (the deadlock of issue 16, with the pacing turned off and a 20 s
    # --collective-timeout): the all-reduce gave up waiting.
    (0, _TABLE + "flashjax: error: INTERNAL: Error dispatching computation: Error dispatching computation: Gloo "
                 "all-reduce failed: [external/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
                 "20000ms for recv operation to complete", "a step across processes waited 20 s for a peer in vain "
                                                           "(process 0 of 2 (on host-a))"),
    (0, "Traceback ...\nValueError: something else", None),
])
def test_the_supervisor_names_what_the_runtime_logged(me, log, expect):
    from flashjax.distributed import Settings, explain

    message = explain(log, Settings("h:1", 2, me), -6)
    assert (message is None) if expect is None else (expect in message), message


def test_read_ledger_counts_whole_blocks():
    import numpy as np

    from flashjax.distributed import ReadLedger

    class Store:
        ffn_block = 4

        def read_neurons_async(self, layer, ids):
            return type("Read", (), {"stats": type("S", (), {"bytes": 10 * len(ids), "neurons": len(ids)})})()

    ledger = ReadLedger(Store(), n_layers=2, d_ffn=30, block=4)
    ledger.read_neurons_async(0, np.array([0, 5, 6, 13, 29]))
    assert ledger.ranges(0) == [[0, 8], [12, 16], [28, 30]] and ledger.ranges(1) == []
    assert ledger.summary()["bytes_read"] == 50 and ledger.ffn_block == 4


def test_scratch_chunks_are_planned_from_every_devices_count():
    """Each scratch chunk is a collective step over the mesh: every process must dispatch the same
    chunks, padded alike, though it holds only its own devices' records. The plan depends on every
    device's count alone: a process whose devices stream little still dispatches the chunks a
    device of another process needs (the deadlock of issue 16 began where the counts differed)."""
    from flashjax.flash.sparse_ffn import scratch_plan

    # Devices 0 and 1 (process 0) stream 300 and 10 records; devices 2 and 3 (process 1) none.
    assert scratch_plan([300, 10, 0, 0], 128) == [(0, 128), (128, 128), (256, 64)]
    assert scratch_plan([0, 0, 5, 40], 128) == [(0, 64)]
    assert scratch_plan([0, 0, 0, 0], 128) == []
    # The last chunk is padded to what the longest device still has, not to a full chunk.
    assert scratch_plan([130, 129], 128) == [(0, 128), (128, 16)]
