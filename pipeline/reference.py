"""Reference polygons -> per-tile train/validation label rasters (seed §2.3, §3.3.1).

Two stages so tiles stay independent: ``split`` reads the polygon layer once, checks it, assigns
every polygon to a home tile and to train or validation (67/33 at polygon level, stratified per
tile and class, seeded), and writes ``split.gpkg``; ``rasterise`` burns one tile's polygons. A
polygon crossing two tiles keeps one split everywhere, so no polygon is ever on both sides.

Model selection: a share of the training polygons (``reference.selection_ratio``, stratified the
same way) is also marked ``selection`` and burnt into its own label array. The networks never train
on those pixels and choose their kept epoch on them (:func:`training_labels`), so the validation
polygons behind the final metrics play no part in training at all. The Random Forest, which has
no epoch to choose, trains on every training polygon.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyogrio
import shapely
from rasterio.features import rasterize
from shapely import STRtree
from shapely.geometry import box
from tqdm import tqdm

from pipeline.config import Config, map_dtype
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path
from pipeline.io.tilestore import (
    Grid,
    add_array,
    create_store,
    iter_windows,
    open_store,
    store_grid,
    win_slices,
)

log = logging.getLogger(__name__)

SPLITS = {"train": 1, "validation": 2}
TRAIN_FOLD = "train_fold"  # label-store array: fold + 1 of the training polygon under a pixel, 0 = none
SELECTION = "selection"  # label-store array: codes of the training polygons held out for model selection
VALIDATION_ID = "validation_id"  # label-store array: split.gpkg row + 1 of the validation polygon, 0 = none


class HeldOut:
    """A label array read with another array's non-zero pixels removed (sliced like a zarr array)."""

    def __init__(self, labels: Any, held_out: Any) -> None:
        if tuple(labels.shape) != tuple(held_out.shape):
            raise ValueError(f"label arrays of shapes {labels.shape} and {held_out.shape}")
        self.labels, self.held_out = labels, held_out
        self.shape, self.dtype = tuple(labels.shape), labels.dtype

    def __getitem__(self, key: Any) -> np.ndarray:
        block = np.asarray(self.labels[key])
        return np.where(np.asarray(self.held_out[key]) != 0, np.zeros((), block.dtype), block)


def training_labels(group: Any) -> HeldOut:
    """A label store's training labels without the model-selection polygons (what networks fit)."""
    return HeldOut(group["train"], group[SELECTION])


def check_polygons(path: Path, geom: gpd.GeoSeries, ids: Any, what: str, kind: str) -> None:
    """Every feature a valid (multi)polygon, else one line naming the count and the first id:
    "<n> <what> are not polygons", "<n> invalid <kind> geometries" (with GEOS's reason)."""
    ids = np.asarray(ids)
    bad = (geom.isna() | geom.is_empty | ~geom.geom_type.isin(["Polygon", "MultiPolygon"])).to_numpy()
    if bad.any():
        raise PipelineError(path, f"{int(bad.sum())} {what} are not polygons (first id {ids[bad][0]})")
    invalid = (~geom.is_valid).to_numpy()
    if invalid.any():
        first = int(np.flatnonzero(invalid)[0])
        reason = shapely.is_valid_reason(geom.iloc[first])
        raise PipelineError(
            path, f"{int(invalid.sum())} invalid {kind} geometries (first: id {ids[first]}, {reason})"
        )


