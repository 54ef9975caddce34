"""Exact percentiles over 330 channels: GB/s of int16 input (histogram build + merge) next to the
same-run memory bandwidth. A script, not a test. Prints one JSON line.

Times ``tile_histogram`` on a gapfilled zarr store (decode included) and, separately, the in-memory
per-window histogram kernel (what the stage costs without zarr), then ``merge_percentiles`` over
several copies of the tile histogram.

    python bench/bench_percentiles.py [--quick] [--threads N] [--size PX] [--tiles K]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from affine import Affine
from rasterio.crs import CRS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bandwidth, machine  # noqa: E402

from pipeline.io.tilestore import Grid, add_array, create_store  # noqa: E402
from pipeline.stats import merge_percentiles, tile_histogram, window_histogram  # noqa: E402

T, C = 33, 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--size", type=int, default=0, help="tile side in px (default 2048, quick 1024)")
    ap.add_argument("--tiles", type=int, default=4, help="histograms merged")
    args = ap.parse_args()
    size = args.size or (1024 if args.quick else 2048)
    rng = np.random.default_rng(0)
    cube = (rng.gamma(2.0, 800.0, (T, C, size, size)).clip(0, 15000)).astype(np.int16)
    count = rng.integers(0, 30, (size, size)).astype(np.uint16)  # ~3 % no-data
    cube[:, :, count == 0] = -10000
    nbytes = cube.nbytes

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        grid = Grid(CRS.from_epsg(32631), Affine(10, 0, 399960, 0, -10, 4800000), size, size)
        dates = [str(np.datetime64("2018-01-05") + 10 * i) for i in range(T)]
        g = create_store(
            tmp / "g.zarr", "gapfilled", grid, tile="BENCH", bands=[f"B{i}" for i in range(C)], dates=dates
        )
        add_array(g, "reflectance", cube.shape, np.int16, -10000)[...] = cube
        add_array(g, "clear_count", count.shape, np.uint16, 0)[...] = count

        t0 = time.perf_counter()
        tile_histogram(tmp / "g.zarr", tmp / "h0.npz", threads=args.threads)
        t_hist = time.perf_counter() - t0
        for i in range(1, args.tiles):
            shutil.copy(tmp / "h0.npz", tmp / f"h{i}.npz")
        t0 = time.perf_counter()
        merge_percentiles([tmp / f"h{i}.npz" for i in range(args.tiles)], 3, 97, tmp / "p.json")
        t_merge = time.perf_counter() - t0

    # the kernel alone, single thread, one 512 px window: the chain's, and np.bincount (its predecessor)
    win = np.ascontiguousarray(cube[:, :, :512, :512]).reshape(T * C, -1)
    window_histogram(win[:, :64])  # compile / load from cache
    t0 = time.perf_counter()
    window_histogram(win, None)
    t_kernel = time.perf_counter() - t0
    t0 = time.perf_counter()
    u = win.view(np.uint16) ^ np.uint16(0x8000)
    for i in range(T * C):
        np.bincount(u[i], minlength=65536)
    t_bincount = time.perf_counter() - t0
    bw = bandwidth(args.threads)
    print(
        json.dumps(
            {
                "bench": "percentiles",
                "size": size,
                "channels": T * C,
                "threads": args.threads,
                "input_gb": round(nbytes / 1e9, 3),
                "histogram_s": round(t_hist, 3),
                "merge_s": round(t_merge, 3),
                "tiles_merged": args.tiles,
                "gb_s": round(nbytes / (t_hist + t_merge) / 1e9, 3),
                "histogram_store_gb_s": round(nbytes / t_hist / 1e9, 3),
                "kernel_gb_s_1thread": round(win.nbytes / t_kernel / 1e9, 3),
                "bincount_gb_s_1thread": round(win.nbytes / t_bincount / 1e9, 3),
                "bandwidth_gb_s": round(bw, 2),
                "fraction_of_bandwidth": round(nbytes / (t_hist + t_merge) / 1e9 / bw, 4),
                "machine": machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
