"""Demo tiles in another UTM zone: the same ground, seen on another zone's grid.

France spans UTM zones 30-32, so a national run mixes tiles whose grids are rotated against each
other. A demo tile given its own ``epsg`` keeps its ground where the country's CRS puts it (its
``grid``), and each date is rendered there and reprojected window by window onto the tile's own
grid (:func:`zone_grid`), as the same land looks on the next zone's MGRS tile: reflectances
bilinear (the 20 m bands on the 20 m grid), masks nearest.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import reproject, transform
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from pipeline.demo.landscape import Country, TileSpec
from pipeline.demo.render import RenderedWindow, render_window
from pipeline.demo.sensor import Pass
from pipeline.io.tilestore import Grid

ALIGN = 60.0  # m: product origins on a 60 m lattice (10, 20 and 60 m pixels all align, as on MGRS)
MARGIN = 4  # px of the rendering grid around a window's footprint (the bilinear kernel, rounding)


def zone_grid(grid: Grid, epsg: int) -> Grid:
    """The largest 10 m grid of ``epsg`` inside ``grid``'s footprint, origin on the 60 m lattice,
    even size: every product pixel sees rendered ground."""
    t = grid.transform
    corners = [t @ (0, 0), t @ (grid.width, 0), t @ (grid.width, grid.height), t @ (0, grid.height)]
    xs, ys = transform(grid.crs, CRS.from_epsg(epsg), [c[0] for c in corners], [c[1] for c in corners])
    # the corners' order: upper-left, upper-right, lower-right, lower-left
    left = math.ceil(max(xs[0], xs[3]) / ALIGN) * ALIGN
    right = math.floor(min(xs[1], xs[2]) / ALIGN) * ALIGN
    top = math.floor(min(ys[0], ys[1]) / ALIGN) * ALIGN
    bottom = math.ceil(max(ys[2], ys[3]) / ALIGN) * ALIGN
    width, height = int(round((right - left) / 10)) // 2 * 2, int(round((top - bottom) / 10)) // 2 * 2
    if width < 2 or height < 2:
        raise ValueError(f"no room for a tile of EPSG:{epsg} inside {grid.bounds}")
    return Grid(CRS.from_epsg(epsg), Affine(10.0, 0.0, left, 0.0, -10.0, top), width, height)


def source_window(tile: TileSpec, win: Window) -> Window:
    """The window of the rendering grid that covers product window ``win`` (even offsets/sizes)."""
    g = tile.product_grid
    tr = window_transform(win, g.transform)
    w, h = int(win.width), int(win.height)
    xs = [0, w, w, 0, w / 2, 0, w / 2, w]
    ys = [0, 0, h, h, 0, h / 2, h, h / 2]
    px, py = zip(*(tr @ (x, y) for x, y in zip(xs, ys, strict=True)), strict=True)
    sx, sy = transform(g.crs, tile.grid.crs, list(px), list(py))
    inv = ~tile.grid.transform
    cols, rows = zip(*(inv @ (x, y) for x, y in zip(sx, sy, strict=True)), strict=True)
    c0 = max(0, (math.floor(min(cols)) - MARGIN) // 2 * 2)
    r0 = max(0, (math.floor(min(rows)) - MARGIN) // 2 * 2)
    c1 = min(tile.grid.width, -(-(math.ceil(max(cols)) + MARGIN) // 2) * 2)
    r1 = min(tile.grid.height, -(-(math.ceil(max(rows)) + MARGIN) // 2) * 2)
    return Window(c0, r0, c1 - c0, r1 - r0)


def _warp(src: np.ndarray, src_tr: Affine, src_crs: CRS, shape: tuple[int, int], dst_tr: Affine,
          dst_crs: CRS, how: Resampling, nodata: float | None) -> np.ndarray:  # fmt: skip
    dst = np.zeros((src.shape[0], *shape), src.dtype)
    if nodata is not None:
        dst[:] = nodata
    # XSCALE/YSCALE = 1: the grids share one pixel size; left to itself GDAL reads the ~3 deg
    # rotation as a scale a hair below 1 and widens the bilinear kernel (a blur of up to ~30 DN at
    # field edges, tests/test_demo.py)
    reproject(
        src, dst, src_transform=src_tr, src_crs=src_crs, dst_transform=dst_tr, dst_crs=dst_crs,
        resampling=how, src_nodata=nodata, dst_nodata=nodata, XSCALE=1, YSCALE=1,
    )  # fmt: skip
    return dst


def render_zone_window(
    c: Country, tile: TileSpec, p: Pass, win: Window, static_of: Callable[[Window], Any] | None = None
) -> RenderedWindow:
    """Window ``win`` of the tile's product grid, rendered on the country's grid and reprojected;
    ``static_of(window)``: the static ground of a rendering window (a cache), else rendered here."""
    from pipeline.io.l2a import grid20

    src_win = source_window(tile, win)
    rw = render_window(c, tile, p, src_win, static_of(src_win) if static_of else None)
    g, g20 = tile.product_grid, grid20(tile.product_grid)
    h, w = int(win.height), int(win.width)
    s10 = window_transform(src_win, tile.grid.transform)
    s20 = s10 * Affine.scale(2)
    d10 = window_transform(win, g.transform)
    d20 = window_transform(Window(win.col_off // 2, win.row_off // 2, w // 2, h // 2), g20.transform)
    crs_s, crs_d = tile.grid.crs, g.crs
    r10 = _warp(rw.r10, s10, crs_s, (h, w), d10, crs_d, Resampling.bilinear, -10000)
    r20 = _warp(rw.r20, s20, crs_s, (h // 2, w // 2), d20, crs_d, Resampling.bilinear, -10000)
    names = list(rw.masks())
    stack = np.stack([rw.masks()[k].astype(np.uint8) for k in names])
    masks = _warp(stack, s10, crs_s, (h, w), d10, crs_d, Resampling.nearest, None).astype(bool)
    m = dict(zip(names, masks, strict=True))
    m["edge"] |= (r10 == -10000).any(axis=0)  # never rendered (cannot happen inside the footprint)
    return RenderedWindow(r10, r20, **m)
