"""The engine process's side: joining the cluster (`start`), and `Cluster`, this process's view of
it: the exchange through the coordination service's key-value store, the model path check, the
read statistics gathered on process 0, and `flashjax serve`'s requests mirrored to the others."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time

from flashjax.distributed.settings import EXIT_LOST, SUPERVISOR_ENV, ClusterError, Settings


def _watch_supervisor() -> None:
    """Dies with the supervisor: a killed `flashjax` command must not leave its engine running."""
    parent = int(os.environ.get(SUPERVISOR_ENV, "0"))
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if parent and os.getppid() != parent:  # it died before prctl took hold
        os._exit(EXIT_LOST)

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(EXIT_LOST)

    if parent:
        threading.Thread(target=watch, name="flashjax-supervisor-watch", daemon=True).start()


def _route_stdout(leader: bool) -> None:
    """Native code's standard output (Gloo's "[Gloo] Rank ... connected" lines) goes to standard
    error; Python's goes to the real standard output on process 0, nowhere on the others."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    if not leader:
        os.close(real)
        sys.stdout = open(os.devnull, "w")
        return
    sys.stdout = os.fdopen(real, "w", encoding=sys.stdout.encoding or "utf-8",
                           errors=getattr(sys.stdout, "errors", None) or "strict",
                           buffering=1 if os.isatty(real) else -1)


def _probe(settings: Settings) -> None:
    """Process 0: the port must be free to bind. The others: the coordinator must answer (retried
    until the join timeout), so an unreachable one is one clear line, not a runtime abort."""
    host, port = settings.host_port
    if settings.process_id == 0:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            try:
                s.bind(("::" if ":" in host else "", port))
            except OSError as e:
                raise OSError(f"{settings.who} is the coordinator, but cannot listen on port {port}: "
                              f"{e.strerror or e} (another program, or another flashjax, holds it?)") from None
        return
    deadline, last = time.monotonic() + settings.join_timeout_s, None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(2.0, settings.join_timeout_s)):
                return
        except OSError as e:
            last = e
            time.sleep(0.25)
    raise OSError(f"{settings.who} could not reach the coordinator at {settings.coordinator} within "
                  f"{settings.join_timeout_s} s ({getattr(last, 'strerror', None) or last}): is process 0 running, "
                  f"with the same --coordinator, and is the port open between the hosts?")


def start(settings: Settings) -> "Cluster":
    """In the engine process, before anything touches a device: joins the cluster."""
    _watch_supervisor()
    _route_stdout(settings.process_id == 0)
    _probe(settings)
    import jax

    # The CPU's cross-process collectives (the default since JAX 0.5; set for older ones). GPUs and
    # TPUs use their own (NCCL, ICI) whatever this says.
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(settings.coordinator, settings.num_processes, settings.process_id,
                               initialization_timeout=settings.join_timeout_s,
                               heartbeat_timeout_seconds=settings.heartbeat_timeout_s)
    if threading.current_thread() is threading.main_thread():
        # JAX's preemption notifier has just taken SIGTERM (for TPU preemption); give it back, so
        # SIGTERM stops the command as it stops any other (`serve` installs its own handler).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    cluster = Cluster(settings)
    try:
        cluster.join()
    except ClusterError:
        sys.stderr.flush()
        jax.distributed.shutdown()  # every process stops with it: leave together
        raise
    return cluster


def _fingerprint(path: str) -> str | None:
    """Enough of a model path to tell two copies apart cheaply: a flash model's manifest (it holds
    every shard's sha256), a directory's file names and sizes, a file's size."""
    manifest = os.path.join(path, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest, "rb") as f:
            return "manifest sha256 " + hashlib.sha256(f.read()).hexdigest()[:16]
    if os.path.isdir(path):
        entries = sorted((name, os.path.getsize(os.path.join(path, name))) for name in os.listdir(path)
                         if os.path.isfile(os.path.join(path, name)))
        return "files " + hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]
    if os.path.isfile(path):
        return f"{os.path.getsize(path)} bytes"
    return None


