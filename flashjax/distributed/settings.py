"""The distributed settings of a command: flags first, then JAX's environment variables."""

from __future__ import annotations

import dataclasses
import os

SUPERVISOR_ENV = "FLASHJAX_DISTRIBUTED_SUPERVISOR"  # set in the child: the supervisor's pid
ENV = {"coordinator": "JAX_COORDINATOR_ADDRESS", "num_processes": "JAX_NUM_PROCESSES",
       "process_id": "JAX_PROCESS_ID"}
DEFAULT_JOIN_TIMEOUT_S = 120
DEFAULT_HEARTBEAT_TIMEOUT_S = 30
# A step across processes waits this long for its peers; then it fails instead of hanging. Peers run the
# same steps on the same amount of work, so they arrive within a layer's time of each other: only
# processes that fell out of step, or a stalled one, wait minutes (XLA:CPU's own default is 30 min).
DEFAULT_COLLECTIVE_TIMEOUT_S = 600
COLLECTIVE_TIMEOUT_FLAG = "--xla_cpu_collective_timeout_seconds"
EXIT_LOST = 3  # a peer was lost, or the processes could not all join


class ClusterError(ValueError):
    """A problem every process finds alike (from the exchange), so every process stops with it."""


@dataclasses.dataclass(frozen=True)
class Settings:
    coordinator: str
    num_processes: int
    process_id: int
    join_timeout_s: int = DEFAULT_JOIN_TIMEOUT_S
    heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S
    collective_timeout_s: int = DEFAULT_COLLECTIVE_TIMEOUT_S

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.coordinator.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def who(self) -> str:
        return f"process {self.process_id} of {self.num_processes}"


def add_arguments(p) -> None:
    """The distributed options of a command (generate, eval, serve)."""
    g = p.add_argument_group("several processes (jax.distributed; every process runs the same command)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="process 0's address, where the others join (default: $JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=None, metavar="N",
                   help="processes in all (default: $JAX_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None, metavar="I",
                   help="this process, 0..N-1; process 0 prints or serves (default: $JAX_PROCESS_ID)")
    g.add_argument("--join-timeout", type=int, default=DEFAULT_JOIN_TIMEOUT_S, metavar="S",
                   help="seconds to wait for the coordinator and for every process to join")
    g.add_argument("--heartbeat-timeout", type=int, default=DEFAULT_HEARTBEAT_TIMEOUT_S, metavar="S",
                   help="a process silent this long counts as lost, and every process stops")
    g.add_argument("--collective-timeout", type=int, default=DEFAULT_COLLECTIVE_TIMEOUT_S, metavar="S",
                   help="a step across processes that waits this long for a peer fails, and every process stops "
                        "(CPU: Gloo's all-reduce; the engine's XLA_FLAGS get " + COLLECTIVE_TIMEOUT_FLAG + ")")


def settings_from(args, environ=os.environ) -> Settings | None:
    """The command's distributed settings (flags first, then the environment), or None to run alone.
    Raises ValueError for incomplete or inconsistent settings."""
    if not hasattr(args, "coordinator"):
        return None  # a command that runs alone (convert, chat, ...)
    given = {}
    for name, var in ENV.items():
        value = getattr(args, name)
        if value is None and environ.get(var, "").strip():
            value = environ[var].strip()
            if name != "coordinator":
                try:
                    value = int(value)
                except ValueError:
                    raise ValueError(f"{var}={environ[var]!r} is not a whole number") from None
        given[name] = value
    if all(v is None for v in given.values()):
        return None
    flags = {"coordinator": "--coordinator", "num_processes": "--num-processes", "process_id": "--process-id"}
    missing = [f"{flags[n]} (or {ENV[n]})" for n, v in given.items() if v is None]
    if missing:
        present = ", ".join(flags[n] for n, v in given.items() if v is not None)
        raise ValueError(f"{present} given, but {' and '.join(missing)} missing: several processes need all three")
    coordinator, n, i = given["coordinator"], given["num_processes"], given["process_id"]
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--coordinator {coordinator!r}: expected HOST:PORT, e.g. 10.0.0.1:1234")
    if n < 1:
        raise ValueError(f"--num-processes must be at least 1, got {n}")
    if not 0 <= i < n:
        raise ValueError(f"--process-id {i} is out of range for --num-processes {n} (0..{n - 1})")
    if args.join_timeout < 1 or args.heartbeat_timeout < 1 or args.collective_timeout < 1:
        raise ValueError("--join-timeout, --heartbeat-timeout and --collective-timeout must be at least 1 second")
    return Settings(coordinator, n, i, args.join_timeout, args.heartbeat_timeout, args.collective_timeout)


def is_worker(environ=os.environ) -> bool:
    return bool(environ.get(SUPERVISOR_ENV))
