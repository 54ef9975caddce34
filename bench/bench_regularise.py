"""Benchmark: ``pipeline.regularise.majority`` vs ``otbcli_ClassificationMapRegularization``.

A 4096 x 4096 uint8 map with 17 classes, two flavours: ``patchy`` (a class map's look: 32-px
blocks with 10 % speckle and no-data) and ``noise`` (uniform random codes: the worst case, ties
everywhere). Outputs must be identical (asserted). OTB is timed end to end (process + GTiff read and
write); ours in memory and, like for like, with the same GTiff read and write. Goal: >= 4x faster.
One JSON line per measurement. ``--quick``: 1024 x 1024.

    python bench/bench_regularise.py [--quick] [--radius 1] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from affine import Affine

from pipeline.regularise import majority


def emit(**rec: object) -> None:
    print(json.dumps({"bench": "regularise", **rec}), flush=True)


def make_map(kind: str, side: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = np.array([11, 12, 31, 32, 34, 36, 41, 42, 43, 44, 45, 46, 51, 53, 211, 221, 222], np.uint8)
    if kind == "noise":
        return rng.choice(codes, (side, side))
    blocks = rng.choice(codes, (side // 32 + 1, side // 32 + 1))
    m = np.kron(blocks, np.ones((32, 32), np.uint8))[:side, :side]
    speckle = rng.random((side, side)) < 0.10
    m[speckle] = rng.choice(codes, int(speckle.sum()))
    m[rng.random((side, side)) < 0.01] = 0
    return m


def write(path: Path, a: np.ndarray) -> None:
    profile = {"driver": "GTiff", "width": a.shape[1], "height": a.shape[0], "count": 1, "dtype": "uint8"}
    with rasterio.open(path, "w", transform=Affine(10, 0, 0, 0, -10, 0), crs="EPSG:32631", **profile) as d:
        d.write(a, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--radius", type=int, default=1)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    side = 1024 if args.quick else 4096
    otb = shutil.which("otbcli_ClassificationMapRegularization")
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(args.threads), OTB_LOGGER_LEVEL="WARNING")
    work = Path(tempfile.mkdtemp(prefix="bench_reg_"))
    try:
        for kind in ("patchy", "noise"):
            a = make_map(kind, side)
            src, ours_out, otb_out = work / "in.tif", work / "ours.tif", work / "otb.tif"
            write(src, a)
            majority(a[:64, :64], args.radius)  # warm-up
            t = time.perf_counter()
            ours = majority(a, args.radius, threads=args.threads)
            t_mem = time.perf_counter() - t
            t = time.perf_counter()
            with rasterio.open(src) as s:
                write(ours_out, majority(s.read(1), args.radius, threads=args.threads))
            t_io = time.perf_counter() - t
            rec = {"map": kind, "side": side, "radius": args.radius, "threads": args.threads}
            rec |= {"ours_s": round(t_mem, 3), "ours_with_io_s": round(t_io, 3)}
            if otb is None:
                emit(**rec, otb="absent")
                continue
            cmd = [otb, "-io.in", str(src), "-io.out", str(otb_out), "uint8", "-ip.radius", str(args.radius)]
            t = time.perf_counter()
            subprocess.run([*cmd, "-ram", "1024"], check=True, capture_output=True, env=env)
            t_otb = time.perf_counter() - t
            with rasterio.open(otb_out) as s:
                ref = s.read(1)
            equal = bool(np.array_equal(ref, ours))
            emit(
                **rec,
                otb_s=round(t_otb, 3),
                speedup=round(t_otb / t_mem, 2),
                speedup_with_io=round(t_otb / t_io, 2),
                identical=equal,
            )
            assert equal, f"{kind}: {int((ref != ours).sum())} pixels differ from OTB"
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
