"""This machine's memory read bandwidth, measured STREAM-style.

A buffer several times larger than any cache is read end to end by `threads` threads, each
reducing its own slice with `np.maximum` (the cheapest reduction numpy vectorises: one
SIMD max per loaded vector, so the loads, not the arithmetic, set the pace; a float sum
uses pairwise additions that fall short of memory speed on one core). numpy releases the
GIL inside the reduction, so the threads read in parallel. The best of a few passes is
reported, as STREAM does.
"""

from __future__ import annotations

import threading
import time

import numpy as np

DEFAULT_BYTES = 1 << 30


def read_bandwidth(threads: int = 1, nbytes: int = DEFAULT_BYTES, repeats: int = 5,
                   buffer: np.ndarray | None = None) -> float:
    """Bytes per second read by `threads` threads over a buffer of `nbytes` (best of `repeats`)."""
    if threads < 1:
        raise ValueError("threads must be >= 1")
    data = buffer if buffer is not None else np.ones(max(1, nbytes // 4), np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    for _ in range(repeats):
        workers = [threading.Thread(target=np.maximum.reduce, args=(p,)) for p in parts]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = min(best, time.perf_counter() - t0)
    return data.nbytes / best
