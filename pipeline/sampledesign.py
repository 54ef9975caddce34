"""The accuracy-assessment sample of the national map: design, (demo) interpretation, estimation.

Three stages (issue 14, Olofsson et al. 2014; estimators in :mod:`pipeline.accuracy`):

* ``design``: on one classifier's national mosaic (``accuracy.design_on``), the strata are its
  classes; the sample size follows from the target standard error of overall accuracy and the
  expected user's accuracies, allocated with a minimum per class, and drawn as a stratified random
  sample of pixels in two streaming passes over the mosaic (count, then pick the drawn ranks), so
  memory stays bounded whatever the country's size. It writes the points as a GeoPackage (id,
  stratum, coordinates, an empty ``reference`` field, ready for photo-interpretation in QGIS), a
  CSV, and the design (strata sizes, allocation, parameters) as JSON.
* ``interpret`` (the demo only): the demo's "interpreter" labels the points from the generated
  ground truth, and misreads ``accuracy.interpreter_error`` of them as a plausible other class.
* ``estimate``: reads the labelled sample (the design's GeoPackage or CSV with ``reference``
  filled in), checks it against the design, reads each classifier's map class at the points and
  estimates accuracy and areas with their 95 % intervals. The same sample serves every classifier:
  for maps other than the design's, the strata are not their classes (Stehman 2014).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio
from rasterio.windows import Window
from tqdm import tqdm

from pipeline.accuracy import StratifiedSample, allocate, sample_size
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path, write_json
from pipeline.io.tilestore import iter_windows

log = logging.getLogger(__name__)

BLOCK = 1024


# --------------------------------------------------------------------------------------------
# design
# --------------------------------------------------------------------------------------------


def design_on(cfg: Config) -> str:
    """The classifier whose mosaic the sample is designed on (its classes are the strata)."""
    return cfg["accuracy"].get("design_on") or cfg["classifiers"][0]


def expected_users_accuracy(cfg: Config, names: Sequence[str]) -> np.ndarray:
    """``accuracy.users_accuracy``: one number for every class, or a mapping name -> number whose
    ``default`` key covers the others."""
    ua = cfg["accuracy"]["users_accuracy"]
    if isinstance(ua, (int, float)):
        return np.full(len(names), float(ua))
    default = float(ua.get("default", 0.8))
    unknown = sorted(set(ua) - set(names) - {"default"})
    if unknown:
        raise PipelineError(None, f"accuracy.users_accuracy names unknown classes: {', '.join(unknown)}")
    return np.array([float(ua.get(n, default)) for n in names])


def code_index(codes: Sequence[int]) -> np.ndarray:
    """A lookup from every uint8/uint16 map value to its class index in ``codes`` (-1: none)."""
    lut = np.full(65536, -1, np.int64)
    lut[np.asarray(codes)] = np.arange(len(codes))
    return lut


def count_classes(mosaic: Path, codes: Sequence[int]) -> np.ndarray:
    """Pixels of each code (in ``codes`` order) in the class mosaic, block by block."""
    lut = code_index(codes)
    counts = np.zeros(len(codes), np.int64)
    with rasterio.open(mosaic) as src:
        for win in tqdm(
            list(iter_windows(src.height, src.width, BLOCK)), desc="count", unit="block", leave=False
        ):
            idx = lut[src.read(1, window=win).ravel()]
            counts += np.bincount(idx[idx >= 0], minlength=len(codes))
    return counts


def draw_ranks(sizes: Sequence[int], n: Sequence[int], seed: int) -> list[np.ndarray]:
    """For each stratum, ``n_h`` distinct sorted ranks among its ``N_h`` pixels (uniform, no
    replacement); ranks count the stratum's pixels in the mosaic's row-major order."""
    rng = np.random.default_rng(seed)
    out = []
    for size, k in zip(sizes, n, strict=True):
        out.append(np.sort(rng.choice(int(size), size=int(k), replace=False)) if k else np.zeros(0, np.int64))
    return out


def pick_pixels(mosaic: Path, codes: Sequence[int], ranks: Sequence[np.ndarray]) -> pd.DataFrame:
    """Rows, columns and strata of the drawn ranks, in one pass over the mosaic: a stratum's pixels
    are numbered in scan order (blocks in :func:`iter_windows` order, row-major inside a block),
    and the ``k``-th of them is picked where ``k`` is a drawn rank."""
    lut = code_index(codes)
    seen = np.zeros(len(codes), np.int64)
    nxt = np.zeros(len(codes), np.int64)
    rows, cols, strata = [], [], []
    with rasterio.open(mosaic) as src:
        for win in tqdm(
            list(iter_windows(src.height, src.width, BLOCK)), desc="sample", unit="block", leave=False
        ):
            idx = lut[src.read(1, window=win)]
            flat = idx.ravel()
            here = np.bincount(flat[flat >= 0], minlength=len(codes))
            for h in np.flatnonzero(here):
                r = ranks[h]
                stop = np.searchsorted(r, seen[h] + here[h])
                if stop > nxt[h]:
                    pos = np.flatnonzero(flat == h)[r[nxt[h] : stop] - seen[h]]
                    rr, cc = np.divmod(pos, int(win.width))
                    rows.append(rr + int(win.row_off))
                    cols.append(cc + int(win.col_off))
                    strata.append(np.full(len(pos), h))
                    nxt[h] = stop
                seen[h] += here[h]
    if not rows:
        return pd.DataFrame({"row": [], "col": [], "stratum": []}, dtype=np.int64)
    return pd.DataFrame(
        {"row": np.concatenate(rows), "col": np.concatenate(cols), "stratum": np.concatenate(strata)}
    )


def design_sample(
    cfg: Config, mosaic: Path, out_points: Path, out_csv: Path, out_design: Path
) -> dict[str, Any]:
    """Design and draw the stratified random sample on ``mosaic``; write the points and the design."""
    import geopandas as gpd

    acc = cfg["accuracy"]
    classes = list(cfg.classes)
    codes = [c.code for c in classes]
    names = [c.name for c in classes]
    if not Path(mosaic).exists():
        raise PipelineError(
            mosaic, "the class mosaic to design the sample on is missing (run its mosaic job)"
        )
    sizes = count_classes(mosaic, codes)
    if sizes.sum() == 0:
        raise PipelineError(mosaic, "the mosaic maps no pixel of the nomenclature: nothing to sample")
    present = sizes > 0
    weights = sizes / sizes.sum()
    ua = expected_users_accuracy(cfg, names)
    n_formula = sample_size(weights[present], ua[present], float(acc["target_se"]))
    n_total = n_formula
    if acc["max_points"] and n_total > acc["max_points"]:
        log.warning("sample size %d capped at accuracy.max_points %d", n_total, acc["max_points"])
        n_total = int(acc["max_points"])
    n_h = allocate(n_total, sizes, int(acc["min_per_class"]))
    seed = cfg.seed
    ranks = draw_ranks(sizes, n_h, seed)
    picked = pick_pixels(mosaic, codes, ranks)
    with rasterio.open(mosaic) as src:
        crs, transform = src.crs, src.transform
        pixel_m2 = abs(transform.a * transform.e)
    xs, ys = rasterio.transform.xy(transform, picked["row"].to_numpy(), picked["col"].to_numpy())
    order = np.lexsort((picked["col"].to_numpy(), picked["row"].to_numpy()))  # north to south: an easy tour
    strata = picked["stratum"].to_numpy()[order]
    points = gpd.GeoDataFrame(
        {
            "id": np.arange(1, len(order) + 1, dtype=np.int64),
            "stratum": np.array(codes)[strata],
            "stratum_name": np.array(names, dtype=object)[strata],
            "x": np.asarray(xs)[order],
            "y": np.asarray(ys)[order],
            "reference": pd.array([None] * len(order), dtype="Int64"),
        },
        geometry=gpd.points_from_xy(np.asarray(xs)[order], np.asarray(ys)[order]),
        crs=crs,
    )
    lonlat = points.geometry.to_crs("EPSG:4326")
    points.insert(5, "lon", lonlat.x.round(7))
    points.insert(6, "lat", lonlat.y.round(7))
    with atomic_path(out_points) as tmp:
        points.to_file(tmp, driver="GPKG", layer="sample", engine="pyogrio")
    with atomic_path(out_csv) as tmp:
        points.drop(columns="geometry").to_csv(tmp, index=False)
    design = {
        "classifier": design_on(cfg),
        "mosaic": str(mosaic),
        "crs": crs.to_string(),
        "pixel_area_m2": pixel_m2,
        "seed": seed,
        "target_se": float(acc["target_se"]),
        "min_per_class": int(acc["min_per_class"]),
        "n_formula": int(n_formula),
        "n": int(n_h.sum()),
        "strata": [
            {
                "code": c,
                "name": n,
                "pixels": int(s),
                "weight": float(w),
                "expected_ua": float(u),
                "points": int(k),
            }
            for c, n, s, w, u, k in zip(codes, names, sizes, weights, ua, n_h, strict=True)
        ],
        "config_digest": cfg.digest,
    }
    write_json(out_design, design)
    log.info(
        "accuracy sample: %d points (formula %d) over %d strata -> %s",
        n_h.sum(),
        n_formula,
        present.sum(),
        out_points,
    )
    return design


# --------------------------------------------------------------------------------------------
# the demo's interpreter
# --------------------------------------------------------------------------------------------


def demo_true_areas(cfg: Config, mosaic: Path) -> dict[str, Any] | None:
    """The demo's true class areas (ha, nominal pixels) where ``mosaic`` maps a class: what the
    estimated areas should cover. None when the mosaic is not on the country's 10 m lattice."""
    from pipeline.demo.landscape import Country, render_truth
    from pipeline.io.tilestore import Grid

    country = Country.from_config(cfg)
    codes = [c.code for c in cfg.classes]
    lut = code_index(codes)
    counts = np.zeros(len(codes), np.int64)
    with rasterio.open(mosaic) as src:
        grid = Grid(src.crs, src.transform, src.width, src.height)
        if (
            src.crs != rasterio.crs.CRS.from_epsg(country.epsg)
            or src.transform.a != 10
            or src.transform.e != -10
        ):
            log.warning("%s: not on the demo country's 10 m grid, no true areas", mosaic)
            return None
        for win in iter_windows(src.height, src.width, BLOCK):
            mapped = lut[src.read(1, window=win)] >= 0
            truth = lut[render_truth(grid, win, country)]
            counts += np.bincount(truth[mapped & (truth >= 0)], minlength=len(codes))
        pixel_ha = abs(src.transform.a * src.transform.e) / 1e4
    return {
        "mosaic": str(mosaic),
        "area_ha": {c.name: float(n) * pixel_ha for c, n in zip(cfg.classes, counts, strict=True)},
    }


