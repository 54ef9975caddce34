"""Ingest rate (issue 15 item 2) against GDAL merely decoding the same files, in the same run.

Writes ``--dates`` synthetic L2A products of ``--size`` px (Theia and Sen2Cor layouts, the chain's own
writers: the demo's formats and compression) and times, alternating, ``--repeats`` times:

- ``ingest``: the chain's ``ingest_tile`` (decode, 20 m -> 10 m bicubic with halo, mask decoding,
  validity, zarr encode + write), with ``--threads`` window workers;
- ``decode``: rasterio reading every raster of every product into memory (bands at their native
  resolution, the masks), file by file over the same number of threads: the peer the issue names.

Both per core (1 thread) and for the node (all threads). The goal: ingest's pixel rate >= 0.7 of
the decode rate (``rate_ratio``). Prints one JSON line per format and thread count.

    python bench/bench_ingest.py [--size 2048] [--dates 6] [--repeats 3] [--formats theia sen2cor]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import machine  # noqa: E402

from pipeline.ingest import ingest_tile  # noqa: E402
from pipeline.io.l2a import Acquisition, WindowMasks, find_products, open_writer  # noqa: E402
from pipeline.io.tilestore import Grid, iter_windows  # noqa: E402

TILE = "T31TCJ"


def write_products(root: Path, fmt: str, size: int, dates: int, seed: int = 0) -> None:
    """``dates`` products of smooth reflectance with ~20 % clouds, written window by window."""
    rng = np.random.default_rng(seed)
    grid = Grid(CRS.from_epsg(32631), Affine(10, 0, 399960, 0, -10, 4800000), size, size)
    y, x = np.mgrid[0:size, 0:size]
    for t in range(dates):
        base = 1500 + 800 * np.sin(x / 37.0 + t) * np.cos(y / 53.0)
        r10 = np.stack([base + 100 * k + rng.integers(-50, 50, (size, size)) for k in range(4)]).astype(
            np.int16
        )
        b20 = base[::2, ::2]
        r20 = np.stack([b20 + 200 * k + rng.integers(-50, 50, b20.shape) for k in range(6)]).astype(np.int16)
        cloud = (np.sin(x / 90.0 + 2 * t) * np.cos(y / 70.0 - t)) > 0.6
        zero = np.zeros((size, size), bool)
        masks = {"cloud": cloud, "shadow": np.roll(cloud, 12, axis=1) & ~cloud}
        masks |= {k: zero for k in ("saturated", "edge", "snow", "water")}
        when = datetime(2019, 1 + t % 12, 1 + (t // 12) * 10 + 3, 10, 50, 39, tzinfo=UTC)
        acq = Acquisition(TILE, when, "SENTINEL2A", 51, grid)
        with open_writer(fmt, root, acq) as wr:
            for w in iter_windows(size, size, 512):
                ys = slice(w.row_off, w.row_off + w.height)
                xs = slice(w.col_off, w.col_off + w.width)
                ys2 = slice(w.row_off // 2, (w.row_off + w.height) // 2)
                xs2 = slice(w.col_off // 2, (w.col_off + w.width) // 2)
                wr.write(
                    w,
                    r10[:, ys, xs],
                    r20[:, ys2, xs2],
                    WindowMasks(**{k: v[ys, xs] for k, v in masks.items()}),
                )


def decode_all(files: list[Path], threads: int) -> int:
    """Read every file's band 1 whole into memory; returns the bytes decoded."""

    def one(path: Path) -> int:
        with rasterio.open(path) as src:
            return src.read(1, window=Window(0, 0, src.width, src.height)).nbytes

    with ThreadPoolExecutor(threads) as pool:
        return sum(pool.map(one, files))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--dates", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formats", nargs="+", default=["theia", "sen2cor"])
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, len(os.sched_getaffinity(0))}))
    args = ap.parse_args()
    px = args.size * args.size * args.dates  # 10 m pixel-dates
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for fmt in args.formats:
            root = tmp / fmt
            root.mkdir()
            t0 = time.perf_counter()
            write_products(root, fmt, args.size, args.dates)
            t_write = time.perf_counter() - t0
            products = find_products(root, fmt, TILE)
            files = [f for p in products for f in (*p.band_files.values(), *p.mask_files.values())]
            disk = sum(f.stat().st_size for f in files)
            for threads in args.threads:
                times: dict[str, list[float]] = {"ingest": [], "decode": []}
                decoded = 0
                for i in range(args.repeats):
                    out = tmp / f"{fmt}-{threads}-{i}.zarr"
                    t0 = time.perf_counter()
                    ingest_tile(root, fmt, TILE, out, threads=threads)
                    times["ingest"].append(time.perf_counter() - t0)
                    shutil.rmtree(out)
                    t0 = time.perf_counter()
                    decoded = decode_all(files, threads)
                    times["decode"].append(time.perf_counter() - t0)
                med = {k: float(np.median(v)) for k, v in times.items()}
                print(
                    json.dumps(
                        {
                            "bench": "ingest",
                            "format": fmt,
                            "size": args.size,
                            "dates": args.dates,
                            "threads": threads,
                            "files": len(files),
                            "disk_mb": round(disk / 1e6, 1),
                            "decoded_mb": round(decoded / 1e6, 1),
                            "write_products_s": round(t_write, 2),
                            "ingest_s": round(med["ingest"], 3),
                            "decode_s": round(med["decode"], 3),
                            "all_s": {k: [round(x, 2) for x in v] for k, v in times.items()},
                            "ingest_mpx_s": round(px / med["ingest"] / 1e6, 2),
                            "decode_mpx_s": round(px / med["decode"] / 1e6, 2),
                            # the goal: >= 0.7
                            "rate_ratio": round(med["decode"] / med["ingest"], 3),
                            "machine": machine(),
                        }
                    ),
                    flush=True,
                )
            shutil.rmtree(root)


if __name__ == "__main__":
    main()
