"""Monte Carlo check of the design-based area intervals on the demo (issue 14, docs/validation.md).

The demo country's truth is known everywhere, so the true area of every class inside the mapped
footprint is known. This script draws ``--draws`` stratified random samples from a finished run's
design mosaic with the chain's own design functions (sample size, allocation, ranks, pixels; a new
seed each draw), labels them from the truth without errors, estimates every class's area with its
95 % interval (``pipeline.accuracy``) and counts how often the interval holds the true area: per
class, and over all (draw, class) pairs. The same for overall accuracy against the map's true one.

    python bench/accuracy_coverage.py --workdir results/demo --draws 1000

Prints one JSON line; docs/validation.md keeps the figures with the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import rasterio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from pipeline.accuracy import StratifiedSample, allocate, sample_size  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.demo.landscape import Country, render_truth  # noqa: E402
from pipeline.io.tilestore import Grid  # noqa: E402
from pipeline.layout import Layout  # noqa: E402
from pipeline.sampledesign import (
    code_index,
    count_classes,
    design_on,
    draw_ranks,
    expected_users_accuracy,
    pick_pixels,
)  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("results/demo"))
    ap.add_argument("--draws", type=int, default=1000)
    ap.add_argument(
        "--min-points", type=int, default=30, help="a class is large with this many points per draw"
    )
    ap.add_argument(
        "--min-omission",
        type=float,
        default=5.0,
        help="... and its omission (if any) this many expected points",
    )
    args = ap.parse_args()
    cfg = load_config(args.workdir / "run-config.yaml")
    lay = Layout(args.workdir)
    mosaic = lay.mosaic(design_on(cfg), "classes")
    codes = [c.code for c in cfg.classes]
    names = [c.name for c in cfg.classes]
    lut = code_index(codes)
    country = Country.from_config(cfg)
    with rasterio.open(mosaic) as src:  # the demo's mosaics are small: whole arrays
        grid = Grid(src.crs, src.transform, src.width, src.height)
        mapped = lut[src.read(1)]
    truth = lut[render_truth(grid, rasterio.windows.Window(0, 0, grid.width, grid.height), country)]
    inside = mapped >= 0
    if (truth[inside] < 0).any():
        raise SystemExit("truth without a class where the map has one")
    true_share = np.bincount(truth[inside], minlength=len(codes)) / inside.sum()
    true_oa = float((mapped[inside] == truth[inside]).mean())
    acc = cfg["accuracy"]
    sizes = count_classes(mosaic, codes)
    w = sizes / sizes.sum()
    n = sample_size(w[sizes > 0], expected_users_accuracy(cfg, names)[sizes > 0], float(acc["target_se"]))
    n_h = allocate(n, sizes, int(acc["min_per_class"]))
    hits = np.zeros(len(codes))
    ref_points = np.zeros(len(codes))
    oa_hits = 0
    t0 = time.time()
    for d in range(args.draws):
        picked = pick_pixels(mosaic, codes, draw_ranks(sizes, n_h, 1000 + d))
        r, c, h = picked["row"].to_numpy(), picked["col"].to_numpy(), picked["stratum"].to_numpy()
        s = StratifiedSample(sizes, h, mapped[r, c], truth[r, c], len(codes), strata_are_map_classes=True)
        est = s.estimates()
        ref_points += np.bincount(truth[r, c], minlength=len(codes))
        for j, e in enumerate(est["area_share"]):
            lo, hi = e.ci95()
            hits[j] += lo <= true_share[j] <= hi
        lo, hi = est["overall"].ci95()
        oa_hits += lo <= true_oa <= hi
    # the normal interval needs the class's omission (its pixels mapped as other classes, in other
    # strata) to reach the sample: expected off-stratum reference points per draw
    cross = np.zeros((len(codes), len(codes)))
    np.add.at(cross, (mapped[inside], truth[inside]), 1)
    off = np.array(
        [
            sum(n_h[h] * cross[h, j] / sizes[h] for h in range(len(codes)) if h != j and sizes[h])
            for j in range(len(codes))
        ]
    )
    omission_ok = (off == 0) | (off >= args.min_omission)
    large = (ref_points / args.draws >= args.min_points) & omission_ok
    print(json.dumps({
        "bench": "accuracy_coverage",
        "machine": machine(),
        "workdir": str(args.workdir),
        "draws": args.draws,
        "points_per_draw": int(n_h.sum()),
        "seconds": round(time.time() - t0, 1),
        "coverage_area": {nm: round(hits[j] / args.draws, 3) for j, nm in enumerate(names)},
        "mean_reference_points": {nm: round(ref_points[j] / args.draws, 1) for j, nm in enumerate(names)},
        "expected_omission_points": {nm: round(float(off[j]), 2) for j, nm in enumerate(names)},
        "classes_large_enough": [nm for j, nm in enumerate(names) if large[j]],
        "coverage_area_large_classes": round(float(hits[large].sum() / (large.sum() * args.draws)), 3),
        "coverage_area_all": round(float(hits.sum() / (len(codes) * args.draws)), 3),
        "coverage_overall_accuracy": round(oa_hits / args.draws, 3),
        "true_overall_accuracy": round(true_oa, 4),
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