def interpret_demo(
    cfg: Config, points: Path, out: Path, truth_out: Path | None = None, mosaic: Path | None = None
) -> None:
    """Label the design's points from the demo's ground truth, misreading a share of them; with
    ``truth_out``, also write the true class areas over ``mosaic`` (:func:`demo_true_areas`)."""
    import geopandas as gpd

    from pipeline.demo.landscape import CLASS_NAMES, Country, K, render_static
    from pipeline.demo.noise import name_key, uniform
    from pipeline.demo.reference import CONFUSION

    country = Country.from_config(cfg)
    gdf = gpd.read_file(points, engine="pyogrio")
    local = gdf.geometry.to_crs(f"EPSG:{country.epsg}")
    gx = np.floor(local.x.to_numpy() / 10.0).astype(np.int64)
    gy = np.floor(-local.y.to_numpy() / 10.0).astype(np.int64)
    truth = np.empty(len(gdf), np.int64)
    for row in np.unique(gy):  # the landscape is a function of world coordinates: one row at a time
        at = np.flatnonzero(gy == row)
        cols, inv = np.unique(gx[at], return_inverse=True)
        truth[at] = render_static(country, np.array([row]), cols)["cls"][0, inv]
    error = float(cfg["accuracy"]["interpreter_error"])
    key = name_key("interpreter")
    labels = truth.copy()
    for i in range(len(gdf)):
        name = CLASS_NAMES[truth[i]]
        if name in CONFUSION and float(uniform(country.key, key, int(gdf["id"].iloc[i]))) < error:
            labels[i] = K[CONFUSION[name]]
    gdf["reference"] = country.code_lut[labels].astype(np.int64)
    gdf["true_code"] = country.code_lut[truth].astype(np.int64)  # the demo's only: for its report
    with atomic_path(out) as tmp:
        gdf.to_file(tmp, driver="GPKG", layer="sample", engine="pyogrio")
    log.info("demo interpreter: %d points labelled, %d misread", len(gdf), int((labels != truth).sum()))
    if truth_out is not None and mosaic is not None:
        write_json(truth_out, demo_true_areas(cfg, mosaic) or {"mosaic": str(mosaic), "area_ha": None})