def read_polygons(
    path: Path,
    class_field: str,
    codes: np.ndarray,
    ignore: Iterable[int] = (),
    remap: Mapping[int, int] | None = None,
    counts: dict[str, Any] | None = None,
) -> gpd.GeoDataFrame:
    """Read and check the reference layer: non-empty, valid polygons, known class codes. Polygons
    of the ``ignore`` codes are left out and ``remap`` codes replaced (the layer's codes -> the
    nomenclature's) before the codes are checked; ``counts`` receives what each did, per code."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(path, "reference polygon file not found")
    try:
        gdf = gpd.read_file(path, engine="pyogrio")
    except Exception as exc:  # pyogrio/GDAL raise several types for unreadable files
        raise PipelineError(path, f"cannot read polygons ({type(exc).__name__}: {exc})") from exc
    if len(gdf) == 0:
        raise PipelineError(path, "the polygon layer is empty")
    if gdf.crs is None:
        raise PipelineError(path, "the polygon layer has no CRS")
    if class_field not in gdf.columns:
        raise PipelineError(
            path, f"no class field '{class_field}' (fields: {', '.join(map(str, gdf.columns))})"
        )
    ids = gdf["id"].to_numpy() if "id" in gdf.columns else np.arange(1, len(gdf) + 1)
    gdf = gdf.assign(id=ids)
    geom = gdf.geometry
    check_polygons(path, geom, ids, "feature(s)", "polygon")
    field = gdf[class_field]
    if field.isna().any():
        first = int(np.flatnonzero(field.isna().to_numpy())[0])
        raise PipelineError(
            path,
            f"{int(field.isna().sum())} polygons without a class in '{class_field}' (first: id {ids[first]})",
        )
    try:
        code = field.astype("int64")
    except (TypeError, ValueError) as exc:
        raise PipelineError(path, f"class field '{class_field}' is not integer ({exc})") from exc
    if field.dtype.kind == "f" and (off := field[field != code]).size:  # 11.5 would pass as 11
        raise PipelineError(path, f"class field '{class_field}' holds non-integer codes (e.g. {off.iloc[0]})")
    code = code.to_numpy()
    dropped = np.isin(code, list(ignore))
    remap = {int(k): int(v) for k, v in (remap or {}).items()}
    moved = np.isin(code, list(remap))
    if counts is not None:
        gone, n_gone = np.unique(code[dropped], return_counts=True)
        counts["ignored"] = {str(c): int(n) for c, n in zip(gone, n_gone, strict=True)}
        src, n_src = np.unique(code[moved], return_counts=True)
        counts["remapped"] = {f"{c}->{remap[int(c)]}": int(n) for c, n in zip(src, n_src, strict=True)}
    if dropped.any():
        log.info("%s: %d polygons of reference.ignore_codes left out", path, int(dropped.sum()))
    if moved.any():
        log.info("%s: %d polygons' codes replaced by reference.remap", path, int(moved.sum()))
    if dropped.all():
        raise PipelineError(path, f"every polygon's code is in reference.ignore_codes {sorted(ignore)}")
    code = np.array([remap.get(int(c), int(c)) for c in code], dtype=np.int64)
    unknown = sorted({int(c) for c in code[~dropped]} - {int(c) for c in codes})
    if unknown:
        raise PipelineError(
            path,
            f"class codes {unknown} are not in the config nomenclature (add them, map them to a class with "
            "reference.remap, or leave them out with reference.ignore_codes)",
        )
    keep = ~dropped
    return gpd.GeoDataFrame({"id": ids[keep], "code": code[keep]}, geometry=geom[keep].values, crs=gdf.crs)


def split_table(tile: np.ndarray, code: np.ndarray, train_ratio: float, seed: int) -> np.ndarray:
    """Return 1 (train) / 2 (validation) per polygon, stratified by (tile, class).

    Each stratum of n polygons gets round(n * ratio) training polygons (at least one when n >= 1),
    drawn by a seeded permutation; the rest validate.
    """
    rng = np.random.default_rng(seed)
    out = np.full(len(tile), SPLITS["validation"], dtype=np.uint8)
    keys = np.rec.fromarrays([tile, code])
    for key in np.unique(keys):
        members = np.flatnonzero(keys == key)
        n_train = max(1, int(np.floor(len(members) * train_ratio + 0.5)))
        out[rng.permutation(members)[:n_train]] = SPLITS["train"]
    return out


def selection_table(
    tile: np.ndarray, code: np.ndarray, split: np.ndarray, ratio: float, seed: int
) -> np.ndarray:
    """True for the training polygons held out for model selection, stratified by (tile, class).

    A stratum of n training polygons gives round(n * ratio) of them, at least one when n >= 2 and
    ``ratio`` > 0, and never all: a class with a single training polygon keeps it for training.
    """
    rng = np.random.default_rng([seed, 2])
    out = np.zeros(len(tile), bool)
    if ratio <= 0:
        return out
    train = split == SPLITS["train"]
    keys = np.rec.fromarrays([tile, code])
    for key in np.unique(keys[train]):
        members = np.flatnonzero((keys == key) & train)
        n = members.size
        k = min(n - 1, max(1, int(np.floor(n * ratio + 0.5)))) if n >= 2 else 0
        out[rng.permutation(members)[:k]] = True
    return out


def folds(cfg: Config) -> int:
    """Folds of the training polygons: one per geometric-QA reference RF (at least 1)."""
    return max(1, int(cfg["qa"]["references"]))


def fold_table(tile: np.ndarray, code: np.ndarray, split: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold 0..n-1 of each training polygon (-1 for validation), dealt round-robin per (tile, class).

    Reference RF ``i`` of the geometric QA trains without fold ``i``, so references differ by
    about 1/n of the polygons of every class and tile (the seed's cross-validation folds, §4.3).
    """
    rng = np.random.default_rng([seed, 1])
    out = np.full(len(tile), -1, dtype=np.int16)
    train = split == SPLITS["train"]
    keys = np.rec.fromarrays([tile, code])
    for key in np.unique(keys[train]):
        members = np.flatnonzero((keys == key) & train)
        start = int(rng.integers(n_folds))  # so small strata do not all land in fold 0
        out[rng.permutation(members)] = (start + np.arange(members.size)) % n_folds
    return out