class Cluster:
    """This process's view of the cluster, once joined (see `start`)."""

    def __init__(self, settings: Settings):
        import jax
        from jax._src import distributed as jax_distributed

        self.settings = settings
        self.process_id = jax.process_index()
        self.n = jax.process_count()
        self.host = socket.gethostname()
        # The coordination service's key-value store (what JAX's own multi-host utilities use).
        self._client = jax_distributed.global_state.client
        self._rounds: dict[str, int] = {}
        self.hosts: dict[int, str] = {}
        self._timeout_ms = settings.join_timeout_s * 1000

    @property
    def leader(self) -> bool:
        return self.process_id == 0

    def name(self, p: int) -> str:
        return f"process {p} of {self.n}" + (f" (on {self.hosts[p]})" if p in self.hosts else "")

    # -- the key-value store --

    def _key(self, tag: str) -> str:
        k = self._rounds.get(tag, 0)
        self._rounds[tag] = k + 1
        return f"flashjax/{tag}/{k}"

    def exchange(self, tag: str, value) -> list:
        """Every process's `value` (JSON), in process order, on every process."""
        key = self._key(tag)
        self._client.key_value_set(f"{key}/{self.process_id}", json.dumps(value))
        return [json.loads(self._client.blocking_key_value_get(f"{key}/{p}", self._timeout_ms)) for p in range(self.n)]

    def gather(self, tag: str, value) -> list | None:
        """Every process's `value` on process 0 (None on the others)."""
        key = self._key(tag)
        self._client.key_value_set(f"{key}/{self.process_id}", json.dumps(value))
        if not self.leader:
            return None
        return [json.loads(self._client.blocking_key_value_get(f"{key}/{p}", self._timeout_ms)) for p in range(self.n)]

    # -- joining --

    def join(self) -> None:
        """Every process's host, declared count and devices; prints the table (the supervisor reads
        the hosts from it); a count that differs stops every process."""
        import jax

        s = self.settings
        mine = sorted(i for i, d in enumerate(jax.devices()) if d.process_index == self.process_id)
        hello = {"host": self.host, "num_processes": s.num_processes, "devices": mine,
                 "platform": jax.devices()[0].platform}
        if self.n != s.num_processes:
            # The coordinator counted otherwise: say so to the others before stopping.
            try:
                self._client.key_value_set(f"flashjax/hello/0/{self.process_id}", json.dumps(hello))
            except Exception:  # noqa: BLE001 - the error below says what matters
                pass
            raise ClusterError(f"{s.who} was started with --num-processes {s.num_processes}, but the coordinator at "
                               f"{s.coordinator} was started with {self.n}: every process needs the same "
                               f"--num-processes")
        everyone = self.exchange("hello", hello)
        self.hosts = {p: h["host"] for p, h in enumerate(everyone)}
        wrong = [p for p, h in enumerate(everyone) if h["num_processes"] != self.n]
        if wrong:
            raise ClusterError(", ".join(f"{self.name(p)} was started with --num-processes "
                                         f"{everyone[p]['num_processes']}" for p in wrong)
                               + f"; the coordinator at {s.coordinator} counts {self.n}: every process needs the "
                                 f"same --num-processes")
        table = ", ".join(f"process {p} on {h['host']} (devices {_span(h['devices'])})" for p, h in enumerate(everyone))
        print(f"flashjax: {self.n} processes, {jax.device_count()} {hello['platform']} devices: {table}; "
              f"this is process {self.process_id}", file=sys.stderr, flush=True)

    def check_paths(self, paths: dict[str, str], required: tuple[str, ...] = ()) -> None:
        """Each of `paths` ({what: path}) exists on every host or on none (then, unless `required`, it
        is a name: a built-in model or a Hub id, resolved on each host), and its copies look alike."""
        found = {what: {"exists": os.path.exists(path), "abs": os.path.abspath(path), "fingerprint": _fingerprint(path)}
                 for what, path in paths.items()}
        everyone = self.exchange("paths", found)
        problems = []
        for what, path in paths.items():
            seen = [e[what] for e in everyone]
            missing = [p for p, e in enumerate(seen) if not e["exists"]]
            if missing and (len(missing) < self.n or what in required):
                where = "; ".join(f"{self.hosts.get(p, '?')} (process {p} of {self.n}, as {seen[p]['abs']})"
                                  for p in missing)
                problems.append(f"the {what} path {path} is missing on {where}: every process needs it at the same "
                                f"path (a copy on each host, or a shared file system)")
            elif not missing and len({e["fingerprint"] for e in seen}) > 1:
                copies = "; ".join(f"{self.name(p)}: {e['fingerprint']}" for p, e in enumerate(seen))
                problems.append(f"the {what} at {path} differs between hosts ({copies}): every process needs the "
                                f"same copy")
        if problems:
            raise ClusterError("; ".join(problems))

    def devices(self, requested: int | None) -> int:
        """`--devices`: every device of the cluster unless given (each process computes every step)."""
        import jax

        from flashjax.flash.shards import make_mesh

        n = jax.device_count() if requested is None else requested
        make_mesh(n)  # the same clear error, for the dense engine too, when a process is left out
        return n

    # -- reporting --

    def report(self, llm) -> dict:
        """This process's share: its host and devices, and with the flash engine the neurons its
        devices own and the blocks it read (`track_reads`)."""
        runner = llm.runner
        entry = {"process": self.process_id, "host": self.host}
        mesh = getattr(runner, "mesh", None) or getattr(getattr(runner, "parallel", None), "mesh", None)
        if mesh is not None:
            entry["devices"] = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == self.process_id]
        ledger = getattr(runner, "read_ledger", None)
        if ledger is not None:
            part = runner.partition
            own = [(part.offsets[s], part.offsets[s + 1]) for s in entry["devices"]]
            entry["neurons"] = [int(min(a for a, _ in own)), int(max(b for _, b in own))]
            entry.update(ledger.summary())
            stats = runner.stats()
            for key in ("bytes_read_per_token", "neurons_read_per_token", "decode_ms_per_token"):
                entry[key] = stats.get(key)
        return entry

    # -- serving: process 0 leads, the others follow --

    def lead(self, llm):
        """Makes `llm` send every generation (its calls and each step) to the other processes."""
        channel = _Channel(self, "serve")
        inner_generate, inner_close = llm.generate_ids, llm.close
        closed = []

        def generate_ids(prompt_ids, *, max_tokens: int = 256, sampling=None, stop_at_eos: bool = True):
            from flashjax.sampling import SamplingParams

            sampling = sampling or SamplingParams()
            ids = [int(t) for t in prompt_ids]
            channel.send({"op": "generate", "prompt": ids, "max_tokens": int(max_tokens),
                          "sampling": dataclasses.asdict(sampling), "stop_at_eos": bool(stop_at_eos)})
            try:
                gen = inner_generate(ids, max_tokens=max_tokens, sampling=sampling, stop_at_eos=stop_at_eos)
            except BaseException:
                channel.send({"op": "close"})
                raise
            return _Mirrored(channel, gen)

        def close():
            if not closed:
                closed.append(True)
                channel.send({"op": "stop"})
            inner_close()

        llm.generate_ids, llm.close = generate_ids, close
        return llm

    def follow(self, llm) -> int:
        """The other processes' `serve`: the same generations as process 0, step for step, until it
        stops."""
        from flashjax.sampling import SamplingParams

        channel, gen = _Channel(self, "serve"), None
        try:
            while True:
                msg = channel.recv()
                op = msg["op"]
                try:
                    if op == "generate":
                        gen = llm.generate_ids(msg["prompt"], max_tokens=msg["max_tokens"],
                                               sampling=SamplingParams(**msg["sampling"]),
                                               stop_at_eos=msg["stop_at_eos"])
                    elif op == "next" and gen is not None:
                        next(gen)
                    elif op == "close" and gen is not None:
                        gen.close()
                        gen = None
                    elif op == "stop":
                        return 0
                except StopIteration:
                    gen = None
                except (ValueError, RuntimeError) as e:  # process 0 met the same and answered the client
                    print(f"flashjax: {self.name(self.process_id)}: request failed as on process 0: {e}",
                          file=sys.stderr)
                    gen = None
        finally:
            llm.close()

    # -- the end --

    def finish(self, ok: bool, error: BaseException | None = None, rc: int = 2) -> None:
        """After the command: a clean run, or an error every process met alike, leaves together
        (jax.distributed.shutdown waits for all); any other error leaves at once, and the others
        learn of it from the missing heartbeats."""
        sys.stdout.flush()
        sys.stderr.flush()
        if ok or isinstance(error, ClusterError):
            import jax
            jax.distributed.shutdown()
            return
        if error is not None and _peer_lost(error):
            # Another process died mid-step. The runtime names it once its heartbeats are missed (and
            # ends this process); give it that long.
            time.sleep(self.settings.heartbeat_timeout_s + 10)
        os._exit(rc or 2)


