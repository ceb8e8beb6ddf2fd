"""The prefetch thread: issues the disk reads of layers ahead of the compute, through a bounded queue.

It moves bytes only (TensorStore reads into host arrays) and never calls model
code. The engine submits (layer, neuron ids) requests in layer order as soon
as it knows them; the thread keeps up to `depth` layers' reads in flight and
hands finished records back in the same order. The bounded output queue is
what bounds the memory the reads take (`depth` layers at most).
"""

from __future__ import annotations

import collections
import queue
import threading
import time

import numpy as np


class Prefetcher:
    def __init__(self, store, depth: int = 2):
        self.store, self.depth = store, max(1, depth)
        self._requests: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue(maxsize=self.depth)
        self._thread = threading.Thread(target=self._run, name="flashjax-prefetch", daemon=True)
        self._thread.start()

    def submit(self, layer: int, ids: np.ndarray) -> None:
        self._requests.put((layer, ids))

    def get(self):
        """(layer, records [len(ids), R], the finished read (its `.stats`), seconds the caller waited) of
        the oldest request."""
        t0 = time.perf_counter()
        item = self._results.get()
        waited = time.perf_counter() - t0
        if isinstance(item, BaseException):
            raise item
        layer, rows, read = item
        return layer, rows, read, waited

    def close(self) -> None:
        self._requests.put(None)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        inflight: collections.deque = collections.deque()
        while True:
            # Keep issuing while requests are waiting and fewer than `depth` layers are in flight.
            block = not inflight
            try:
                request = self._requests.get(block=block)
            except queue.Empty:
                request = ...
            if request is None:
                return
            if request is not ...:
                layer, ids = request
                try:
                    inflight.append((layer, self.store.read_neurons_async(layer, ids)))
                except BaseException as e:  # hand the error to the engine thread
                    self._results.put(e)
                    continue
                if len(inflight) < self.depth and not self._requests.empty():
                    continue
            if inflight:
                layer, pending = inflight.popleft()
                try:
                    self._results.put((layer, pending.result(), pending))
                except BaseException as e:
                    self._results.put(e)