def split_polygons(cfg: Config, grids: Mapping[str, Path], out: Path) -> None:
    """Check the reference layer, erode it, give each polygon a home tile and a split, write ``out``."""
    src = Path(cfg["inputs"]["reference"])
    ref = cfg["reference"]
    counts: dict[str, Any] = {}
    gdf = read_polygons(
        src, cfg["inputs"]["class_field"], cfg.class_codes, ref["ignore_codes"], ref["remap"], counts
    )
    erosion = float(cfg["reference"]["erosion_m"])
    tiles = list(grids)
    # A polygon's home tile (its split stratum) is the tile holding its centroid, else the one it
    # overlaps most: a polygon across a tile edge is kept, and rasterise burns it on every tile it
    # overlaps, with its one split (never training on one tile and validation on the other).
    home = np.full(len(gdf), "", dtype=object)
    centred = np.zeros(len(gdf), bool)  # home by centroid: final
    overlap = np.zeros(len(gdf))  # else the largest overlap so far
    touches = np.zeros(len(gdf), bool)
    kept_geom = gdf.geometry.copy()
    for tile in tiles:
        grid = store_grid(open_store(grids[tile], "ingest"))
        local = gdf.geometry.to_crs(grid.crs)
        frame = box(*grid.bounds)
        touches |= local.intersects(frame).to_numpy()
        if erosion > 0:
            local = local.buffer(-erosion)
        open_ = ~centred & ~local.is_empty.to_numpy()
        inside = open_ & local.centroid.within(frame).to_numpy()
        share = np.where(open_ & ~inside, local.intersection(frame).area.to_numpy(), 0.0)
        better = share > overlap
        overlap = np.where(better, share, overlap)
        take = inside | better
        home[take] = tile
        centred |= inside
        if erosion > 0:
            kept_geom[take] = local[take].to_crs(gdf.crs)
    outside = home == ""
    if outside.all():
        raise PipelineError(src, f"none of the {len(gdf)} polygons falls inside the tiles {', '.join(tiles)}")
    eroded = int((outside & touches).sum())
    counts |= {"outside": int(outside.sum()) - eroded, "eroded": eroded, "kept": int((~outside).sum())}
    if outside.any():
        log.warning(
            "%s: %d polygons ignored: %d outside every tile, %d eroded away by reference.erosion_m %g",
            src, int(outside.sum()), int(outside.sum()) - eroded, eroded, erosion,
        )  # fmt: skip
    if n_edge := int((~centred & ~outside).sum()):
        log.info("%s: %d polygons whose centroid lies outside every tile kept by their overlap", src, n_edge)
    gdf = gdf.set_geometry(kept_geom)[~outside].copy()
    gdf["tile"] = home[~outside].astype(str)
    split = split_table(
        gdf["tile"].to_numpy(), gdf["code"].to_numpy(), cfg["reference"]["train_ratio"], cfg.seed
    )
    gdf["split"] = np.where(split == SPLITS["train"], "train", "validation")
    gdf["fold"] = fold_table(gdf["tile"].to_numpy(), gdf["code"].to_numpy(), split, folds(cfg), cfg.seed)
    ratio = float(cfg["reference"]["selection_ratio"])
    gdf["selection"] = selection_table(gdf["tile"].to_numpy(), gdf["code"].to_numpy(), split, ratio, cfg.seed)
    gdf["selection"] = gdf["selection"].astype(np.int32)
    _log_split(gdf, cfg)
    with atomic_path(out) as tmp:
        pyogrio.write_dataframe(
            gdf[["id", "code", "tile", "split", "fold", "selection", "geometry"]],
            tmp,
            layer="reference",
            driver="GPKG",
            # what was left out or recoded, and why: the QA report reads it (split_counts)
            layer_metadata={"landcover_counts": json.dumps(counts, sort_keys=True)},
        )


def split_counts(split: Path) -> dict[str, Any] | None:
    """What the split left out or recoded (``ignored`` / ``remapped`` per code, polygons
    ``outside`` every tile or ``eroded`` away, ``kept``); None for a split written without it."""
    try:
        meta = pyogrio.read_info(split, layer="reference").get("layer_metadata") or {}
    except Exception:  # a missing or foreign file: the report says what it lacks elsewhere
        return None
    text = meta.get("landcover_counts")
    return json.loads(text) if text else None


