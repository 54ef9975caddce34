"""The OSO-style vector product: the national mosaic sieved to a minimum mapping unit, polygonised,
simplified without gaps or overlaps, with per-polygon statistics, one GeoPackage per part.

A part is a region of ``inputs.regions`` (each file then stays the size of a département, as in the
OSO product), or, without regions, a block of ``vector.block_px`` px of the mosaic grid. Each part is
processed on its own window, so memory holds one part, whatever the country's size:

1. **Sieve** (GDAL's ``GDALSieveFilter`` through :func:`rasterio.features.sieve`): patches smaller than
   ``vector.mmu_ha`` merge into their largest neighbour. The window carries a margin of as many
   pixels as the minimum unit holds, so a patch cut by the window's edge is seen whole: a patch
   that reaches the part and leaves the window holds at least that many pixels inside it.
2. **Polygonise** (GDAL's ``GDALPolygonize`` through :func:`rasterio.features.shapes`) the part's
   pixels (those whose centre lies in the region): polygons follow pixel edges, so the polygons of
   neighbouring parts share their borders exactly.
3. **Simplify** the polygons as one coverage (GEOS ``CoverageSimplify``: shared edges are simplified
   once, so neighbours stay edge to edge, no gap, no overlap), within ``vector.simplify_m``; the
   part's outer border is left as it is, so parts still fit together.
4. **Statistics** per polygon, from the pixels it covers: its class (the majority after the sieve),
   that class's share of the polygon's pixels before the sieve, the mean confidence, the area (ha,
   true pixel areas as in ``areas.csv``).

Each GeoPackage carries the nomenclature's colours as a QGIS style (its ``layer_styles`` table, used
by QGIS as the layer's default, and a ``.qml`` beside it).
"""

from __future__ import annotations

import json
import logging
import math
import re
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import quoteattr

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from rasterio.features import rasterize, shapes, sieve
from rasterio.windows import Window
from rasterio.windows import transform as window_transform
from tqdm import tqdm

from pipeline.config import ClassDef, Config
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path
from pipeline.io.cog import CONFIDENCE_NODATA
from pipeline.io.tilestore import Grid
from pipeline.mosaic import pixel_areas
from pipeline.regions import read_regions

log = logging.getLogger(__name__)

LAYER = "landcover"


@dataclass(frozen=True)
class Part:
    """One file of the vector product: a region (its geometry) or a block of the grid (None)."""

    name: str
    window: Window  # the part's pixels lie in this window of the mosaic grid
    geometry: shapely.Geometry | None = None
    label: str = ""


def mmu_pixels(mmu_ha: float, grid: Grid) -> int:
    """The minimum mapping unit in pixels (at the grid's nominal pixel area), at least 1."""
    return max(1, round(mmu_ha * 1e4 / (grid.transform.a * -grid.transform.e)))


def parts_of(grid: Grid, regions: gpd.GeoDataFrame | None, block_px: int) -> Iterator[Part]:
    """Regions clipped to the grid (their pixel window), or blocks of ``block_px`` when none."""
    if regions is None:
        for row in range(0, grid.height, block_px):
            for col in range(0, grid.width, block_px):
                w = Window(col, row, min(block_px, grid.width - col), min(block_px, grid.height - row))
                yield Part(f"block_{row // block_px:03d}_{col // block_px:03d}", w)
        return
    inv = ~grid.transform
    for rid, name, geom in zip(regions["region_id"], regions["region_name"], regions.geometry, strict=True):
        x0, y0, x1, y1 = geom.bounds
        c0, r0 = inv @ (x0, y1)
        c1, r1 = inv @ (x1, y0)
        c0, r0 = max(0, math.floor(c0)), max(0, math.floor(r0))
        c1, r1 = min(grid.width, math.ceil(c1)), min(grid.height, math.ceil(r1))
        if c1 > c0 and r1 > r0:
            yield Part(_safe(str(rid)), Window(c0, r0, c1 - c0, r1 - r0), geom, str(name))


