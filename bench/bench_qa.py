"""Geometric QA of a full tile: a contextual map's corners vs 2 pixel-based references. Not a test.

A synthetic 10980 x 10980 landscape (``--quick``: 2048 x 2048), 17 classes: 1.2 km zones, each
with its own field orientation and 5 of the classes, tiled by rotated rectangular fields
(15-90 px sides, drawn over each other so they leave L- and T-corners), plus roads (3 px wide),
round fields and smooth forest blobs. The two references are re-rasterisations of the same
polygons with 0.4 px vertex jitter and ragged boundaries (15 % of boundary pixels take a
neighbour's class), as two pixel-based RF maps would differ; the contextual map is the truth
with corners rounded (7 x 7 median). All three are written as class-map COGs (not timed).

Timed: ``pipeline.qa.tile_qa`` on the three COGs (grid check, windowed reads, LSD per class,
corner rule, matching, JSON), in a fresh subprocess so that its peak RSS is its own. Goal: <= 60 s
on 2 cores for the full tile. Also the in-memory corner extraction of one map. JSON lines.

    python bench/bench_qa.py [--quick] [--size PX] [--threads N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from affine import Affine
from rasterio.crs import CRS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from pipeline.config import ClassDef  # noqa: E402
from pipeline.io.cog import write_class_map  # noqa: E402
from pipeline.io.tilestore import Grid  # noqa: E402
from pipeline.qa import extract_corners, tile_qa  # noqa: E402

CODES = [11, 12, 31, 32, 34, 36, 41, 42, 43, 44, 45, 46, 51, 53, 211, 221, 222]
ROAD, WATER, FOREST = 41, 51, 31
GOAL_S = 60.0


def emit(**rec: object) -> None:
    print(json.dumps({"bench": "qa", **rec}), flush=True)


def landscape(side: int, seed: int = 0) -> list[tuple[int, np.ndarray]]:
    """Polygons to paint in order: (class code, float (k, 2) vertices in pixel coordinates)."""
    rng = np.random.default_rng(seed)
    zone = 120
    nz = side // zone + 1
    zone_angle = rng.uniform(0, 180, (nz, nz))
    zone_classes = np.array([rng.choice(CODES, 5, replace=False) for _ in range(nz * nz)]).reshape(nz, nz, 5)
    polys: list[tuple[int, np.ndarray]] = []
    # background: one rectangle per zone so nothing is left unpainted
    for i in range(nz):
        for j in range(nz):
            box = np.array([[j, i], [j + 1, i], [j + 1, i + 1], [j, i + 1]], float) * zone
            polys.append((int(zone_classes[i, j, 0]), box))
    n_fields = int(side * side / 1400)
    centres = rng.uniform(0, side, (n_fields, 2))
    for cx, cy in centres:
        zi, zj = int(cy // zone), int(cx // zone)
        w, h = rng.uniform(15, 90, 2)
        angle = zone_angle[zi, zj] + rng.normal(0, 2)
        code = int(zone_classes[zi, zj, rng.integers(0, 5)])
        polys.append((code, cv2.boxPoints(((cx, cy), (w, h), angle)).astype(float)))
    for _ in range(max(1, side // 250)):  # forest blobs: smooth outlines
        c = rng.uniform(0, side, 2)
        t = np.linspace(0, 2 * np.pi, 60, endpoint=False)
        r = rng.uniform(40, 150) * (1 + 0.25 * np.sin(3 * t + rng.uniform(0, 6)))
        polys.append((FOREST, np.column_stack([c[0] + r * np.cos(t), c[1] + r * np.sin(t)])))
    for _ in range(max(1, side // 500)):  # round fields / ponds
        c = rng.uniform(0, side, 2)
        t = np.linspace(0, 2 * np.pi, 90, endpoint=False)
        r = rng.uniform(20, 60)
        polys.append((WATER, np.column_stack([c[0] + r * np.cos(t), c[1] + r * np.sin(t)])))
    for _ in range(max(1, side // 300)):  # roads
        c = rng.uniform(0, side, 2)
        polys.append((ROAD, cv2.boxPoints(((c[0], c[1]), (rng.uniform(500, 3000), 3), rng.uniform(0, 180)))))
    return polys


def rasterise(polys: list[tuple[int, np.ndarray]], side: int, jitter: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = np.zeros((side, side), np.uint8)
    shift = 4  # cv2 sub-pixel vertices: 1/16 px
    for code, pts in polys:
        p = pts + (rng.normal(0, jitter, pts.shape) if jitter else 0)
        cv2.fillPoly(m, [np.round(p * (1 << shift)).astype(np.int32)], int(code), cv2.LINE_8, shift)
    return m


def ragged(m: np.ndarray, share: float, seed: int) -> np.ndarray:
    """``share`` of boundary pixels take the class of a neighbour one pixel away (in row blocks)."""
    rng = np.random.default_rng(seed)
    out = m.copy()
    for r0 in range(0, m.shape[0], 1024):
        r1 = min(r0 + 1024, m.shape[0])
        dy, dx = rng.integers(-1, 2, 2)
        nb = np.roll(m, (int(dy), int(dx)), axis=(0, 1))[r0:r1]
        pick = (nb != m[r0:r1]) & (rng.random((r1 - r0, m.shape[1]), dtype=np.float32) < share)
        out[r0:r1][pick] = nb[pick]
    return out


def peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries the parent's RSS at fork into a
    child's ru_maxrss across exec, which would charge the bench's own arrays to the QA."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_qa(args: argparse.Namespace) -> None:
    """Child process: time tile_qa alone; report its own peak RSS."""
    work = args.workdir
    use = resource.getrusage(resource.RUSAGE_SELF)
    cpu0 = use.ru_utime + use.ru_stime
    t = time.perf_counter()
    doc = tile_qa(
        {"smoothed": work / "model.tif"},
        [work / "ref1.tif", work / "ref2.tif"],
        work / "qa.json",
        threads=args.threads,
    )
    secs = time.perf_counter() - t
    use = resource.getrusage(resource.RUSAGE_SELF)
    cpu = use.ru_utime + use.ru_stime - cpu0
    print(json.dumps({"seconds": secs, "cpu_seconds": cpu, "peak_rss_mib": peak_rss_mib(), "doc": doc}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2048 x 2048 instead of a full 10980 x 10980 tile")
    ap.add_argument("--size", type=int, default=0)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        run_qa(args)
        return
    side = args.size or (2048 if args.quick else 10980)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_qa_"))
    work.mkdir(parents=True, exist_ok=True)
    emit(event="setup", side=side, threads=args.threads, machine=machine(), opencv=cv2.__version__)

    t = time.perf_counter()
    polys = landscape(side)
    grid = Grid(CRS.from_epsg(32631), Affine(10.0, 0.0, 399960.0, 0.0, -10.0, 4800000.0), side, side)
    classes = [ClassDef(c, f"C{c}", f"class {c}", f"#{c:02x}{255 - c:02x}{(7 * c) % 256:02x}") for c in CODES]
    truth = rasterise(polys, side, 0.0, 0)
    model = cv2.medianBlur(truth, 7)
    write_class_map(work / "model.tif", grid, classes, model, threads=args.threads)
    t_c = time.perf_counter()
    corners = extract_corners(model, threads=args.threads)
    t_mem = time.perf_counter() - t_c
    del model, truth
    for k in (1, 2):
        ref = ragged(rasterise(polys, side, 0.4, k), 0.15, k)
        write_class_map(work / f"ref{k}.tif", grid, classes, ref, threads=args.threads)
        del ref
    emit(
        event="inputs",
        seconds=round(time.perf_counter() - t, 1),
        polygons=len(polys),
        cog_mib=round(
            sum((work / f).stat().st_size for f in ("model.tif", "ref1.tif", "ref2.tif")) / 2**20, 1
        ),
    )
    emit(
        event="extract_corners_in_memory",
        map="smoothed",
        corners=len(corners),
        seconds=round(t_mem, 2),
        mpx_per_s=round(side * side / t_mem / 1e6, 1),
    )

    cmd = [sys.executable, __file__, "--child", "--workdir", str(work), "--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    out = json.loads(res.stdout.strip().splitlines()[-1])
    doc = out["doc"]
    full = side == 10980
    emit(
        event="tile_qa",
        maps=3,
        seconds=round(out["seconds"], 2),
        cpu_seconds=round(out["cpu_seconds"], 2),
        load_avg_1min=round(os.getloadavg()[0], 2),
        peak_rss_mib=round(out["peak_rss_mib"]),
        corners={
            "ref1": doc["references"][0]["corners"],
            "ref2": doc["references"][1]["corners"],
            "smoothed": doc["models"]["smoothed"]["corners"],
        },
        ref_vs_ref=doc["reference_vs_reference"]["mean"],
        smoothed_vs_refs=doc["models"]["smoothed"]["mean"],
        goal_s=GOAL_S if full else round(GOAL_S * side * side / 10980**2, 2),
        goal_note="60 s for 10980^2" + ("" if full else ", scaled by area"),
        met=out["seconds"] <= (GOAL_S if full else GOAL_S * side * side / 10980**2),
    )
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
