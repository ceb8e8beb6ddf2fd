"""Cold random-read throughput of the disk by chunk size and reads in flight: the I/O ceiling.

Writes a temporary file (default 1 GiB) in `--dir` (put it on the disk the models live on),
then for each chunk size (4 KiB .. 1 MiB) and number of threads (1 .. 32, each issuing
os.pread): drops the file from the page cache (posix_fadvise DONTNEED), turns readahead off
(POSIX_FADV_RANDOM: only the bytes asked for are read) and reads distinct, aligned, randomly
ordered chunks for `--seconds` (or until every chunk was read once). /proc/self/io read_bytes
confirms the reads reached the device.

    python benchmarks/disk_probe.py --dir /path/on/the/model/disk [--size-mib 1024] [--json]
    python -m flashjax.bench.disk_probe ...        (the same, without the repository)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np

from flashjax.bench.common import log
from flashjax.bench.peers import read_bytes

CHUNKS = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20]
THREADS = [1, 2, 4, 8, 16, 32]


def _write_file(path: str, size: int) -> None:
    block = 16 << 20
    with open(path, "wb") as f:
        left = size
        while left > 0:
            n = min(block, left)
            f.write(os.urandom(n))  # incompressible: no layer below can cheat
            left -= n
        f.flush()
        os.fsync(f.fileno())


def _measure(fd: int, size: int, chunk: int, threads: int, seconds: float, seed: int) -> dict:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    order = np.random.RandomState(seed).permutation(size // chunk)
    lanes = [order[t::threads] for t in range(threads)]
    counts = [0] * threads
    deadline = [0.0]
    start = threading.Barrier(threads + 1)

    def worker(t):
        start.wait()
        n = 0
        for idx in lanes[t]:
            if time.perf_counter() > deadline[0]:
                break
            if len(os.pread(fd, chunk, int(idx) * chunk)) != chunk:
                raise OSError("short read")
            n += 1
        counts[t] = n

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    b0 = read_bytes()
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    start.wait()
    for th in pool:
        th.join()
    elapsed = time.perf_counter() - t0
    nbytes = sum(counts) * chunk
    return {"chunk_bytes": chunk, "threads": threads, "reads": sum(counts), "bytes": nbytes,
            "seconds": elapsed, "mb_per_s": nbytes / elapsed / 1e6,
            "iops": sum(counts) / elapsed, "device_read_bytes": read_bytes() - b0}


def probe(directory: str | None = None, size_mib: int = 1024, chunks=None, threads=None, seconds: float = 0.5,
          keep: bool = False) -> dict:
    """Measures every (chunk size, threads) point; returns {"points": [...], "best_mb_per_s_by_chunk": ...}."""
    chunks = chunks or CHUNKS
    threads = threads or THREADS
    directory = directory or tempfile.gettempdir()
    os.makedirs(directory, exist_ok=True)
    size = size_mib << 20
    fd_, path = tempfile.mkstemp(prefix="flashjax-disk-probe-", dir=directory)
    os.close(fd_)
    t_start = time.perf_counter()
    try:
        log(f"disk probe: writing {size_mib} MiB to {path}")
        _write_file(path, size)
        fd = os.open(path, os.O_RDONLY)
        points = []
        try:
            for chunk in chunks:
                for t in threads:
                    pt = _measure(fd, size, chunk, t, seconds, seed=len(points))
                    points.append(pt)
                    log(f"  chunk {chunk >> 10:5d} KiB, {t:2d} in flight: {pt['mb_per_s']:8.1f} MB/s "
                        f"({pt['iops']:.0f} reads/s; device read {pt['device_read_bytes'] / 1e6:.1f} of "
                        f"{pt['bytes'] / 1e6:.1f} MB)")
        finally:
            os.close(fd)
    finally:
        if not keep:
            os.unlink(path)
    best = {}
    for pt in points:
        c = str(pt["chunk_bytes"])
        if c not in best or pt["mb_per_s"] > best[c]["mb_per_s"]:
            best[c] = {"mb_per_s": pt["mb_per_s"], "threads": pt["threads"]}
    cold = all(pt["device_read_bytes"] >= 0.5 * pt["bytes"] for pt in points) if points else None
    return {"directory": os.path.abspath(directory), "file_bytes": size, "seconds_per_point": seconds,
            "readahead": "off (POSIX_FADV_RANDOM)", "points": points, "best_by_chunk": best,
            "ceiling_mb_per_s": max((b["mb_per_s"] for b in best.values()), default=None),
            "reads_reached_device": cold, "wall_s": time.perf_counter() - t_start}


def throughput_for(probe_result: dict, read_size: float) -> tuple[int, float] | None:
    """(chunk size, best MB/s over the thread counts) at the probed chunk size closest to
    `read_size` (log scale)."""
    best = probe_result.get("best_by_chunk") or {}
    if not best or not read_size or read_size <= 0:
        return None
    chunk = min((int(c) for c in best), key=lambda c: abs(np.log(c) - np.log(read_size)))
    return chunk, best[str(chunk)]["mb_per_s"]


def markdown(probe_result: dict) -> str:
    chunks = sorted({p["chunk_bytes"] for p in probe_result["points"]})
    threads = sorted({p["threads"] for p in probe_result["points"]})
    cell = {(p["chunk_bytes"], p["threads"]): p["mb_per_s"] for p in probe_result["points"]}
    lines = ["| chunk \\ reads in flight | " + " | ".join(str(t) for t in threads) + " |",
             "|---|" + "---|" * len(threads)]
    for c in chunks:
        lines.append(f"| {c >> 10} KiB | " + " | ".join(
            f"{cell[(c, t)]:.0f}" if (c, t) in cell else "-" for t in threads) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default=None, help="where the temporary file goes (the disk to measure)")
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=0.5, help="per measurement")
    p.add_argument("--chunks-kib", type=int, nargs="*", default=None)
    p.add_argument("--threads", type=int, nargs="*", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = probe(args.dir, args.size_mib, [c << 10 for c in args.chunks_kib] if args.chunks_kib else None,
                   args.threads, args.seconds)
    print("MB/s, cold random reads (readahead off):")
    print(markdown(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
