"""Figures per administrative region: each class's area, share, mean confidence and the share of
pixels seen clear too rarely, from the national mosaic.

One streaming pass over the mosaic, in blocks: the regions that touch a block are rasterised onto
it (a pixel belongs to the region that holds its centre), and the pixels are tallied per (region,
class) with the same true pixel areas as the national table (:func:`pipeline.mosaic.pixel_areas`).
So the regional areas add up to the national ones exactly, pixels outside every region being
tallied apart; memory holds a block and the tally, whatever the number of regions (municipalities:
~35,000 in France).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from rasterio.features import rasterize
from rasterio.windows import Window
from rasterio.windows import transform as window_transform
from tqdm import tqdm

from pipeline.config import ClassDef, Config
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path
from pipeline.io.cog import CONFIDENCE_NODATA
from pipeline.io.tables import read_csv, write_csv
from pipeline.io.tilestore import Grid, iter_windows
from pipeline.mosaic import BLOCK, CLEAR_NODATA, pixel_areas
from pipeline.reference import check_polygons

log = logging.getLogger(__name__)

OUTSIDE = ""  # region id of the mapped pixels outside every region, in the table


def read_regions(path: Path, id_field: str, name_field: str | None, crs: Any) -> gpd.GeoDataFrame:
    """The regions layer, checked (readable, polygons, valid, unique ids) and in ``crs``: columns
    ``region_id``, ``region_name``, geometry."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(path, "regions file not found (inputs.regions)")
    try:
        gdf = gpd.read_file(path, engine="pyogrio")
    except Exception as exc:  # pyogrio/GDAL raise several types for unreadable files
        raise PipelineError(path, f"cannot read the regions ({type(exc).__name__}: {exc})") from None
    if len(gdf) == 0:
        raise PipelineError(path, "the regions layer is empty")
    if gdf.crs is None:
        raise PipelineError(path, "the regions layer has no CRS")
    fields = [str(c) for c in gdf.columns if c != gdf.geometry.name]
    if id_field not in gdf.columns:
        raise PipelineError(
            path, f"no region id field '{id_field}' (fields: {', '.join(fields)}): set inputs.region_id_field"
        )
    if name_field and name_field not in gdf.columns:
        raise PipelineError(
            path,
            f"no region name field '{name_field}' (fields: {', '.join(fields)}):"
            " set inputs.region_name_field",
        )
    ids = gdf[id_field]
    if ids.isna().any():
        raise PipelineError(path, f"{int(ids.isna().sum())} regions without an id in '{id_field}'")
    ids = ids.astype(str)
    if ids.duplicated().any():
        raise PipelineError(
            path, f"region ids in '{id_field}' are not unique (e.g. {ids[ids.duplicated()].iloc[0]})"
        )
    geom = gdf.geometry
    check_polygons(path, geom, ids, "region(s)", "region")
    names = gdf[name_field].astype(str) if name_field else ids
    out = gpd.GeoDataFrame(
        {"region_id": ids.to_numpy(), "region_name": names.to_numpy()}, geometry=geom, crs=gdf.crs
    )
    return out.to_crs(crs)


@dataclass
class RegionTally:
    """Per (region, class) sums; region index ``len(regions)`` holds the pixels outside every region."""

    n_regions: int
    n_classes: int

    def __post_init__(self) -> None:
        shape = (self.n_regions + 1, self.n_classes)
        self.pixels = np.zeros(shape, np.int64)
        self.area_m2 = np.zeros(shape, np.float64)
        self.conf_sum = np.zeros(shape, np.float64)
        self.conf_n = np.zeros(shape, np.int64)
        self.few_clear = np.zeros(shape, np.int64)

    def add(
        self,
        region: np.ndarray,
        cls_index: np.ndarray,
        areas: np.ndarray,
        conf: np.ndarray,
        clear: np.ndarray,
        few_clear: int,
    ) -> None:
        """``region``: index per pixel (``n_regions`` outside); ``cls_index``: class index, -1 unmapped."""
        mapped = cls_index >= 0
        key = (region[mapped].astype(np.int64) * self.n_classes + cls_index[mapped]).ravel()
        size = (self.n_regions + 1) * self.n_classes

        def count(weights: np.ndarray | None = None, sel: np.ndarray | None = None) -> np.ndarray:
            k = key if sel is None else key[sel]
            w = None if weights is None else (weights if sel is None else weights[sel])
            return np.bincount(k, weights=w, minlength=size).reshape(self.pixels.shape)

        self.pixels += count().astype(np.int64)
        self.area_m2 += count(areas[mapped].ravel())
        c = conf[mapped].ravel()
        ok = c != CONFIDENCE_NODATA
        self.conf_sum += count(c.astype(np.float64), ok)
        self.conf_n += count(None, ok).astype(np.int64)
        k = clear[mapped].ravel()
        self.few_clear += count(None, (k != CLEAR_NODATA) & (k < few_clear)).astype(np.int64)


def tally_regions(
    regions: gpd.GeoDataFrame,
    classes: Sequence[ClassDef],
    mosaic: Path,
    confidence: Path,
    clear: Path,
    few_clear: int,
    block: int = BLOCK,
) -> RegionTally:
    """Stream the mosaic's three layers and tally them per region and class."""
    lut = np.full(max(c.code for c in classes) + 1, -1, np.int64)
    lut[[c.code for c in classes]] = np.arange(len(classes))
    tally = RegionTally(len(regions), len(classes))
    tree = shapely.STRtree(regions.geometry.to_numpy())
    geoms = regions.geometry.to_numpy()
    with rasterio.open(mosaic) as m, rasterio.open(confidence) as f, rasterio.open(clear) as k:
        grid = Grid(m.crs, m.transform, m.width, m.height)
        for win in tqdm(
            list(iter_windows(grid.height, grid.width, block)), desc="regions", unit="block", leave=False
        ):
            codes = m.read(1, window=win)
            cls_index = np.where(codes < len(lut), lut[np.minimum(codes, len(lut) - 1)], -1)
            if not (cls_index >= 0).any():
                continue
            region = _region_index(tree, geoms, grid, win, len(regions))
            tally.add(
                region,
                cls_index,
                pixel_areas(grid, win),
                f.read(1, window=win),
                k.read(1, window=win),
                few_clear,
            )
    return tally


