"""Shared bench helpers: same-run memory bandwidth and a description of the machine."""

from __future__ import annotations

import datetime as dt
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def bandwidth(threads: int, mib: int = 256, repeats: int = 5) -> float:
    """Best read+write bandwidth in GB/s of ``threads`` concurrent np.copyto of ``mib`` MiB each.

    Counts bytes read plus bytes written, the same accounting as the memory-bound rates.
    """
    n = mib * 2**20 // 8
    bufs = [(np.ones(n), np.empty(n)) for _ in range(threads)]
    for a, b in bufs:
        np.copyto(b, a)  # fault the pages in
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(lambda ab: np.copyto(ab[1], ab[0]), bufs))
            best = min(best, time.perf_counter() - t0)
    return 2 * n * 8 * threads / best / 1e9


def machine() -> dict[str, object]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "ram_gib": round(ram, 1),
        "numpy": np.__version__,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%MZ"),
    }
