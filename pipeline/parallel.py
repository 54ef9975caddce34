"""Where the array stages' windows run: local threads (default), a dask LocalCluster, or SLURM jobs.

Ingest, gapfill and histogram process a tile as independent 512-px windows that read from and write
to zarr stores on a shared filesystem. By default a thread pool runs them (codecs and compiled
kernels release the GIL). ``dask: {cluster: slurm}`` sends the windows to dask workers started as
SLURM jobs by dask-jobqueue, so one tile's stage can spread over several nodes; ``cluster: local``
uses a dask LocalCluster of processes on this machine (mostly to prove the stage's window function
survives being shipped to another process).

Window functions must therefore be self-contained (no shared mutable state): they return their
result, which the caller merges in its own thread as results arrive.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

CLUSTERS = ("threads", "local", "slurm")

# One numba parallel region at a time in this process: numba's workqueue threading layer (the one
# available everywhere) aborts when two threads launch parallel kernels at once, and two regions
# that each want every core would only displace each other's threads. Re-entrant, so a kernel
# region may call another.
_NUMBA_LOCK = threading.RLock()


@contextlib.contextmanager
def numba_region(threads: int | None) -> Iterator[int]:
    """Hold the process's numba parallel region, with ``threads`` numba threads (None: all);
    yields the count used. Window workers call their parallel kernels inside it, so a window's
    kernels take the cores in turn while the other workers decode and encode (GIL-free codecs)."""
    import numba

    pool = numba.config.NUMBA_NUM_THREADS
    n = pool if threads is None else max(1, min(int(threads), pool))
    with _NUMBA_LOCK:
        before = numba.get_num_threads()
        numba.set_num_threads(n)
        try:
            yield n
        finally:
            numba.set_num_threads(before)


@contextlib.contextmanager
def window_executor(dask_cfg: Mapping[str, Any] | None, threads: int) -> Iterator[Executor]:
    """An executor for one stage's windows, per the config's ``dask`` section (None: threads)."""
    cfg = dict(dask_cfg or {})
    kind = cfg.get("cluster", "threads")
    if kind == "threads":
        with ThreadPoolExecutor(max(1, threads)) as pool:
            yield pool
        return
    from distributed import Client

    if kind == "local":
        from distributed import LocalCluster

        cluster = LocalCluster(
            n_workers=int(cfg.get("workers", 2)),
            threads_per_worker=int(cfg.get("threads_per_worker", 1)),
            processes=True,
            dashboard_address=None,
        )
    elif kind == "slurm":
        cluster = slurm_cluster(cfg)
    else:
        raise ValueError(f"unknown dask cluster {kind!r} (expected one of {', '.join(CLUSTERS)})")
    with cluster, Client(cluster) as client:
        log.info("dask %s cluster: %s", kind, client.dashboard_link or cluster)
        yield client.get_executor()


def slurm_cluster(cfg: Mapping[str, Any]) -> Any:
    """A dask-jobqueue SLURMCluster scaled to ``jobs`` jobs of ``cores``/``memory`` each."""
    from dask_jobqueue import SLURMCluster

    slurm = dict(cfg.get("slurm", {}))
    kwargs: dict[str, Any] = {
        "cores": int(slurm.get("cores", 4)),
        "processes": int(slurm.get("processes", 1)),
        "memory": str(slurm.get("memory", "16GB")),
        "walltime": str(slurm.get("walltime", "01:00:00")),
        "scheduler_options": {"dashboard_address": None},
    }
    for key in ("queue", "account", "local_directory", "log_directory", "python"):
        if slurm.get(key):
            kwargs[key] = slurm[key]
    if slurm.get("job_extra_directives"):
        kwargs["job_extra_directives"] = list(slurm["job_extra_directives"])
    cluster = SLURMCluster(**kwargs)
    cluster.scale(jobs=int(slurm.get("jobs", 1)))
    return cluster


def run_windows(
    fn: Callable[[Any], Any],
    windows: list[Any],
    pool: Executor,
    on_result: Callable[[Any], None] | None = None,
    progress: Callable[[], None] | None = None,
) -> None:
    """Run ``fn`` on every window; feed each result to ``on_result`` in this thread, in window order.

    The first error cancels what has not started and propagates (the caller's ``atomic_path`` then
    drops the temporary output).
    """
    futures = [pool.submit(fn, win) for win in windows]
    try:
        for fut in futures:
            result = fut.result()
            if on_result is not None:
                on_result(result)
            if progress is not None:
                progress()
    except BaseException:
        for fut in futures:
            fut.cancel()
        raise


def read_ahead(items: list[Any], read: Callable[[Any], Any], depth: int = 1) -> Iterator[tuple[Any, Any]]:
    """Yield ``(item, read(item))`` in order while the next ``depth`` reads run on a background thread.

    For window loops whose compute (numba, torch) releases the GIL: the zarr read and decode of the
    next window then overlaps this one's compute instead of adding to it. A read error surfaces
    at its own item, in order.
    """
    with ThreadPoolExecutor(1, thread_name_prefix="read-ahead") as pool:
        pending = [pool.submit(read, it) for it in items[:depth]]
        for i, item in enumerate(items):
            nxt = i + depth
            if nxt < len(items):
                pending.append(pool.submit(read, items[nxt]))
            yield item, pending.pop(0).result()