# --------------------------------------------------------------------------------------------
# estimation
# --------------------------------------------------------------------------------------------


def read_labelled(path: Path, design_points: pd.DataFrame) -> pd.DataFrame:
    """The labelled sample, checked against its design: every id once and in the design, every
    point's stratum as designed; positions are the design's (an interpreter may move a point's
    symbol in QGIS, not the sample unit)."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(path, "labelled sample not found")
    try:
        if path.suffix.lower() == ".csv":
            df = pd.read_csv(path)
        else:
            import geopandas as gpd

            df = pd.DataFrame(gpd.read_file(path, engine="pyogrio").drop(columns="geometry"))
    except Exception as exc:  # pyogrio / pandas raise many types for unreadable files
        raise PipelineError(path, f"cannot read the labelled sample ({type(exc).__name__}: {exc})") from exc
    for col in ("id", "stratum", "reference"):
        if col not in df.columns:
            raise PipelineError(path, f"no '{col}' field (fields: {', '.join(map(str, df.columns))})")
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        raise PipelineError(path, f"{len(dup)} duplicate ids (first: {dup.iloc[0]})")
    known = design_points.set_index("id")
    foreign = df["id"][~df["id"].isin(known.index)]
    if len(foreign):
        raise PipelineError(path, f"{len(foreign)} ids not in the sampling design (first: {foreign.iloc[0]})")
    moved = df["stratum"].to_numpy() != known.loc[df["id"], "stratum"].to_numpy()
    if moved.any():
        first = df["id"][moved].iloc[0]
        raise PipelineError(
            path, f"{int(moved.sum())} points with another stratum than designed (first: id {first})"
        )
    missing = len(known) - len(df)
    if missing:
        log.warning(
            "%s: %d of the design's %d points are not in the labelled sample", path, missing, len(known)
        )
    df = df.drop(columns=[c for c in ("x", "y") if c in df.columns])
    return df.join(known[["x", "y"]], on="id")


def estimate_stage(
    cfg: Config,
    design_path: Path,
    design_points: Path,
    labelled: Path,
    mosaics: Mapping[str, Path],
    out: Path,
) -> dict[str, Any]:
    """Estimates for every classifier's mosaic from the one labelled sample; JSON + CSV."""
    try:
        design = json.loads(Path(design_path).read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(design_path, f"cannot read the sampling design ({exc})") from exc
    codes = [c.code for c in cfg.classes]
    names = [c.name for c in cfg.classes]
    strata_codes = [s["code"] for s in design["strata"]]
    try:
        designed = pd.read_csv(design_points)
    except (OSError, ValueError) as exc:
        raise PipelineError(design_points, f"cannot read the design's points ({exc})") from exc
    df = read_labelled(labelled, designed)
    unlabelled = df["reference"].isna()
    if unlabelled.any() and not cfg["accuracy"]["allow_unlabelled"]:
        first = df["id"][unlabelled].iloc[0]
        raise PipelineError(
            labelled,
            f"{int(unlabelled.sum())} points without a reference label (first: id {first}); label them,"
            " or set accuracy.allow_unlabelled to drop them",
        )
    df = df[~unlabelled]
    try:
        values = pd.to_numeric(df["reference"]).to_numpy(dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PipelineError(
            labelled, f"the 'reference' field holds values that are not class codes ({exc})"
        ) from exc
    if (values != np.round(values)).any():
        raise PipelineError(
            labelled,
            f"the 'reference' field holds non-integer codes (e.g. {values[values != np.round(values)][0]})",
        )
    ref = values.astype(np.int64)
    bad = sorted({int(c) for c in ref} - set(codes))
    if bad:
        raise PipelineError(labelled, f"reference codes {bad} are not in the nomenclature")
    lut = {c: i for i, c in enumerate(codes)}
    strata = np.array([strata_codes.index(int(s)) for s in df["stratum"]])
    reference = np.array([lut[int(r)] for r in ref])
    sizes = [s["pixels"] for s in design["strata"]]
    # reference points of each class outside its own stratum: the sample's only view of the class's
    # omission in the design map; with none, the area interval leaves that omission out
    own = np.array([strata_codes.index(c) if c in strata_codes else -1 for c in codes])
    outside_own = np.bincount(reference[strata != own[reference]], minlength=len(codes))
    pixel_ha = float(design["pixel_area_m2"]) / 1e4
    total_ha = float(np.sum(sizes)) * pixel_ha
    result: dict[str, Any] = {
        "design": str(design_path),
        "sample": str(labelled),
        "points": int(len(df)),
        "dropped_unlabelled": int(unlabelled.sum()),
        "z": 1.96,
        "classes": names,
        "reference_outside_own_stratum": {n: int(outside_own[i]) for i, n in enumerate(names)},
        "classifiers": {},
    }
    for model, mosaic in mosaics.items():
        mapped_codes = _read_points(mosaic, df["x"].to_numpy(), df["y"].to_numpy())
        outside = ~np.isin(mapped_codes, codes)
        if outside.any():
            raise PipelineError(
                mosaic, f"{int(outside.sum())} sample points fall where this map has no class (no-data)"
            )
        mapped = np.array([lut[int(c)] for c in mapped_codes])
        by_map = model == design["classifier"] and bool((strata == mapped).all())
        s = StratifiedSample(sizes, strata, mapped, reference, len(codes), strata_are_map_classes=by_map)
        est = s.estimates()
        map_px = count_classes(mosaic, codes)
        result["classifiers"][model] = {
            "strata_are_map_classes": by_map,
            "thin_strata": [strata_codes[h] for h in s.thin_strata()],
            "overall_accuracy": est["overall"].to_dict(),
            "per_class": {
                n: {
                    "users_accuracy": est["users"][i].to_dict(),
                    "producers_accuracy": est["producers"][i].to_dict(),
                    "area_ha": est["area_share"][i].to_dict(total_ha),
                    "mapped_area_ha": float(map_px[i]) * pixel_ha,
                    "sample_mapped": int((mapped == i).sum()),
                    "sample_reference": int((reference == i).sum()),
                }
                for i, n in enumerate(names)
            },
            "error_matrix_area_proportions": est["matrix"].round(8).tolist(),
        }
    write_json(out, result)
    _write_csv(result, Path(out).with_suffix(".csv"))
    return result


def _read_points(mosaic: Path, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    with rasterio.open(mosaic) as src:
        rows, cols = rasterio.transform.rowcol(src.transform, x, y)
        out = np.zeros(len(x), np.int64)
        for i, (r, c) in enumerate(zip(rows, cols, strict=True)):
            if 0 <= r < src.height and 0 <= c < src.width:
                out[i] = int(src.read(1, window=Window(c, r, 1, 1))[0, 0])
    return out


def _write_csv(result: Mapping[str, Any], out: Path) -> None:
    rows = []
    for model, r in result["classifiers"].items():
        oa = r["overall_accuracy"]
        rows.append({"classifier": model, "class": "overall", "quantity": "accuracy", **_flat(oa)})
        for name, pc in r["per_class"].items():
            for q in ("users_accuracy", "producers_accuracy", "area_ha"):
                rows.append({"classifier": model, "class": name, "quantity": q, **_flat(pc[q])})
            rows.append(
                {
                    "classifier": model,
                    "class": name,
                    "quantity": "mapped_area_ha",
                    "value": pc["mapped_area_ha"],
                }
            )
    with atomic_path(out) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


def _flat(e: Mapping[str, Any]) -> dict[str, Any]:
    ci = e["ci95"] or [None, None]
    return {"value": e["value"], "se": e["se"], "ci95_low": ci[0], "ci95_high": ci[1]}


# --------------------------------------------------------------------------------------------
# where to label next (active learning)
# --------------------------------------------------------------------------------------------


def uncertain_cells(class_map: Path, margin: Path, spacing: int) -> pd.DataFrame:
    """The most uncertain pixel (lowest top-two margin) of every ``spacing`` x ``spacing`` cell of
    one tile: its row, column, class code and margin (cells without a mapped pixel are skipped)."""
    from pipeline.io.cog import CONFIDENCE_NODATA

    out = []
    with rasterio.open(class_map) as cm, rasterio.open(margin) as mg:
        if (cm.width, cm.height) != (mg.width, mg.height):
            raise PipelineError(margin, f"not on the grid of its class map {class_map}")
        block = max(spacing, (BLOCK // spacing) * spacing)
        for win in iter_windows(cm.height, cm.width, block):
            codes, gap = cm.read(1, window=win), mg.read(1, window=win).astype(np.int32)
            gap[(gap == CONFIDENCE_NODATA) | (codes == 0)] = 1 << 20
            h, w = gap.shape
            ch, cw = -(-h // spacing), -(-w // spacing)
            pad = np.full((ch * spacing, cw * spacing), 1 << 20, np.int32)
            pad[:h, :w] = gap
            cells = pad.reshape(ch, spacing, cw, spacing).transpose(0, 2, 1, 3).reshape(ch, cw, -1)
            best = cells.argmin(2)
            low = np.take_along_axis(cells, best[..., None], 2)[..., 0]
            keep = low < (1 << 20)
            cr, cc = np.nonzero(keep)
            rr = cr * spacing + best[keep] // spacing
            col = cc * spacing + best[keep] % spacing
            out.append(
                pd.DataFrame(
                    {
                        "row": rr + int(win.row_off),
                        "col": col + int(win.col_off),
                        "code": codes[rr, col],
                        "margin": low[keep],
                    }
                )
            )
    return (
        pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=["row", "col", "code", "margin"])
    )


def pick_suggestions(cells: pd.DataFrame, n: int) -> pd.DataFrame:
    """``n`` cells, the classes taking turns (each its least certain cell first), so the suggestion
    spreads over the classes as well as in space; ties in margin keep the scan order."""
    by_class = {c: g.sort_values("margin", kind="stable") for c, g in cells.groupby("code", sort=True)}
    picked, depth = [], 0
    while len(picked) < n and any(depth < len(g) for g in by_class.values()):
        for g in by_class.values():
            if depth < len(g) and len(picked) < n:
                picked.append(g.iloc[depth])
        depth += 1
    return pd.DataFrame(picked).reset_index(drop=True) if picked else cells.iloc[:0]


def suggest_stage(cfg: Config, model: str, layers: Sequence[tuple[str, Path, Path]], out: Path) -> None:
    """Where to label next for ``model``: ``inference.suggest_points`` points of low margin, at most
    one per ``inference.suggest_spacing`` cell, the classes taking turns; written like the
    accuracy sample (``reference`` empty) in the first tile's CRS (or ``mosaic.crs``)."""
    import geopandas as gpd
    from pyproj import Transformer

    spacing, n = int(cfg["inference"]["suggest_spacing"]), int(cfg["inference"]["suggest_points"])
    names = {c.code: c.name for c in cfg.classes}
    frames = []
    for tile, class_map, margin in layers:
        for p in (class_map, margin):
            if not Path(p).exists():
                raise PipelineError(
                    p, f"tile {tile}: missing (run its predict job with inference.probabilities)"
                )
        cells = uncertain_cells(class_map, margin, spacing)
        with rasterio.open(class_map) as src:
            xs, ys = rasterio.transform.xy(src.transform, cells["row"].to_numpy(), cells["col"].to_numpy())
            crs = src.crs
        frames.append(
            cells.assign(tile=tile, x=np.asarray(xs, float), y=np.asarray(ys, float), crs=crs.to_string())
        )
    target = cfg["mosaic"].get("crs") or frames[0]["crs"].iloc[0]
    for f in frames:
        if f["crs"].iloc[0] != target and len(f):
            tx = Transformer.from_crs(f["crs"].iloc[0], target, always_xy=True)
            f["x"], f["y"] = tx.transform(f["x"].to_numpy(), f["y"].to_numpy())
    chosen = pick_suggestions(pd.concat(frames, ignore_index=True), n)
    points = gpd.GeoDataFrame(
        {
            "id": np.arange(1, len(chosen) + 1, dtype=np.int64),
            "mapped": chosen["code"].astype(np.int64).to_numpy(),
            "mapped_name": [names.get(int(c), str(c)) for c in chosen["code"]],
            "margin": chosen["margin"].astype(np.int64).to_numpy(),
            "tile": chosen["tile"].to_numpy(),
            "x": chosen["x"].to_numpy(),
            "y": chosen["y"].to_numpy(),
            "reference": pd.array([None] * len(chosen), dtype="Int64"),
        },
        geometry=gpd.points_from_xy(chosen["x"], chosen["y"]),
        crs=target,
    )
    with atomic_path(out) as tmp:
        points.to_file(tmp, driver="GPKG", layer="suggestions", engine="pyogrio")
    span = f"{points['margin'].min()}-{points['margin'].max()} %" if len(points) else "-"
    log.info("%s: %d points to label next (margins %s) -> %s", model, len(points), span, out)
