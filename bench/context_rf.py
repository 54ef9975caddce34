"""Does the chain's own input carry the urban classes' context? An RF with neighbourhood statistics.

Issue 10 asks FG-UNET to pass RF on the urban classes (CUF, DUF, ICU), which the demo defines by
arrangement, not by material (docs/networks.md, "The urban classes need context"). That was shown on
the noise-free ground reflectance. This script asks the same question of what the networks actually
read: the run's gapfilled cubes, normalised by eq. 2, after clouds, noise and the PSF. It fits the
project's RF twice on the same class-balanced training pixels (the chain's ``rf`` sample and
settings, no majority regularisation):

* ``pixel``: the pixel's own 180 features (the chain's RF);
* ``context``: the same, plus each channel's mean and standard deviation over k x k neighbourhoods
  (``--sizes``), a fixed texture descriptor a network could learn and more.

Both are scored on every validation pixel of the run, with paired 95 % intervals from the chain's
polygon bootstrap. If ``context`` passes ``pixel`` on the urban classes, the information is at the
network's input and a network that misses it has not learnt it; if not, no model reading these
cubes can show the seed's urban finding, and the demo's realism is what to fix.

``--network MODEL_DIR`` (a trained ``fgunet``) adds RFs on that network's penultimate features, the
hybrid's, taken apart: ``net_unet`` (the G groups' U-Net outputs only), ``net_pixel`` (their 1x1
paths only) and ``net_all`` (both, the hybrid ``fgunet_rf``): which branch carries the texture.

    python bench/context_rf.py --workdir results/paper_big [--sizes 5 11] [--seed 42] [--network DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.ndimage import uniform_filter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from pipeline.bootstrap import PolygonTable, paired_differences, score_intervals  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.io.tilestore import open_store  # noqa: E402
from pipeline.metrics import class_indices, confusion, scores  # noqa: E402
from pipeline.models.features import Normalisation, nodata_mask, pixel_features  # noqa: E402
from pipeline.models.pixel import training_sample  # noqa: E402
from pipeline.models.rf import RandomForest  # noqa: E402
from pipeline.nets.features import network_features  # noqa: E402
from pipeline.reference import VALIDATION_ID  # noqa: E402

URBAN = ("CUF", "DUF", "ICU")
WINDOW = 480


def neighbourhood(x: np.ndarray, sizes: list[int]) -> np.ndarray:
    """(F, H, W) normalised channels -> (F * (1 + 2 * len(sizes)), H, W): the channels, then per
    size their k x k mean and standard deviation (reflected at the window's edges)."""
    out = [x]
    for k in sizes:
        m = uniform_filter(x, size=(1, k, k), mode="reflect")
        m2 = uniform_filter(x * x, size=(1, k, k), mode="reflect")
        out += [m, np.sqrt(np.maximum(m2 - m * m, 0.0))]
    return np.concatenate(out)


def features_at(
    store: Path, norm: Normalisation, rows: np.ndarray, cols: np.ndarray, sizes: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Features (n, F') of the given pixels of one tile, window by window with a halo, and whether
    each pixel has any observation."""
    refl = open_store(store, "gapfilled", ("reflectance",))["reflectance"]
    t, c, h, w = refl.shape
    halo = max(sizes) // 2 + 1
    n_out = t * c * (1 + 2 * len(sizes))
    out = np.zeros((rows.size, n_out), np.float32)
    valid = np.zeros(rows.size, bool)
    for r0 in range(0, h, WINDOW):
        for c0 in range(0, w, WINDOW):
            sel = np.flatnonzero((rows >= r0) & (rows < r0 + WINDOW) & (cols >= c0) & (cols < c0 + WINDOW))
            if sel.size == 0:
                continue
            a, b = max(r0 - halo, 0), min(r0 + WINDOW + halo, h)
            p, q = max(c0 - halo, 0), min(c0 + WINDOW + halo, w)
            cube = np.asarray(refl[:, :, a:b, p:q])
            x = norm.apply(pixel_features(cube)).T.reshape(t * c, b - a, q - p)
            f = neighbourhood(x, sizes)
            rr, cc = rows[sel] - a, cols[sel] - p
            out[sel] = f[:, rr, cc].T
            valid[sel] = ~nodata_mask(cube)[rr, cc]
    return out, valid


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("results/paper_big"))
    ap.add_argument("--sizes", type=int, nargs="+", default=[5, 11], help="neighbourhood sides, px")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--boot", type=int, default=1000)
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    ap.add_argument("--network", type=Path, help="a trained fgunet model folder: RFs on its features too")
    args = ap.parse_args()
    cfg = load_config(args.workdir / "run-config.yaml").with_seed(args.seed)
    tiles = sorted(cfg["inputs"]["tiles"])
    labels = {t: args.workdir / "reference" / f"{t}.zarr" for t in tiles}
    cubes = {t: args.workdir / "gapfilled" / f"{t}.zarr" for t in tiles}
    norm = Normalisation.from_percentiles(args.workdir / "stats" / "percentiles.json")
    codes = cfg.class_codes
    t0 = time.perf_counter()
    sample, _, _, _ = training_sample(cfg, labels, cubes, norm)
    n_train = sample.labels.size
    y_train = sample.labels
    # every pixel used (the training sample, then each tile's validation pixels) on tiles' indices,
    # so that each tile's windows are read, filtered (and run through the network) once
    px_tile = [np.array([tiles.index(t) for t in sample.tiles], np.int64)[sample.tile]]
    px_row, px_col = [sample.row.astype(np.int64)], [sample.col.astype(np.int64)]
    y_val: list[np.ndarray] = []
    id_val: list[np.ndarray] = []
    for i, t in enumerate(tiles):
        grp = open_store(labels[t], "reference", ("validation", VALIDATION_ID))
        ref, ids = np.asarray(grp["validation"]), np.asarray(grp[VALIDATION_ID])
        rows, cols = np.nonzero(ref)
        px_tile.append(np.full(rows.size, i, np.int64))
        px_row.append(rows.astype(np.int64))
        px_col.append(cols.astype(np.int64))
        y_val.append(ref[rows, cols])
        id_val.append(ids[rows, cols])
    pixels = PixelSet(tiles, np.concatenate(px_tile), np.concatenate(px_row), np.concatenate(px_col))
    feats = np.empty((pixels.row.size, norm.n_features * (1 + 2 * len(args.sizes))), np.float32)
    observed = np.empty(pixels.row.size, bool)
    for i, t in enumerate(tiles):
        at = np.flatnonzero(pixels.tile == i)
        feats[at], observed[at] = features_at(cubes[t], norm, pixels.row[at], pixels.col[at], args.sizes)
    ok = observed[n_train:]  # validation pixels with no observation at all are left out, as in the maps
    x_train, xv = feats[:n_train], feats[n_train:][ok]
    yv, iv = np.concatenate(y_val)[ok], np.concatenate(id_val)[ok]
    prep = time.perf_counter() - t0
    n_pix = norm.n_features
    res: dict[str, object] = {
        "bench": "context_rf",
        "machine": machine(),
        "workdir": str(args.workdir),
        "seed": args.seed,
        "sizes": args.sizes,
        "train_pixels": int(y_train.size),
        "validation_pixels": int(yv.size),
        "features": {"pixel": n_pix, "context": int(x_train.shape[1])},
        "prepare_s": round(prep, 1),
    }
    runs: list[tuple[str, np.ndarray, np.ndarray]] = [
        ("pixel", x_train[:, :n_pix], xv[:, :n_pix]),
        ("context", x_train, xv),
    ]
    if args.network:
        t1 = time.perf_counter()
        net_all, parts = network_split(args.network, cfg, cubes, norm, pixels)
        net_train, net_val = net_all[:n_train], net_all[n_train:][ok]
        res["network"] = {"model": str(args.network), "features_s": round(time.perf_counter() - t1, 1)}
        for part, cols in parts.items():
            runs.append((f"net_{part}", net_train[:, cols], net_val[:, cols]))
            res["features"][f"net_{part}"] = int(cols.size)  # type: ignore[index]
    tables = {}
    names = [c.name for c in cfg.classes]
    for name, x_fit, x_map in runs:
        t1 = time.perf_counter()
        rf = RandomForest.from_config(cfg).fit(np.ascontiguousarray(x_fit), y_train)
        pred = rf.predict(np.ascontiguousarray(x_map))
        r, p = class_indices(yv, pred, codes)
        keep = (r >= 0) & (p >= 0)
        tables[name] = PolygonTable.from_pairs(
            iv[keep], r[keep], p[keep], np.ones(int(keep.sum())), len(codes)
        )
        sc = scores(confusion(yv, pred, codes))
        ci = score_intervals(tables[name], args.boot, args.seed)
        f1 = dict(zip(names, sc["f1"], strict=True))
        res[name] = {
            "seconds": round(time.perf_counter() - t1, 1),
            "kappa": round(sc["kappa"], 4),
            "kappa_ci": ci["kappa"],
            "mean_f1": round(float(np.nanmean([v for v in sc["f1"] if v is not None])), 4),
            "f1": {k: None if v is None else round(v, 3) for k, v in f1.items()},
        }
    for name in tables:
        if name == "pixel":
            continue
        diff = paired_differences(tables[name], tables["pixel"], args.boot, args.seed)
        res[f"{name}_minus_pixel"] = {"kappa": diff["kappa"], "f1": dict(zip(names, diff["f1"], strict=True))}
    line = json.dumps(res)
    print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    for name in tables:
        urban = " / ".join(str(res[name]["f1"][n]) for n in URBAN)  # type: ignore[index]
        print(f"{name}: kappa {res[name]['kappa']}, {'/'.join(URBAN)} F1 {urban}", file=sys.stderr)  # type: ignore[index]


@dataclass(frozen=True)
class PixelSet:
    """Pixels of several tiles, in the form :func:`network_features` reads (a sample's fields)."""

    tiles: list[str]
    tile: np.ndarray  # index into ``tiles``
    row: np.ndarray
    col: np.ndarray


def network_split(
    model_dir: Path, cfg: Config, cubes: dict[str, Path], norm: Normalisation, pixels: PixelSet
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The network's penultimate features of ``pixels`` (one pass over the windows holding them),
    and the columns of its U-Net and 1x1-path parts (per group: U-Net outputs, then the 1x1 path's)."""
    from pipeline.models import get  # the model registry

    net = get("fgunet").load(model_dir)
    margin = net.spec.pool_aligned(net.receptive_radius)  # as fgunet_rf reads its windows
    x = network_features(net, norm, cubes, pixels, int(cfg["inference"]["window"]), margin)
    feats = net.net.features
    fu, fp = feats.unet.out_channels, feats.pixel.out_channels
    per = np.arange(x.shape[1]) % (fu + fp)
    parts = {
        "unet": np.flatnonzero(per < fu),
        "pixel": np.flatnonzero(per >= fu),
        "all": np.arange(x.shape[1]),
    }
    return x, parts


if __name__ == "__main__":
    main()
