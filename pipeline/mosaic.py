"""The national map: every tile's class map, confidence and validity on one grid, each pixel once.

**Arbitration.** Where tiles overlap (MGRS: 984 px; the demo: 16 px), a mosaic pixel comes from the
tile, among those with data there, whose centre is nearest (iota2's tile-priority envelopes). The
seam then runs down the middle of each overlap, where both tiles are furthest from their edges
(the networks' edge margins, the reprojection's border). The choice rests on geometry only, never
on confidence: a confidence-driven seam would follow each classifier's noise, differ from one
classifier to the next and cut objects in two. One choice per pixel feeds all three layers, so the
confidence and clear-observation counts of a pixel always describe the class shown there.

**One national CRS.** Tiles in the national CRS (``mosaic.crs``; by default the tiles' own, when
they share one) must lie on its pixel grid and are copied as they are. Tiles in another CRS (France
spans UTM 30, 31 and 32) are reprojected by GDAL's warper with nearest neighbour, block by block:
class codes and counts are never averaged.

**Areas counted once**, from each pixel's true area on the ellipsoid (the CRS's areal scale from
pyproj): a conformal national CRS (UTM, Lambert-93) would otherwise bias every class's area by its
scale error (up to 0.1 % at the edge of a UTM zone).

The mosaic is streamed in blocks of :data:`BLOCK` px; a country of 100 tiles never sits in memory.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from numba import njit
from pyproj import CRS as ProjCRS
from pyproj import Proj, Transformer
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window
from tqdm import tqdm

from pipeline.config import ClassDef, Config, map_dtype
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path
from pipeline.io.cog import (
    CONFIDENCE_NODATA,
    class_map_writer,
    cog_writer,
    confidence_writer,
    margin_writer,
    parallel_sinks,
)
from pipeline.io.tables import read_csv, write_csv
from pipeline.io.tilestore import Grid, iter_windows

log = logging.getLogger(__name__)

BLOCK = 1024  # px: a multiple of the COG block (512), so windows land on whole COG blocks
AREA_STEP = 16  # px: the areal scale is evaluated once per 16x16 px (it varies by < 1e-6 over 160 m)
CLEAR_NODATA = 65535  # the validity mosaic's no-data (0 clear observations is a real value)
ARBITRATION = "nearest tile centre among the tiles with data"


# --------------------------------------------------------------------------------------------
# the national grid
# --------------------------------------------------------------------------------------------


def _pixel_size(grid: Grid, where: str) -> float:
    t = grid.transform
    if t.b != 0 or t.d != 0 or t.e >= 0:
        raise PipelineError(where, "the map is not north-up (rotated or flipped grid): cannot be mosaicked")
    if not math.isclose(t.a, -t.e, rel_tol=1e-9):
        raise PipelineError(where, f"pixels are not square ({t.a} x {-t.e} m)")
    return float(t.a)


def national_grid(
    grids: Mapping[str, Grid],
    crs: str | None = None,
    resolution: float | None = None,
    *,
    sources: Mapping[str, str] | None = None,
) -> Grid:
    """The grid that holds every tile: the tiles' union, snapped outward onto whole pixels.

    ``crs`` None: the tiles' common CRS (tiles in several CRSs must name one). Tiles already in the
    national CRS must lie on its grid (one pixel size, origins whole pixels apart); a grid off by a
    fraction of a pixel would be resampled silently, so it is refused. ``sources`` names each tile's
    file for the messages.
    """
    if not grids:
        raise PipelineError(None, "no tile maps to mosaic")
    where = dict(sources or {})
    names = sorted(grids)
    by_crs: dict[str, list[str]] = {}
    for t in names:
        by_crs.setdefault(grids[t].crs.to_string(), []).append(t)
    if crs is None:
        if len(by_crs) > 1:
            spread = "; ".join(f"{c}: {', '.join(ts)}" for c, ts in by_crs.items())
            raise PipelineError(
                None,
                f"the tiles are in {len(by_crs)} CRSs ({spread}): set mosaic.crs to one national CRS"
                " (e.g. EPSG:2154 for France, EPSG:3035 for Europe); the other tiles are reprojected",
            )
        dst = grids[names[0]].crs
    else:
        try:
            dst = CRS.from_user_input(crs)
        except Exception as exc:  # rasterio's CRSError, or pyproj's for an odd string
            raise PipelineError(None, f"mosaic.crs {crs!r} is not a CRS GDAL knows: {exc}") from None
    proj = ProjCRS.from_wkt(dst.to_wkt())
    if not proj.is_projected or any(a.unit_name not in ("metre", "meter") for a in proj.axis_info):
        raise PipelineError(None, f"mosaic.crs {dst.to_string()} must be a projected CRS in metres")

    native = [t for t in names if grids[t].crs == dst]
    sizes = {t: _pixel_size(grids[t], where.get(t, t)) for t in names}
    res = float(resolution) if resolution else (sizes[native[0]] if native else min(sizes.values()))
    # the grid's anchor: a native tile's origin modulo the pixel (MGRS origins are whole 10 m)
    if native:
        first = grids[native[0]].transform
        anchor = (first.c % res, first.f % res)
    else:
        anchor = (0.0, 0.0)
    for t in native:
        tr = grids[t].transform
        if not math.isclose(sizes[t], res, rel_tol=1e-9):
            raise PipelineError(
                where.get(t, t),
                f"tile {t} has {sizes[t]:g} m pixels in the national CRS, whose grid has {res:g} m:"
                " map every tile at the mosaic's resolution",
            )
        dx, dy = [_off_grid((v - a) / res) * res for v, a in ((tr.c, anchor[0]), (tr.f, anchor[1]))]
        if abs(dx) > 1e-6 * res or abs(dy) > 1e-6 * res:
            raise PipelineError(
                where.get(t, t),
                f"tile {t}'s grid is offset by ({dx:.3f}, {dy:.3f}) m from the national {res:g} m grid"
                f" (anchored on tile {native[0]}): tiles in one CRS must share one pixel grid",
            )
    lefts, bottoms, rights, tops = [], [], [], []
    for t in names:
        g = grids[t]
        b = g.bounds if g.crs == dst else transform_bounds(g.crs, dst, *g.bounds, densify_pts=21)
        lefts.append(b[0])
        bottoms.append(b[1])
        rights.append(b[2])
        tops.append(b[3])
    eps = 1e-6
    left = anchor[0] + math.floor((min(lefts) - anchor[0]) / res + eps) * res
    top = anchor[1] + math.ceil((max(tops) - anchor[1]) / res - eps) * res
    width = math.ceil((max(rights) - left) / res - eps)
    height = math.ceil((top - min(bottoms)) / res - eps)
    return Grid(dst, Affine(res, 0.0, left, 0.0, -res, top), int(width), int(height))


def _off_grid(v: float) -> float:
    """Signed distance of ``v`` (in pixels) from the nearest whole pixel."""
    return v - round(v)


# --------------------------------------------------------------------------------------------
# arrays: arbitration and areas
# --------------------------------------------------------------------------------------------


def arbitrate(has_data: np.ndarray, dist2: np.ndarray) -> np.ndarray:
    """Index (along axis 0) of the tile that supplies each pixel, -1 where no tile has data.

    ``has_data`` (k, h, w) bool, ``dist2`` (k, h, w) or broadcastable: squared distance of each
    pixel to each tile's centre. Ties go to the first tile (tiles are sorted by name: reproducible).
    """
    d = np.where(has_data, dist2, np.inf)
    idx = np.argmin(d, axis=0).astype(np.int16)
    idx[~has_data.any(axis=0)] = -1
    return idx


def take(layers: np.ndarray, idx: np.ndarray, fill: int) -> np.ndarray:
    """The value of the chosen tile's layer at each pixel (``fill`` where ``idx`` is -1)."""
    out = np.take_along_axis(layers, np.maximum(idx, 0)[None].astype(np.intp), axis=0)[0]
    out[idx < 0] = fill
    return out


