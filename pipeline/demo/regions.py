"""Demo regions: four "départements" whose borders wander across the tiles, for the regional
statistics (pipeline/regions.py). Their borders cross tile edges and the tile overlap, and the
outer ones reach beyond the mapped area, as a real country's regions do at its coast or border."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely
from shapely.ops import split

from pipeline.demo.landscape import Country
from pipeline.io.atomic import atomic_path

NAMES = {
    "NW": ("D01", "Lomagne"),
    "NE": ("D02", "Quercy"),
    "SW": ("D03", "Astarac"),
    "SE": ("D04", "Lauragais"),
}


def region_polygons(c: Country) -> gpd.GeoDataFrame:
    """The four regions (id, name, geometry) in the demo's CRS: a partition of the tiles' extent
    grown by 5 %, cut by a wavy north-south border at 45 % of the width and a wavy east-west one."""
    bounds = np.array([t.grid.bounds for t in c.tiles])
    left, bottom = bounds[:, 0].min(), bounds[:, 1].min()
    right, top = bounds[:, 2].max(), bounds[:, 3].max()
    w, h = right - left, top - bottom
    box = shapely.box(left - 0.05 * w, bottom - 0.05 * h, right + 0.05 * w, top + 0.05 * h)
    s = np.linspace(-0.2, 1.2, 200)
    ns = shapely.LineString(np.c_[left + 0.45 * w + 0.04 * w * np.sin(9 * s), bottom + s * h])
    ew = shapely.LineString(np.c_[left + s * w, bottom + 0.5 * h + 0.08 * h * np.cos(7 * s)])
    parts = [p for half in split(box, ns).geoms for p in split(half, ew).geoms]
    cx, cy = left + 0.45 * w, bottom + 0.5 * h
    rows = []
    for p in parts:
        pt = p.representative_point()
        key = ("N" if pt.y > cy else "S") + ("W" if pt.x < cx else "E")
        rows.append({"id": NAMES[key][0], "name": NAMES[key][1], "geometry": p})
    gdf = gpd.GeoDataFrame(rows, crs=f"EPSG:{c.epsg}").dissolve(by="id", as_index=False)
    return gdf[["id", "name", "geometry"]].sort_values("id").reset_index(drop=True)


def write_regions(c: Country, path: Path) -> None:
    """Write the regions GeoPackage (layer ``regions``: id, name, geometry) atomically."""
    with atomic_path(path) as tmp:
        region_polygons(c).to_file(tmp, driver="GPKG", layer="regions", engine="pyogrio")