def _log_split(gdf: gpd.GeoDataFrame, cfg: Config) -> None:
    names = {c.code: c.name for c in cfg.classes}
    counts = gdf.groupby(["code", "split"]).size().unstack(fill_value=0)
    held = gdf.groupby("code")["selection"].sum()
    for code, row in counts.iterrows():
        log.info(
            "reference %s: %s, of which %d training polygons for model selection",
            names[int(code)], {k: int(v) for k, v in row.items()}, int(held.get(code, 0)),
        )  # fmt: skip
    missing = sorted(set(names) - set(gdf["code"].unique()))
    if missing:
        log.warning("classes without any reference polygon: %s", ", ".join(names[c] for c in missing))


def rasterise_tile(split: Path, tile: str, grid_store: Path, out: Path, dtype: Any = None) -> None:
    """Burn the train and validation polygons intersecting ``tile`` onto its 10 m grid, window by window,
    as ``dtype`` codes (the run's map type, :func:`~pipeline.config.map_dtype`; default: what the
    split's codes need)."""
    grid = store_grid(open_store(grid_store, "ingest"))
    try:
        gdf = gpd.read_file(split, engine="pyogrio")
    except Exception as exc:
        raise PipelineError(split, f"cannot read the split polygons ({exc})") from exc
    gdf = gdf.to_crs(grid.crs)
    gdf = gdf[gdf.intersects(box(*grid.bounds))]
    geoms = gdf.geometry.to_numpy()
    tree = STRtree(geoms)
    dtype = np.dtype(dtype) if dtype is not None else map_dtype(gdf["code"].to_numpy())
    codes = gdf["code"].to_numpy().astype(dtype)
    splits = gdf["split"].to_numpy()
    for field in ("fold", SELECTION):
        if field not in gdf.columns:
            raise PipelineError(
                split, f"no '{field}' field: written by an older version, run the split stage again"
            )
    fold_id = np.where(splits == "train", gdf["fold"].to_numpy() + 1, 0).astype(np.uint8)
    held = np.where((splits == "train") & (gdf[SELECTION].to_numpy() != 0), "train", "")
    # the polygon's row in split.gpkg (the same on every tile), so a polygon is one cluster of the
    # validation scores' bootstrap (pipeline.bootstrap), even where it crosses a tile edge
    row_id = np.where(splits == "validation", gdf.index.to_numpy() + 1, 0).astype(np.int32)
    with atomic_path(out) as tmp:
        group = create_store(tmp, "reference", grid, tile=tile, n_polygons=int(len(gdf)))
        arrays = {name: add_array(group, name, (grid.height, grid.width), dtype.name, 0) for name in SPLITS}
        fold_arr = add_array(group, TRAIN_FOLD, (grid.height, grid.width), "uint8", 0)
        sel_arr = add_array(group, SELECTION, (grid.height, grid.width), dtype.name, 0)
        id_arr = add_array(group, VALIDATION_ID, (grid.height, grid.width), "int32", 0)
        for win in tqdm(list(iter_windows(grid.height, grid.width)), desc=f"rasterise {tile}", unit="win"):
            burnt = burn_window(grid, win, geoms, codes, splits, tree)
            rows, cols = win_slices(win)
            for name, arr in arrays.items():
                arr[rows, cols] = burnt[name]
            fold_arr[rows, cols] = burn_window(grid, win, geoms, fold_id, splits, tree)["train"]
            sel_arr[rows, cols] = burn_window(grid, win, geoms, codes, held, tree)["train"]
            id_arr[rows, cols] = burn_window(grid, win, geoms, row_id, splits, tree)["validation"]


def burn_window(grid: Grid, win, geoms, codes, splits, tree: STRtree) -> dict[str, np.ndarray]:
    """Rasterise the polygons touching one window (pixel centres inside the polygon are burnt)."""
    from rasterio.windows import bounds as win_bounds
    from rasterio.windows import transform as win_transform

    shape = (int(win.height), int(win.width))
    hits = tree.query(box(*win_bounds(win, grid.transform)))
    out = {}
    for name in SPLITS:
        idx = [i for i in hits if splits[i] == name]
        if idx:
            out[name] = rasterize(
                zip(geoms[idx], codes[idx], strict=True),
                out_shape=shape,
                transform=win_transform(win, grid.transform),
                fill=0,
                dtype=codes.dtype.name,
            )
        else:
            out[name] = np.zeros(shape, codes.dtype)
    return out