def _safe(name: str) -> str:
    """A region id as a file name (ids like "2A", "75/01" or "Île-de-France")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "region"


def _grow(win: Window, margin: int, grid: Grid) -> Window:
    c0, r0 = max(0, int(win.col_off) - margin), max(0, int(win.row_off) - margin)
    c1 = min(grid.width, int(win.col_off + win.width) + margin)
    r1 = min(grid.height, int(win.row_off + win.height) + margin)
    return Window(c0, r0, c1 - c0, r1 - r0)


def vectorise_part(
    classes: np.ndarray,
    confidence: np.ndarray,
    inside: np.ndarray,
    areas: np.ndarray,
    transform: rasterio.Affine,
    mmu_px: int,
    connectivity: int,
    simplify_m: float,
) -> tuple[list[shapely.Geometry], dict[str, np.ndarray]]:
    """Sieve, polygonise and simplify one part's window; ``inside``: the part's own pixels.

    Returns the polygons and their columns: ``class_code``, ``class_share`` (pixels of that class
    before the sieve), ``mean_confidence``, ``area_ha`` and ``pixels``.
    """
    valid = classes > 0
    sieved = sieve(classes, mmu_px, mask=valid, connectivity=connectivity) if mmu_px > 1 else classes
    keep = inside & valid
    found = list(shapes(sieved, mask=keep, connectivity=connectivity, transform=transform))
    empty = {k: np.zeros(0) for k in ("class_code", "class_share", "mean_confidence", "area_ha", "pixels")}
    if not found:
        return [], empty
    geoms = [shapely.geometry.shape(g) for g, _ in found]
    codes = np.array([int(v) for _, v in found])
    # each pixel's polygon: polygons follow pixel edges, so burning them back is exact
    index = rasterize(
        [(g, i + 1) for i, g in enumerate(geoms)], out_shape=classes.shape, transform=transform, dtype="int32"
    )
    index[~keep] = 0
    n = len(geoms) + 1
    flat = index.ravel()
    pixels = np.bincount(flat, minlength=n)[1:]
    same = np.bincount(flat, weights=(classes == sieved).ravel(), minlength=n)[1:]
    ok = confidence.ravel() != CONFIDENCE_NODATA
    conf_sum = np.bincount(flat[ok], weights=confidence.ravel()[ok], minlength=n)[1:]
    conf_n = np.bincount(flat[ok], minlength=n)[1:]
    area = np.bincount(flat, weights=areas.ravel(), minlength=n)[1:]
    if simplify_m > 0:
        geoms = list(
            shapely.coverage_simplify(np.array(geoms, dtype=object), simplify_m, simplify_boundary=False)
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        cols = {
            "class_code": codes,
            "class_share": np.round(same / np.maximum(pixels, 1), 4),
            "mean_confidence": np.round(np.where(conf_n > 0, conf_sum / np.maximum(conf_n, 1), np.nan), 1),
            "area_ha": np.round(area / 1e4, 4),
            "pixels": pixels,
        }
    return geoms, cols


def qml(classes: Sequence[ClassDef], field: str = "class_code") -> str:
    """A QGIS style: polygons filled with the nomenclature's colours, categorised on ``field``."""
    cats, syms = [], []
    for i, c in enumerate(classes):
        r, g, b = c.rgb
        label = quoteattr(f"{c.name} {c.label}".strip())
        cats.append(f'      <category render="true" symbol="{i}" value="{c.code}" label={label}/>')
        syms.append(
            f'      <symbol type="fill" name="{i}" alpha="1" clip_to_extent="1" force_rhr="0">\n'
            '        <layer class="SimpleFill" enabled="1" pass="0" locked="0">\n'
            '          <Option type="Map">\n'
            f'            <Option type="QString" name="color" value="{r},{g},{b},255"/>\n'
            '            <Option type="QString" name="outline_style" value="no"/>\n'
            '            <Option type="QString" name="style" value="solid"/>\n'
            "          </Option>\n"
            f'          <prop k="color" v="{r},{g},{b},255"/>\n'
            '          <prop k="outline_style" v="no"/>\n'
            '          <prop k="style" v="solid"/>\n'
            "        </layer>\n"
            "      </symbol>"
        )
    return (
        "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"
        '<qgis version="3.28.0" styleCategories="Symbology">\n'
        f'  <renderer-v2 type="categorizedSymbol" attr="{field}" symbollevels="0" enableorderby="0"'
        ' forceraster="0">\n'
        "    <categories>\n" + "\n".join(cats) + "\n    </categories>\n"
        "    <symbols>\n" + "\n".join(syms) + "\n    </symbols>\n"
        "  </renderer-v2>\n"
        "</qgis>\n"
    )


