"""Gapfill throughput (Mpx/s) next to the same-run memory-bound rate. A script, not a test.

33 dates x 10 bands int16 with cloud-like masks (~35 % invalid) onto a 37-date grid, the pure
function over 512 px windows in a thread pool (as ``gapfill_tile`` does), optionally the whole store
path (zarr decode/encode included), without and with the histograms counted in the same pass, and
the old second pass (``tile_histogram``) for comparison. Prints one JSON line.

Throughput is the median of ``--repeats`` timed passes (range reported too). The memory bandwidth is
probed right before and right after the timed passes and the higher of the two is used: the best-case
bandwidth gives the lower, conservative fraction of the memory-bound rate on a shared machine.

    python bench/bench_gapfill.py [--quick] [--threads N] [--kernel-threads K] [--size PX]
                                  [--repeats R] [--store]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bandwidth, machine  # noqa: E402

from pipeline.gapfill import gapfill  # noqa: E402

T, C, T_OUT, WIN = 33, 10, 37, 512
BYTES_PER_PX = T * C * 2 + T + T_OUT * C * 2  # read cube + mask, write grid


def cloud_masks(rng: np.random.Generator, t: int, size: int, invalid: float = 0.35) -> np.ndarray:
    """Spatially coherent clear masks: a coarse random field per date, upsampled and thresholded."""
    coarse = rng.random((t, size // 32 + 2, size // 32 + 2)).astype(np.float32)
    field = coarse.repeat(32, axis=1).repeat(32, axis=2)[:, :size, :size]
    field += rng.random((t, size, size), dtype=np.float32) * 0.3  # ragged edges
    return field > np.quantile(field, invalid)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small cube, fewer repeats")
    ap.add_argument(
        "--data",
        choices=("random", "parcels"),
        default="random",
        help="random values (incompressible: the codec's worst case) or parcels (32 px blocks of one "
        "reflectance each plus noise of +-30, compressing about like real L2A)",
    )
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="window workers")
    ap.add_argument("--kernel-threads", type=int, default=0, help="numba threads per call (default all)")
    ap.add_argument("--size", type=int, default=0, help="cube side in px (default 2048, quick 1024)")
    ap.add_argument("--repeats", type=int, default=5, help="timed passes (median reported, >= 1)")
    ap.add_argument(
        "--store",
        action="store_true",
        help="also time gapfill_tile on a zarr store, without and with histograms",
    )
    args = ap.parse_args()
    size = args.size or (1024 if args.quick else 2048)
    kthreads = args.kernel_threads or numba.config.NUMBA_NUM_THREADS
    probe = max(args.threads, kthreads)  # bandwidth with as many threads as the kernel may use
    repeats = max(1, args.repeats)
    rng = np.random.default_rng(0)
    src = np.datetime64("2018-01-03") + np.sort(rng.choice(365, T, replace=False)).astype("timedelta64[D]")
    dst = np.datetime64("2018-01-05") + (np.arange(T_OUT) * 10).astype("timedelta64[D]")
    if args.data == "random":
        cube = rng.integers(0, 10000, (T, C, size, size)).astype(np.int16)
    else:
        blocks = rng.integers(200, 6000, (T, C, -(-size // 32), -(-size // 32))).astype(np.int16)
        cube = np.repeat(np.repeat(blocks, 32, axis=2), 32, axis=3)[:, :, :size, :size]
        cube += rng.integers(-30, 31, cube.shape, dtype=np.int16)
    valid = cloud_masks(rng, T, size)

    windows = [(r, c) for r in range(0, size, WIN) for c in range(0, size, WIN)]
    outs = {}

    def one(rc: tuple[int, int]) -> None:
        r, c = rc
        out = outs.setdefault(threading.get_ident(), np.empty((T_OUT, C, WIN, WIN), np.int16))
        win = cube[:, :, r : r + WIN, c : c + WIN], valid[:, r : r + WIN, c : c + WIN]
        gapfill(*win, src, dst, out=out, threads=kthreads)

    times = []
    with ThreadPoolExecutor(args.threads) as pool:
        list(pool.map(one, windows[: args.threads]))  # warm-up (compile / cache load, out buffers)
        bw_before = bandwidth(probe)
        for _ in range(repeats):
            t0 = time.perf_counter()
            list(pool.map(one, windows))
            times.append(time.perf_counter() - t0)
        bw_after = bandwidth(probe)
    rates = sorted(size * size / dt / 1e6 for dt in times)
    mpx = float(np.median(rates))
    bw = max(bw_before, bw_after)  # best-case bandwidth: the conservative fraction
    bound = bw * 1e9 / BYTES_PER_PX / 1e6
    res = {
        "bench": "gapfill",
        "size": size,
        "dates_in": T,
        "dates_out": T_OUT,
        "bands": C,
        "data": args.data,
        "invalid_fraction": round(1 - float(valid.mean()), 3),
        "threads": args.threads,
        "kernel_threads": kthreads,
        "repeats": repeats,
        "mpx_s": round(mpx, 3),
        "mpx_s_range": [round(rates[0], 3), round(rates[-1], 3)],
        "bandwidth_gb_s": round(bw, 2),
        "bandwidth_before_after_gb_s": [round(bw_before, 2), round(bw_after, 2)],
        "bytes_per_px": BYTES_PER_PX,
        "memory_bound_mpx_s": round(bound, 2),
        "fraction_of_bound": round(mpx / bound, 3),
    }
    if args.store:
        res.update(store_path(cube, valid, src, dst, args.threads, repeats))
    res["machine"] = machine()
    print(json.dumps(res))


def store_path(
    cube: np.ndarray, valid: np.ndarray, src: np.ndarray, dst: np.ndarray, threads: int, repeats: int = 3
) -> dict:
    """The whole stage: zarr read + decode, gapfill, encode + write, atomic rename; without and with
    the histograms counted in the same pass, and the second pass over the finished store that the
    chain used to run for them (``tile_histogram``). The three alternate ``repeats`` times; medians."""
    from affine import Affine
    from rasterio.crs import CRS

    import pipeline.gapfill as gf
    from pipeline.gapfill import gapfill_tile
    from pipeline.io.tilestore import Grid, add_array, create_store
    from pipeline.stats import tile_histogram, window_histogram

    # wall seconds inside the histogram calls of the fused runs: the parallel region holds the
    # cores for that long (the serial variant's calls overlap other windows' work instead)
    counted = {"fused": 0.0, "fused_serial": 0.0}
    mode = ["fused"]

    def timed_histogram(vals, keep=None, n_pixels=None, threads=1):
        t = time.perf_counter()
        try:
            return window_histogram(vals, keep, n_pixels, 1 if mode[0] == "fused_serial" else threads)
        finally:
            counted[mode[0]] += time.perf_counter() - t

    gf.window_histogram = timed_histogram

    size = cube.shape[-1]
    kinds = ("plain", "fused", "fused_serial")  # fused_serial: each window counted on one thread
    times: dict[str, list[float]] = {k: [] for k in (*kinds, "second_pass")}
    cpu: dict[str, list[float]] = {k: [] for k in (*kinds, "second_pass")}  # all threads
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        grid = Grid(CRS.from_epsg(32631), Affine(10, 0, 399960, 0, -10, 4800000), size, size)
        bands = [f"B{i}" for i in range(C)]
        dates = [str(d) for d in src]
        g = create_store(tmp / "in.zarr", "ingest", grid, tile="BENCH", bands=bands, dates=dates, products=[])
        add_array(g, "reflectance", cube.shape, np.int16, -10000)[...] = cube
        add_array(g, "valid", valid.shape, np.uint8, 0)[...] = valid.astype(np.uint8)
        for i in range(repeats):
            for kind in kinds:
                out = tmp / f"{kind}{i}.zarr"
                hist = tmp / f"{kind}{i}.npz" if kind != "plain" else None
                mode[0] = kind
                t0, c0 = time.perf_counter(), time.process_time()
                gapfill_tile(tmp / "in.zarr", out, dst, threads=threads, histogram=hist)
                times[kind].append(time.perf_counter() - t0)
                cpu[kind].append(time.process_time() - c0)
            t0, c0 = time.perf_counter(), time.process_time()
            tile_histogram(tmp / f"plain{i}.zarr", tmp / f"second{i}.npz", threads=threads)
            times["second_pass"].append(time.perf_counter() - t0)
            cpu["second_pass"].append(time.process_time() - c0)
            for kind in ("fused", "fused_serial"):
                with np.load(tmp / f"{kind}{i}.npz") as a, np.load(tmp / f"second{i}.npz") as b:
                    if not np.array_equal(a["counts"], b["counts"]) or int(a["offset"]) != int(b["offset"]):
                        raise SystemExit(f"the {kind} histogram differs from the second pass's")
            for kind in kinds:
                shutil.rmtree(tmp / f"{kind}{i}.zarr")
    gf.window_histogram = window_histogram
    med = {k: float(np.median(v)) for k, v in times.items()}
    mcpu = {k: float(np.median(v)) for k, v in cpu.items()}
    return {
        "store_repeats": repeats,
        "store_mpx_s": round(size * size / med["plain"] / 1e6, 3),
        "store_s": {k: round(v, 3) for k, v in med.items()},
        "store_s_all": {k: [round(x, 2) for x in v] for k, v in times.items()},
        # the goal: statistics add <= 10 % to gapfill's time
        "fused_over_plain": round(med["fused"] / med["plain"], 3),
        "fused_serial_over_plain": round(med["fused_serial"] / med["plain"], 3),
        "old_path_over_fused": round((med["plain"] + med["second_pass"]) / med["fused"], 3),
        # the same in CPU-seconds of the process (all threads): steadier on a shared machine
        "store_cpu_s": {k: round(v, 3) for k, v in mcpu.items()},
        "fused_over_plain_cpu": round(mcpu["fused"] / mcpu["plain"], 3),
        "fused_serial_over_plain_cpu": round(mcpu["fused_serial"] / mcpu["plain"], 3),
        "old_path_over_fused_cpu": round((mcpu["plain"] + mcpu["second_pass"]) / mcpu["fused"], 3),
        "histogram_call_wall_s": {k: round(v / repeats, 3) for k, v in counted.items()},
        "histogram_call_share_of_fused_wall": round(counted["fused"] / repeats / med["fused"], 3),
    }


if __name__ == "__main__":
    main()