def _region_index(
    tree: shapely.STRtree, geoms: np.ndarray, grid: Grid, win: Window, outside: int
) -> np.ndarray:
    """Each pixel's region index (``outside`` where no region holds its centre)."""
    h, w = int(win.height), int(win.width)
    tr = window_transform(win, grid.transform)
    left, top = tr @ (0, 0)
    right, bottom = tr @ (w, h)
    hits = tree.query(shapely.box(min(left, right), min(top, bottom), max(left, right), max(top, bottom)))
    if len(hits) == 0:
        return np.full((h, w), outside, np.int32)
    shapes = [(geoms[i], int(i)) for i in sorted(hits)]
    return rasterize(shapes, out_shape=(h, w), transform=tr, fill=outside, dtype="int32", all_touched=False)


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------

FIELDS = (
    "region_id",
    "region_name",
    "code",
    "class",
    "pixels",
    "area_ha",
    "share",
    "mean_confidence",
    "few_clear_share",
)


def region_rows(
    tally: RegionTally, regions: gpd.GeoDataFrame, classes: Sequence[ClassDef]
) -> list[dict[str, Any]]:
    """One row per region and class with pixels (regions first, then the pixels outside every
    region, if any); ``share`` of the region's mapped area."""
    ids = [*map(str, regions["region_id"]), OUTSIDE]
    names = [*map(str, regions["region_name"]), "outside every region"]
    rows = []
    for r in range(tally.n_regions + 1):
        total = float(tally.area_m2[r].sum())
        if r == tally.n_regions and tally.pixels[r].sum() == 0:
            continue
        for j, c in enumerate(classes):
            n = int(tally.pixels[r, j])
            cn = int(tally.conf_n[r, j])
            rows.append(
                {
                    "region_id": ids[r],
                    "region_name": names[r],
                    "code": c.code,
                    "class": c.name,
                    "pixels": n,
                    "area_ha": round(float(tally.area_m2[r, j]) / 1e4, 4),
                    "share": round(float(tally.area_m2[r, j]) / total, 6) if total else 0.0,
                    "mean_confidence": round(float(tally.conf_sum[r, j]) / cn, 2) if cn else None,
                    "few_clear_share": round(int(tally.few_clear[r, j]) / n, 6) if n else None,
                }
            )
    return rows


def write_rows(rows: Sequence[dict[str, Any]], out: Path) -> None:
    write_csv(rows, FIELDS, out)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``regions.csv`` (numbers parsed)."""
    types = {"code": int, "pixels": int, "area_ha": float, "share": float, "mean_confidence": float}
    types["few_clear_share"] = float
    return read_csv(path, types, ("mean_confidence", "few_clear_share"), "a regional statistics table")


def write_layer(
    tally: RegionTally, regions: gpd.GeoDataFrame, classes: Sequence[ClassDef], out: Path
) -> None:
    """The regions as polygons with their figures: mapped ha, ha per class, mean confidence and
    few-clear share (a GeoPackage for QGIS: one attribute column per class)."""
    n = tally.n_regions
    px = tally.pixels[:n]
    gdf = regions[["region_id", "region_name", "geometry"]].copy()
    gdf["mapped_ha"] = tally.area_m2[:n].sum(axis=1) / 1e4
    for j, c in enumerate(classes):
        gdf[f"ha_{c.name}"] = tally.area_m2[:n, j] / 1e4
    with np.errstate(invalid="ignore", divide="ignore"):
        gdf["mean_confidence"] = np.where(
            tally.conf_n[:n].sum(axis=1) > 0,
            tally.conf_sum[:n].sum(axis=1) / tally.conf_n[:n].sum(axis=1),
            np.nan,
        )
        gdf["few_clear_share"] = np.where(
            px.sum(axis=1) > 0, tally.few_clear[:n].sum(axis=1) / px.sum(axis=1), np.nan
        )
    with atomic_path(out) as tmp:
        gdf.to_file(tmp, driver="GPKG", layer="regions", engine="pyogrio")


def regions_stage(cfg: Config, mosaic_dir: Path, out_csv: Path, out_gpkg: Path) -> list[dict[str, Any]]:
    """The ``regions`` stage of one classifier's mosaic: ``regions.csv`` and ``regions.gpkg``."""
    inp = cfg["inputs"]
    if not inp["regions"]:
        raise PipelineError(None, "no regions layer in the config (inputs.regions)")
    layers = [mosaic_dir / f for f in ("classes.tif", "confidence.tif", "clear.tif")]
    for p in layers:
        if not p.exists():
            raise PipelineError(p, "the national mosaic is missing (run the mosaic job first)")
    with rasterio.open(layers[0]) as src:
        crs = src.crs
    regions = read_regions(Path(inp["regions"]), inp["region_id_field"], inp["region_name_field"], crs)
    tally = tally_regions(regions, cfg.classes, *layers, few_clear=cfg["mosaic"]["few_clear"])
    rows = region_rows(tally, regions, cfg.classes)
    try:
        write_rows(rows, out_csv)
        write_layer(tally, regions, cfg.classes, out_gpkg)
    except BaseException:
        out_csv.unlink(missing_ok=True)
        raise
    return rows
