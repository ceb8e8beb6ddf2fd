"""One engine across several processes (hosts): `jax.distributed`, from the command line.

    flashjax generate --model M --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 0 ...   # host A
    flashjax generate --model M --coordinator 10.0.0.1:1234 --num-processes 2 --process-id 1 ...   # host B

Every process runs the same command. The mesh holds every process's devices (`--devices` defaults
to all of them), each process fills and reads only its own devices' shards (flash/shards.py,
flash/sparse_ffn.py), and the steps' reductions cross processes through the platform's
collectives: on the CPU JAX's Gloo implementation (`jax_cpu_collectives_implementation="gloo"`,
set in cluster.py), on GPUs and TPUs their own (NCCL, ICI). Process 0 prints (or serves); the
others print nothing on standard output.

Four parts:

- settings.py, `Settings`: `--coordinator HOST:PORT --num-processes N --process-id I` or, where a
  flag is absent, `JAX_COORDINATOR_ADDRESS` (which `jax.distributed.initialize` reads itself),
  `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`.
- supervisor.py, `supervise`: the command the user started runs the engine in a child process and
  watches its standard error. When a peer dies, JAX's coordination service ends the surviving
  processes from C++ (an abort after the heartbeat timeout, or at once when the coordinator is
  gone), leaving no chance to say anything in Python; the supervisor reads what the runtime logged
  and ends with one line naming the process that was lost, and its host. Killing the supervisor
  kills the child.
- cluster.py, `Cluster` (in the child): checks before joining (the coordinator answers, the port is
  free), `jax.distributed.initialize` with bounded join and heartbeat timeouts, then an exchange
  through the coordination service's key-value store: every process's host, declared process count
  and, before loading, whether the model path exists there (a missing path names the host). Process
  0 gathers every process's read statistics; `flashjax serve` sends each request (and each step of
  it) from process 0 to the others, which follow.
- reads.py, `ReadLedger`: what each process read, per layer (its statistics show it read only its
  own devices' neurons).
"""

from flashjax.distributed.cluster import Cluster, start
from flashjax.distributed.reads import ReadLedger, track_reads
from flashjax.distributed.settings import (
    EXIT_LOST,
    SUPERVISOR_ENV,
    ClusterError,
    Settings,
    add_arguments,
    is_worker,
    settings_from,
)
from flashjax.distributed.supervisor import explain, supervise

__all__ = ["EXIT_LOST", "SUPERVISOR_ENV", "Cluster", "ClusterError", "ReadLedger", "Settings", "add_arguments",
           "explain", "is_worker", "settings_from", "start", "supervise", "track_reads"]