def fuse_block(
    classes: np.ndarray,
    confidence: np.ndarray,
    clear: np.ndarray,
    extra: np.ndarray | None,
    centres: Sequence[tuple[float, float]],
    x: np.ndarray,
    y: np.ndarray,
    cells: CellAreas,
    tally: AreaTally,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """One block of the mosaic in one compiled pass: arbitration (:func:`arbitrate` on :func:`_dist2`),
    the chosen tile's values of every layer (:func:`take`), and the area and confidence tally
    (:meth:`AreaTally.add`), with the same results as those numpy functions (tested), 2-4x faster
    (docs/benchmarks.md).

    ``classes``, ``confidence``, ``clear`` and ``extra`` (the margin, or None): (k, h, w) stacks of
    the k tiles touching the block, in tile order; ``x`` (w,), ``y`` (h,): the pixel centres'
    coordinates; ``centres``: the tiles'. A code the tally does not know is counted by numpy.
    """
    k, h, w = classes.shape
    cx = np.array([c[0] for c in centres], np.float64)
    cy = np.array([c[1] for c in centres], np.float64)
    bins = len(tally.dense_codes)
    n_known = int(tally.dense_codes.max()) + 1
    per_cell = np.zeros((cells.area.size, n_known), np.int64)
    hist = np.zeros((n_known, 256), np.int64)
    outs = (
        np.empty((h, w), classes.dtype),
        np.empty((h, w), np.uint8),
        np.empty((h, w), np.uint16),
        np.empty((h, w) if extra is not None else (0, 0), np.uint8),
    )
    ex = extra if extra is not None else np.empty((0, 0, 0), np.uint8)
    known = _fuse_block(
        classes, confidence, clear, ex, extra is not None, cx, cy, x, y,
        cells.rows, cells.cols, cells.area.shape[1], tally.dense_codes, bins, per_cell, hist, *outs,
    )  # fmt: skip
    if known:
        tally.add_counts(per_cell, cells, hist)
    else:  # a value outside the nomenclature: the pixel-by-pixel tally
        tally.add(outs[0], cells, outs[1])
    return outs[0], outs[1], outs[2], outs[3] if extra is not None else None


@njit(nogil=True, cache=True)
def _fuse_block(
    cls,
    conf,
    clear,
    extra,
    with_extra,
    cx,
    cy,
    x,
    y,
    cell_r,
    cell_c,
    cell_cols,
    dense,
    bins,
    per_cell,
    hist,
    cls_out,
    conf_out,
    clear_out,
    extra_out,
):  # pragma: no cover - compiled
    k, h, w = cls.shape
    known = True
    for i in range(h):
        dy = y[i]
        row_cells = cell_r[i] * cell_cols
        for j in range(w):
            best = 0
            if k > 1:  # nearest centre among the tiles with data (ties: the first)
                best = -1
                bd = np.inf
                for t in range(k):
                    if cls[t, i, j] != 0:
                        d = (x[j] - cx[t]) ** 2 + (dy - cy[t]) ** 2
                        if d < bd:
                            bd = d
                            best = t
                if best < 0:
                    best = 0  # no tile has data: tile 0's class is 0 too
            code = cls[best, i, j]
            if code == 0:
                cf = CONFIDENCE_NODATA
                clear_out[i, j] = CLEAR_NODATA
                if with_extra:
                    extra_out[i, j] = CONFIDENCE_NODATA
            else:
                cf = conf[best, i, j]
                clear_out[i, j] = clear[best, i, j]
                if with_extra:
                    extra_out[i, j] = extra[best, i, j]
            cls_out[i, j] = code
            conf_out[i, j] = cf
            bn = dense[code] if code < bins else -1
            if bn < 0:
                known = False
            else:
                per_cell[row_cells + cell_c[j], bn] += 1
                hist[bn, cf] += 1
    return known


@dataclass(frozen=True)
class CellAreas:
    """True pixel areas of a window, constant over each ``step`` x ``step`` px cell of the grid's
    lattice: a window's pixel lies in cell (``rows[r]``, ``cols[c]``), whose pixels have ``area`` m²."""

    rows: np.ndarray  # (h,) cell row of each window row
    cols: np.ndarray  # (w,) cell column of each window column
    area: np.ndarray  # (cell rows, cell columns) m² per pixel

    def pixels(self) -> np.ndarray:
        """Every pixel's area (h, w)."""
        return self.area[self.rows[:, None], self.cols[None, :]]

    def cell_index(self) -> np.ndarray:
        """Every pixel's flat cell index (h, w) into ``area.ravel()``."""
        return self.rows[:, None] * self.area.shape[1] + self.cols[None, :]


def cell_areas(grid: Grid, win: Window, step: int = AREA_STEP) -> CellAreas:
    """True area (m²) on the ellipsoid of the pixels of ``win``: the nominal pixel area divided by the
    CRS's areal scale. The scale is evaluated at the centres of a fixed ``step`` x ``step`` px lattice
    of the whole grid, so a pixel's area does not depend on how the grid is cut into blocks."""
    h, w = int(win.height), int(win.width)
    res_x, res_y = grid.transform.a, -grid.transform.e
    rows = (int(win.row_off) + np.arange(h)) // step
    cols = (int(win.col_off) + np.arange(w)) // step
    ur, ri = np.unique(rows, return_inverse=True)
    uc, ci = np.unique(cols, return_inverse=True)
    cc, rr = np.meshgrid((uc + 0.5) * step, (ur + 0.5) * step)
    x, y = grid.transform @ (cc, rr)
    scale = _areal_scale(grid.crs.to_wkt(), np.asarray(x), np.asarray(y))
    return CellAreas(ri.astype(np.int64), ci.astype(np.int64), res_x * res_y / scale)


def pixel_areas(grid: Grid, win: Window, step: int = AREA_STEP) -> np.ndarray:
    """Every pixel's true area (m²) of ``win`` (:func:`cell_areas`, expanded to pixels)."""
    return cell_areas(grid, win, step).pixels()


def _areal_scale(wkt: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    to_lonlat, proj = _projection(wkt)
    lon, lat = to_lonlat.transform(x, y)
    return np.asarray(proj.get_factors(lon, lat).areal_scale, dtype=np.float64)


@functools.lru_cache(maxsize=8)
def _projection(wkt: str) -> tuple[Transformer, Proj]:
    """The CRS's inverse transform and its Proj (built once per CRS: a few ms each, per block else)."""
    crs = ProjCRS.from_wkt(wkt)
    return Transformer.from_crs(crs, crs.geodetic_crs, always_xy=True), Proj(crs)


@dataclass
class AreaTally:
    """Per-code pixel counts, true areas (m²) and confidence sums, accumulated block by block.

    ``codes``: the values the maps hold (class codes and 0), counted in dense bins: one integer
    ``bincount`` of (cell, code) keys gives counts and areas (the areas are constant per cell), one
    of (code, confidence) keys the confidence sums; twice as fast as weighted per-pixel ``bincount``
    on a national mosaic (docs/benchmarks.md). A block holding another value is counted pixel by
    pixel."""

    size: int
    codes: Sequence[int] | None = None
    pixels: np.ndarray = field(init=False)
    area_m2: np.ndarray = field(init=False)
    conf_sum: np.ndarray = field(init=False)
    conf_n: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.pixels = np.zeros(self.size, np.int64)
        self.area_m2 = np.zeros(self.size, np.float64)
        self.conf_sum = np.zeros(self.size, np.float64)
        self.conf_n = np.zeros(self.size, np.int64)
        known = sorted({0, *(int(c) for c in self.codes or ())})
        self._known = np.array(known, np.int64)
        self._dense = np.full(self.size, -1, np.int64)
        self._dense[self._known] = np.arange(len(known))

    def add(
        self, codes: np.ndarray, areas: np.ndarray | CellAreas, confidence: np.ndarray | None = None
    ) -> None:
        dense = None
        if self.codes is not None and int(codes.max(initial=0)) < self.size:
            dense = self._dense[codes]
        if isinstance(areas, CellAreas) and dense is not None and not (dense < 0).any():
            self._add_cells(dense, areas, confidence)
            return
        if isinstance(areas, CellAreas):
            areas = areas.pixels()
        c = codes.ravel().astype(np.intp)
        self.pixels += np.bincount(c, minlength=self.size)
        self.area_m2 += np.bincount(c, weights=areas.ravel(), minlength=self.size)
        if confidence is not None:
            ok = confidence.ravel() != CONFIDENCE_NODATA
            self.conf_sum += np.bincount(c[ok], weights=confidence.ravel()[ok], minlength=self.size)
            self.conf_n += np.bincount(c[ok], minlength=self.size)

    def _add_cells(self, dense: np.ndarray, cells: CellAreas, confidence: np.ndarray | None) -> None:
        k = len(self._known)
        n_cells = cells.area.size
        per_cell = np.bincount((cells.cell_index() * k + dense).ravel(), minlength=n_cells * k).reshape(
            n_cells, k
        )
        hist = None
        if confidence is not None:
            hist = np.bincount((dense * 256 + confidence).ravel(), minlength=k * 256).reshape(k, 256)
        self.add_counts(per_cell, cells, hist)

    @property
    def dense_codes(self) -> np.ndarray:
        """Each code's bin (-1: not a known code), the lookup :func:`fuse_block` counts with."""
        return self._dense

    def add_counts(self, per_cell: np.ndarray, cells: CellAreas, hist: np.ndarray | None) -> None:
        """Add a block's (cell, code bin) pixel counts and (code bin, confidence) histogram."""
        self.pixels[self._known] += per_cell.sum(0)
        self.area_m2[self._known] += cells.area.ravel() @ per_cell
        if hist is not None:
            hist[:, CONFIDENCE_NODATA] = 0
            self.conf_sum[self._known] += hist @ np.arange(256, dtype=np.float64)
            self.conf_n[self._known] += hist.sum(1)


# --------------------------------------------------------------------------------------------
# I/O shell
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TileLayers:
    """One tile's rasters for the mosaic of one classifier; ``margin`` (the uncertainty layer of
    ``inference.probabilities``) is mosaicked where every tile has one and an output is asked for."""

    tile: str
    classes: Path
    confidence: Path
    clear: Path
    margin: Path | None = None


class _Source:
    """One tile's rasters read onto the national grid (copied when native, warped otherwise)."""

    def __init__(
        self, layers: TileLayers, nat: Grid, stack: contextlib.ExitStack, with_margin: bool = False
    ) -> None:
        self.tile = layers.tile
        paths = [layers.classes, layers.confidence, layers.clear]
        if with_margin:
            if layers.margin is None:
                raise PipelineError(layers.classes, f"tile {layers.tile}: no margin layer to mosaic")
            paths.append(layers.margin)
        for p in paths:
            if not Path(p).exists():
                raise PipelineError(p, f"tile {layers.tile}: this map is missing (run its predict job first)")
        self.paths = tuple(Path(p) for p in paths)
        try:
            srcs = [stack.enter_context(rasterio.open(p)) for p in self.paths]
        except rasterio.errors.RasterioIOError as exc:
            raise PipelineError(layers.classes, f"tile {layers.tile}: unreadable map ({exc})") from None
        g0 = _grid_of(srcs[0])
        for p, s in zip(self.paths[1:], srcs[1:], strict=True):
            if not _grid_of(s).same_as(g0):
                raise PipelineError(
                    p, f"tile {layers.tile}: not on the grid of its class map {self.paths[0]}"
                )
        self.grid = g0
        self.native = g0.crs == nat.crs
        nodata = (0, CONFIDENCE_NODATA, CLEAR_NODATA, CONFIDENCE_NODATA)[: len(self.paths)]
        if self.native:
            self.readers = srcs
            res = nat.transform.a
            self.offset = (
                round((g0.transform.c - nat.transform.c) / res),
                round((nat.transform.f - g0.transform.f) / res),
            )
        else:
            self.readers = [
                stack.enter_context(
                    WarpedVRT(
                        s,
                        crs=nat.crs,
                        transform=nat.transform,
                        width=nat.width,
                        height=nat.height,
                        resampling=Resampling.nearest,
                        src_nodata=s.nodata,
                        nodata=nd,
                    )
                )
                for s, nd in zip(srcs, nodata, strict=True)
            ]
        b = g0.bounds if self.native else transform_bounds(g0.crs, nat.crs, *g0.bounds, densify_pts=21)
        self.bounds = b
        cx, cy = g0.transform @ (g0.width / 2, g0.height / 2)
        if not self.native:
            xs, ys = Transformer.from_crs(
                ProjCRS.from_wkt(g0.crs.to_wkt()), ProjCRS.from_wkt(nat.crs.to_wkt()), always_xy=True
            ).transform([cx], [cy])
            cx, cy = xs[0], ys[0]
        self.centre = (float(cx), float(cy))
        self.nodata = nodata

    def touches(self, nat: Grid, win: Window) -> bool:
        left, top = nat.transform @ (win.col_off, win.row_off)
        right, bottom = nat.transform @ (win.col_off + win.width, win.row_off + win.height)
        b = self.bounds
        return left < b[2] and right > b[0] and bottom < b[3] and top > b[1]

    def read(self, layer: int, win: Window, dtype: np.dtype) -> np.ndarray:
        """Layer ``layer`` (0 classes, 1 confidence, 2 clear, 3 margin) over national window ``win``."""
        h, w = int(win.height), int(win.width)
        if not self.native:
            return self.readers[layer].read(1, window=win).astype(dtype, copy=False)
        out = np.full((h, w), self.nodata[layer], dtype=dtype)
        col0, row0 = int(win.col_off) - self.offset[0], int(win.row_off) - self.offset[1]
        c0, r0 = max(col0, 0), max(row0, 0)
        c1, r1 = min(col0 + w, self.grid.width), min(row0 + h, self.grid.height)
        if c1 > c0 and r1 > r0:
            data = self.readers[layer].read(1, window=Window(c0, r0, c1 - c0, r1 - r0))
            out[r0 - row0 : r1 - row0, c0 - col0 : c1 - col0] = data
        return out


def _grid_of(src: rasterio.io.DatasetReader) -> Grid:
    return Grid(src.crs, src.transform, src.width, src.height)


@dataclass
class MosaicResult:
    grid: Grid
    tally: AreaTally
    tiles: list[str]
    reprojected: list[str]


def build_mosaic(
    tiles: Sequence[TileLayers],
    classes: Sequence[ClassDef],
    out_classes: Path,
    out_confidence: Path,
    out_clear: Path,
    *,
    out_margin: Path | None = None,
    crs: str | None = None,
    resolution: float | None = None,
    tags: dict[str, str] | None = None,
    block: int = BLOCK,
) -> MosaicResult:
    """Stream every tile's layers onto the national grid, arbitrate overlaps, write three COGs (four
    with ``out_margin``) and tally each class's true area."""
    codes = [c.code for c in classes]
    dtype = map_dtype(codes)
    tally = AreaTally(max(codes) + 1, codes)
    with contextlib.ExitStack() as stack:
        grids = {}
        for t in tiles:
            if not Path(t.classes).exists():
                raise PipelineError(
                    t.classes, f"tile {t.tile}: its class map is missing (run its predict job)"
                )
            with rasterio.open(t.classes) as src:
                grids[t.tile] = _grid_of(src)
        nat = national_grid(grids, crs, resolution, sources={t.tile: str(t.classes) for t in tiles})
        order = sorted(tiles, key=lambda t: t.tile)
        sources = [_Source(t, nat, stack, with_margin=out_margin is not None) for t in order]
        reprojected = [s.tile for s in sources if not s.native]
        if reprojected:
            log.info("mosaic: tiles %s reprojected into %s (nearest neighbour)", reprojected, nat.crs)
        meta = {
            "TILES": ",".join(s.tile for s in sources),
            "ARBITRATION": ARBITRATION,
            "REPROJECTED": ",".join(reprojected) or "none",
        } | (tags or {})
        threads = min(4, len(os.sched_getaffinity(0)))
        # each COG in its own writer thread: staging writes overlap the block work below, and the
        # three overview + COG-copy passes run side by side at the end (docs/benchmarks.md)
        margin_sink = (
            [margin_writer(out_margin, nat, extra_tags=meta, threads=threads, stream_overviews=True)]
            if out_margin is not None
            else []
        )
        cls_sink, conf_sink, clear_sink, *extra_sinks = stack.enter_context(
            parallel_sinks(
                class_map_writer(
                    out_classes, nat, classes, extra_tags=meta, threads=threads, stream_overviews=True
                ),
                confidence_writer(
                    out_confidence, nat, extra_tags=meta, threads=threads, stream_overviews=True
                ),
                cog_writer(
                    out_clear,
                    nat,
                    "uint16",
                    nodata=CLEAR_NODATA,
                    resampling="AVERAGE",
                    tags={"MEANING": "clear observations per pixel"} | meta,
                    description="clear observations per pixel",
                    predictor="STANDARD",
                    threads=threads,
                    stream_overviews=True,
                ),
                *margin_sink,
            )
        )
        wins = list(iter_windows(nat.height, nat.width, block))
        for win in tqdm(wins, desc="mosaic", unit="block", leave=False):
            here = [s for s in sources if s.touches(nat, win)]
            h, w = int(win.height), int(win.width)
            extra = []
            if not here:
                cls = np.zeros((h, w), dtype)
                conf = np.full((h, w), CONFIDENCE_NODATA, np.uint8)
                clear = np.full((h, w), CLEAR_NODATA, np.uint16)
                extra = [conf] * len(extra_sinks)
            else:
                # one tile (most blocks) or several: one compiled pass arbitrates, picks and tallies
                x, y = _centres(nat, win)
                cls, conf, clear, margin_block = fuse_block(
                    _stack(here, 0, win, dtype), _stack(here, 1, win, np.uint8),
                    _stack(here, 2, win, np.uint16),
                    _stack(here, 3, win, np.uint8) if extra_sinks else None,
                    [s.centre for s in here], x, y, cell_areas(nat, win), tally,
                )  # fmt: skip
                extra = [margin_block] if margin_block is not None else []
            cls_sink.write(win, cls)
            conf_sink.write(win, conf)
            clear_sink.write(win, clear)
            for sink, block_layer in zip(extra_sinks, extra, strict=True):
                sink.write(win, block_layer)
    return MosaicResult(nat, tally, [s.tile for s in sources], reprojected)


def _stack(sources: Sequence[_Source], layer: int, win: Window, dtype: Any) -> np.ndarray:
    """(k, h, w): layer ``layer`` of each source over ``win`` (one source: a view, no copy)."""
    if len(sources) == 1:
        return sources[0].read(layer, win, dtype)[None]
    return np.stack([s.read(layer, win, dtype) for s in sources])


def _centres(nat: Grid, win: Window) -> tuple[np.ndarray, np.ndarray]:
    """The x (columns) and y (rows) coordinates of the pixel centres of ``win``."""
    res = nat.transform.a
    x = nat.transform.c + (int(win.col_off) + np.arange(int(win.width)) + 0.5) * res
    y = nat.transform.f - (int(win.row_off) + np.arange(int(win.height)) + 0.5) * res
    return x, y


def _dist2(nat: Grid, win: Window, centres: Sequence[tuple[float, float]]) -> np.ndarray:
    """(k, h, w) squared distance of each pixel centre of ``win`` to each tile centre."""
    x, y = _centres(nat, win)
    cx = np.array([c[0] for c in centres])[:, None, None]
    cy = np.array([c[1] for c in centres])[:, None, None]
    return (x[None, None, :] - cx) ** 2 + (y[None, :, None] - cy) ** 2


# --------------------------------------------------------------------------------------------
# outputs: the area table and the summary
# --------------------------------------------------------------------------------------------

AREA_FIELDS = ("code", "name", "label", "pixels", "area_ha", "grid_area_ha", "share", "mean_confidence")


def area_rows(tally: AreaTally, classes: Sequence[ClassDef], pixel_m2: float) -> list[dict[str, Any]]:
    """One row per class: true area (ha), the grid's nominal area (pixels x pixel size) and the
    class's share of the mapped area."""
    total = float(sum(tally.area_m2[c.code] for c in classes))
    rows = []
    for c in classes:
        n = int(tally.pixels[c.code])
        a = float(tally.area_m2[c.code])
        cn = int(tally.conf_n[c.code])
        rows.append(
            {
                "code": c.code,
                "name": c.name,
                "label": c.label,
                "pixels": n,
                "area_ha": round(a / 1e4, 4),
                "grid_area_ha": round(n * pixel_m2 / 1e4, 4),
                "share": round(a / total, 6) if total else 0.0,
                "mean_confidence": round(float(tally.conf_sum[c.code]) / cn, 2) if cn else None,
            }
        )
    return rows


def write_areas(rows: Sequence[Mapping[str, Any]], out: Path) -> None:
    write_csv(rows, AREA_FIELDS, out)


def read_areas(path: Path) -> list[dict[str, Any]]:
    """The rows of an ``areas.csv`` (numbers parsed)."""
    types = {"code": int, "pixels": int, "area_ha": float, "grid_area_ha": float, "share": float}
    types["mean_confidence"] = float
    return read_csv(path, types, ("mean_confidence",), "a mosaic area table")


def mosaic_classifier(
    cfg: Config,
    model: str,
    tiles: Sequence[TileLayers],
    out_dir: Path,
) -> dict[str, Any]:
    """The ``mosaic`` stage of one classifier: the three COGs, ``areas.csv`` and ``mosaic.json``, and
    the national uncertainty layer ``margin.tif`` when the tiles bring their margins."""
    m = cfg["mosaic"]
    outputs = [
        out_dir / f for f in ("classes.tif", "confidence.tif", "clear.tif", "areas.csv", "mosaic.json")
    ]
    with_margin = any(t.margin is not None for t in tiles)
    margin = out_dir / "margin.tif"
    if with_margin:
        outputs.append(margin)
    else:  # one from a run with inference.probabilities would describe another map
        margin.unlink(missing_ok=True)
    try:
        res = build_mosaic(
            tiles,
            cfg.classes,
            *outputs[:3],
            out_margin=margin if with_margin else None,
            crs=m["crs"],
            resolution=m["resolution"],
            tags={"MODEL": model, "CONFIG_DIGEST": cfg.digest},
        )
        pixel_m2 = res.grid.transform.a * -res.grid.transform.e
        rows = area_rows(res.tally, cfg.classes, pixel_m2)
        write_areas(rows, outputs[3])
        summary = _summary(model, res, rows, cfg.digest) | {"margin": with_margin}
        with atomic_path(outputs[4]) as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
    except BaseException:
        # one layer finished and another failed: none of them may claim to be this run's mosaic
        for p in outputs:
            p.unlink(missing_ok=True)
        raise
    return summary


def _summary(model: str, res: MosaicResult, rows: Sequence[Mapping[str, Any]], digest: str) -> dict[str, Any]:
    return {
        "model": model,
        "crs": res.grid.crs.to_string(),
        "transform": list(res.grid.transform)[:6],
        "width": res.grid.width,
        "height": res.grid.height,
        "tiles": res.tiles,
        "reprojected": res.reprojected,
        "arbitration": ARBITRATION,
        "mapped_pixels": int(sum(r["pixels"] for r in rows)),
        "mapped_area_ha": round(sum(r["area_ha"] for r in rows), 4),
        "grid_area_ha": round(sum(r["grid_area_ha"] for r in rows), 4),
        "config_digest": digest,
    }
