"""One collective step in flight at a time when the mesh spans processes.

The FFN steps (`kernels.layer_step`, `kernels.ffn_step`) end in a sum over the mesh's devices; across
processes on CPU that is a Gloo all-reduce, and XLA:CPU runs it on a worker of a small pool (one per
core) that blocks until every device has arrived. Each device also admits only so many programs in
flight, and launches run on a pool of their own, not in dispatch order. With a layer streamed in
several scratch chunks a process dispatches many such programs ahead of its peer, and two processes
deadlocked (issue 16): in one, a device's launch of the oldest program waited for an in-flight slot
while its other device sat in that program's all-reduce; in the other, both devices sat in an
all-reduce waiting for it. Waiting for the previous step before dispatching the next keeps a single
collective program in flight, so nothing queues behind it; the host's work for the next step (the
reads, the padding) still overlaps the current step's compute. On one process nothing waits:
collectives there are a rendezvous in memory, and dispatch runs ahead as before.
"""

from __future__ import annotations

import jax


class StepPacer:
    """Calls a jitted FFN step; across processes, first waits until the previous one has finished."""

    def __init__(self, across_processes: bool):
        self.across_processes = across_processes
        self._pending = None  # the previous step's residual stream, while it may still be computing

    def __call__(self, step, *args, **kwargs):
        if self._pending is not None:
            self._pending.block_until_ready()
            self._pending = None
        out = step(*args, **kwargs)
        if self.across_processes:
            # Every FFN step returns the residual stream first; on CPU a program's outputs are ready
            # together, so that one array tells when the whole step is done. (Not the whole output:
            # the next step may donate some of it.)
            self._pending = out[0]
        return out