def add_layer_style(gpkg: Path, layer: str, style: str) -> None:
    """Register ``style`` as the default QGIS style of ``layer`` in the GeoPackage (``layer_styles``,
    the table QGIS reads and writes for styles saved in the database)."""
    con = sqlite3.connect(gpkg)
    try:
        con.execute(
            "CREATE TABLE IF NOT EXISTS layer_styles (id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " f_table_catalog TEXT, f_table_schema TEXT, f_table_name TEXT, f_geometry_column TEXT,"
            " styleName TEXT, styleQML TEXT, styleSLD TEXT, useAsDefault BOOLEAN, description TEXT,"
            " owner TEXT, ui TEXT, update_time DATETIME DEFAULT CURRENT_TIMESTAMP)"
        )
        con.execute(
            "INSERT OR IGNORE INTO gpkg_contents (table_name, data_type, identifier)"
            " VALUES ('layer_styles', 'attributes', 'layer_styles')"
        )
        con.execute(
            "INSERT INTO layer_styles (f_table_catalog, f_table_schema, f_table_name, f_geometry_column,"
            " styleName, styleQML, styleSLD, useAsDefault, description, owner)"
            " VALUES ('', '', ?, 'geom', ?, ?, '', 1, 'nomenclature colours', 'landcover')",
            (layer, layer, style),
        )
        con.commit()
    finally:
        con.close()


def vector_product(cfg: Config, mosaic_dir: Path, out_dir: Path) -> dict[str, Any]:
    """The ``vector`` stage of one classifier: ``<out_dir>/<part>.gpkg`` (+ ``.qml``) per part and an
    ``index.json``; the folder appears whole, or not at all."""
    v = cfg["vector"]
    layers = [mosaic_dir / "classes.tif", mosaic_dir / "confidence.tif"]
    for p in layers:
        if not p.exists():
            raise PipelineError(p, "the national mosaic is missing (run the mosaic job first)")
    with rasterio.open(layers[0]) as src:
        grid = Grid(src.crs, src.transform, src.width, src.height)
    inp = cfg["inputs"]
    regions = None
    if inp["regions"]:
        regions = read_regions(
            Path(inp["regions"]), inp["region_id_field"], inp["region_name_field"], grid.crs
        )
    mmu = mmu_pixels(v["mmu_ha"], grid)
    style = qml(cfg.classes)
    names = {c.code: c.name for c in cfg.classes}
    index: dict[str, Any] = {"parts": [], "mmu_ha": v["mmu_ha"], "mmu_pixels": mmu}
    index |= {"simplify_m": v["simplify_m"], "connectivity": v["connectivity"], "crs": grid.crs.to_string()}
    with atomic_path(out_dir) as stage:  # the folder appears whole, or the previous one stays
        stage.mkdir()
        with rasterio.open(layers[0]) as cls_src, rasterio.open(layers[1]) as conf_src:
            parts = list(parts_of(grid, regions, v["block_px"]))
            for part in tqdm(parts, desc="vector", unit="part", leave=False):
                rec = _write_part(part, cls_src, conf_src, grid, mmu, v, names, style, stage)
                if rec:
                    index["parts"].append(rec)
        (stage / "index.json").write_text(json.dumps(index, indent=1))
    return index


def _write_part(
    part: Part,
    cls_src: rasterio.io.DatasetReader,
    conf_src: rasterio.io.DatasetReader,
    grid: Grid,
    mmu: int,
    v: dict[str, Any],
    names: dict[int, str],
    style: str,
    stage: Path,
) -> dict[str, Any] | None:
    win = _grow(part.window, mmu, grid)  # the sieve sees every patch that reaches the part whole
    classes = cls_src.read(1, window=win)
    if not (classes > 0).any():
        return None
    tr = window_transform(win, grid.transform)
    if part.geometry is None:
        inside = np.zeros(classes.shape, bool)
        r0, c0 = int(part.window.row_off - win.row_off), int(part.window.col_off - win.col_off)
        inside[r0 : r0 + int(part.window.height), c0 : c0 + int(part.window.width)] = True
    else:
        inside = rasterize([(part.geometry, 1)], out_shape=classes.shape, transform=tr, dtype="uint8") > 0
    geoms, cols = vectorise_part(
        classes,
        conf_src.read(1, window=win),
        inside,
        pixel_areas(grid, win),
        tr,
        mmu,
        v["connectivity"],
        v["simplify_m"],
    )
    if not geoms:
        return None
    gdf = gpd.GeoDataFrame(
        {
            "class_code": cols["class_code"].astype(np.int32),
            "class_name": [names.get(int(c), str(c)) for c in cols["class_code"]],
            "class_share": cols["class_share"],
            "mean_confidence": cols["mean_confidence"],
            "area_ha": cols["area_ha"],
            "pixels": cols["pixels"].astype(np.int64),
        },
        geometry=geoms,
        crs=grid.crs,
    )
    if part.geometry is not None:
        gdf.insert(0, "region_id", part.name)
    path = stage / f"{part.name}.gpkg"
    gdf.to_file(path, driver="GPKG", layer=LAYER, engine="pyogrio")
    add_layer_style(path, LAYER, style)
    (stage / f"{part.name}.qml").write_text(style)
    return {"name": part.name, "label": part.label, "file": path.name, "polygons": len(gdf)}
