"""The supervisor: the process the user started. It runs the engine in a child process and turns
what the distributed runtime logged when it ended the child into one line naming the lost process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

from flashjax.distributed.settings import COLLECTIVE_TIMEOUT_FLAG, EXIT_LOST, SUPERVISOR_ENV, Settings

_FRAME = re.compile(rb"^\s+@\s+0x[0-9a-f]+\s")  # a line of a C++ crash's stack dump: nothing for a user


def supervise(argv: list[str], settings: Settings) -> int:
    """Runs `python -m flashjax ARGV` as the engine process, forwarding its output and signals;
    returns its exit status, after one line naming the lost process when the runtime ended it."""
    env = engine_environment(settings)
    child = subprocess.Popen([sys.executable, "-m", "flashjax", *argv], env=env, stderr=subprocess.PIPE,
                             start_new_session=True)  # Ctrl-C reaches it once, through us
    forwarded = {}

    def forward(signum, frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        try:
            forwarded[sig] = signal.signal(sig, forward)
        except (ValueError, OSError):  # not the main thread
            pass
    tail = bytearray()
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    pending = b""
    try:
        while True:
            chunk = os.read(child.stderr.fileno(), 65536)
            if not chunk:
                break
            tail += chunk
            del tail[:-262144]
            pending += chunk
            # Forward whole lines (a progress bar's \r counts as one end), leaving out stack frames.
            cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1
            if cut:
                lines = re.split(rb"(?<=[\r\n])", pending[:cut])
                text = b"".join(line for line in lines if not _FRAME.match(line))
                pending = pending[cut:]
                if out is not None and text:
                    out.write(text)
                    out.flush()
        if pending and out is not None:
            out.write(pending)
            out.flush()
        rc = child.wait()
    finally:
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)
    if rc == 0:
        return 0
    message = explain(tail.decode("utf-8", "replace"), settings, rc)
    if message:
        print(f"flashjax: error: {message}", file=sys.stderr, flush=True)
        return EXIT_LOST
    return rc if rc > 0 else 128 - rc


def engine_environment(settings: Settings, environ=os.environ) -> dict:
    """The engine process's environment: ours, marked as supervised, with the collective timeout in
    XLA_FLAGS (XLA reads it when the engine's backend starts; a value the user set there stays)."""
    env = dict(environ, **{SUPERVISOR_ENV: str(os.getpid())})
    flags = env.get("XLA_FLAGS", "")
    if COLLECTIVE_TIMEOUT_FLAG not in flags:
        env["XLA_FLAGS"] = f"{flags} {COLLECTIVE_TIMEOUT_FLAG}={settings.collective_timeout_s}".strip()
    return env


def _hosts(log: str) -> dict[int, str]:
    """Process id -> host, from the line every process prints once it has joined."""
    return {int(p): h for p, h in re.findall(r"process (\d+) on (\S+) \(devices", log)}


def explain(log: str, settings: Settings, rc: int) -> str | None:
    """What the distributed runtime's own log (the child's standard error) says went wrong, in one
    line naming the process; None when it says nothing about the cluster."""
    hosts = _hosts(log)
    n, me = settings.num_processes, settings.process_id

    def name(p: int) -> str:
        return f"process {p} of {n}" + (f" (on {hosts[p]})" if p in hosts else "")

    stopped = f"; {name(me)} stopped too"
    unhealthy = re.search(r"tasks are unhealthy \(stopped sending heartbeats\):\s*\n?([\d,\s]+?)\s*\n?The tasks",
                          log)
    if unhealthy:
        lost = [int(t) for t in re.findall(r"\d+", unhealthy.group(1))]
        lost_text = ", ".join(name(p) for p in lost)
        if me in lost:
            # Its own heartbeats missed too: the coordinator's host (or this one) stalled, not a peer.
            return (f"the coordinator heard no heartbeat for {settings.heartbeat_timeout_s} s from {lost_text}, this "
                    f"process among them: a host stalled (overloaded, swapping) or the network did, rather than "
                    f"one process dying; raise --heartbeat-timeout if the hosts are this busy")
        return (f"{lost_text} stopped answering: no heartbeat for {settings.heartbeat_timeout_s} s (it crashed, "
                f"was killed, or its host or network is down){stopped}")
    if "Unexpected task registered with task=" in log:
        task = re.search(r"Unexpected task registered with task=(\d+)", log).group(1)
        return (f"the coordinator at {settings.coordinator} does not expect process {task}: it was started with "
                f"fewer processes than --num-processes {n}; every process needs the same --num-processes")
    if "RegisterTask" in log and ("DEADLINE_EXCEEDED" in log or "Deadline Exceeded" in log):
        return (f"not every process joined the coordinator at {settings.coordinator} within "
                f"{settings.join_timeout_s} s ({name(me)} waited): start all {n} processes, with process ids "
                f"0..{n - 1} and the same --coordinator and --num-processes")
    if me != 0 and ("Failed to send RPC to coordination service" in log
                    or re.search(r"coordination_service.*(Socket closed|Connection reset|UNAVAILABLE)", log)):
        return (f"lost the coordinator: {name(0)}, at {settings.coordinator}, stopped answering (it crashed, "
                f"was killed, or its host or network is down){stopped}")
    status = re.search(r"JAX distributed service detected fatal errors.*?absl::Status: ([^\n]*)", log, re.S)
    if status:
        return f"the distributed runtime stopped {name(me)}: {status.group(1).strip()}"
    waited = re.search(r"Gloo [\w-]+ failed: .*Timed out waiting (\d+) ?ms for (recv|send)", log)
    if waited:
        return (f"a step across processes waited {int(waited.group(1)) // 1000} s for a peer in vain ({name(me)}): "
                f"the processes fell out of step or one stalled; every process stops. Raise --collective-timeout "
                f"only if single steps are that slow")
    if re.search(r"Gloo.*(Connection reset|Connection closed|Read error|Write error)", log):
        return f"a peer process closed its connection mid-step{stopped}"
    return None