def _peer_lost(error: BaseException) -> bool:
    """Whether a step failed because a peer went away (the runtime names it after the heartbeat
    timeout); a step that timed out waiting for live peers is not that: every process stops at once."""
    text = str(error)
    if "Timed out waiting" in text:
        return False
    return "Gloo" in text or "Connection reset" in text or "Connection closed" in text


def _span(ids: list[int]) -> str:
    if ids and ids == list(range(ids[0], ids[-1] + 1)) and len(ids) > 1:
        return f"{ids[0]}-{ids[-1]}"
    return ", ".join(map(str, ids))


class _Channel:
    """Messages from process 0 to the others, in order, through the key-value store."""

    KEEP = 256  # messages kept before the oldest is deleted: followers are never that far behind

    def __init__(self, cluster: Cluster, name: str):
        self.cluster, self.name, self.n = cluster, name, 0

    def send(self, msg: dict) -> None:
        client = self.cluster._client
        client.key_value_set(f"flashjax/{self.name}/{self.n}", json.dumps(msg))
        if self.n >= self.KEEP:
            try:
                client.key_value_delete(f"flashjax/{self.name}/{self.n - self.KEEP}")
            except Exception:  # noqa: BLE001 - a key left behind costs a few bytes
                pass
        self.n += 1

    def recv(self) -> dict:
        key = f"flashjax/{self.name}/{self.n}"
        while True:
            try:
                value = self.cluster._client.blocking_key_value_get(key, 60_000)
                break
            except Exception as e:  # noqa: BLE001 - an idle server: wait on
                if "DEADLINE_EXCEEDED" not in str(e) and "Deadline" not in str(e):
                    raise
        self.n += 1
        return json.loads(value)


class _Mirrored:
    """A generation on process 0 whose every step the other processes take too."""

    def __init__(self, channel: _Channel, gen):
        self.channel, self.gen, self.done = channel, gen, False

    def __iter__(self):
        return self

    def __next__(self):
        if self.done:
            raise StopIteration
        self.channel.send({"op": "next"})
        try:
            return next(self.gen)
        except BaseException:
            self.done = True
            raise

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.channel.send({"op": "close"})
            self.gen.close()
