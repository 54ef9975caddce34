"""Cloud-optimised GeoTIFF outputs users open directly in QGIS: class maps and the validity layer.

Windows are streamed into a plain tiled GTiff beside the target (so a tile never sits in memory),
then GDAL's COG driver rewrites it with internal overviews, and the result is renamed into place
(:func:`~pipeline.io.atomic.atomic_path`). Class maps carry a colour table from the nomenclature,
nodata 0 and the class names as metadata (GeoTIFF has no tag for GDAL category names; they would
otherwise live in an ``.aux.xml`` sidecar that copies and uploads lose). Their overviews use MODE,
as averaging class codes would invent classes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from affine import Affine
from numba import njit
from rasterio.enums import Resampling
from rasterio.windows import Window
from tqdm import tqdm

from pipeline.config import ClassDef, map_dtype
from pipeline.io.atomic import atomic_path
from pipeline.io.tilestore import SHARD, Grid, iter_windows, open_store, store_grid, win_slices

BLOCK = 512
log = logging.getLogger(__name__)


@dataclass
class RasterSink:
    """An open staging GTiff: ``write(window, array)`` places one finished window (and its overview
    cells, when the writer streams them)."""

    dataset: rasterio.io.DatasetWriter
    pyramid: _Pyramid | None = None
    factors: list[int] | None = None
    grid: Grid | None = None

    def write(self, window: Window, array: np.ndarray) -> None:
        if array.ndim == 3:  # every band of a multi-band COG at once
            self.dataset.write(array, window=window)
            return
        self.dataset.write(array, 1, window=window)
        if self.pyramid is not None:
            if not _Pyramid.fits(window, self.factors or [], self.grid):  # type: ignore[arg-type]
                log.info(
                    "%s: window %s off the overview cells, GDAL builds the overviews",
                    self.dataset.name,
                    window,
                )
                self.pyramid.unlink()
                self.pyramid = None
                return
            self.pyramid.write(window, array)


def mode2x2(a: np.ndarray, nodata: float | None) -> np.ndarray:
    """Each 2x2 cell's most frequent valid value (the first of the cell, in row-major order, on a
    tie; ``nodata`` where none is valid); odd edges are cells of 1 or 2 pixels."""
    h, w = a.shape
    pad = np.pad(a, ((0, h % 2), (0, w % 2)), constant_values=0 if nodata is None else nodata)
    v = np.stack([pad[0::2, 0::2], pad[0::2, 1::2], pad[1::2, 0::2], pad[1::2, 1::2]])
    ok = np.ones(v.shape, bool) if nodata is None else v != nodata
    if h % 2:
        ok[2:, -1, :] = False  # the padded row
    if w % 2:
        ok[1::2, :, -1] = False  # the padded column
    count = np.zeros(v.shape, np.int8)
    for i in range(4):
        for j in range(4):
            count[i] += (v[i] == v[j]) & ok[j]
    count[~ok] = 0
    best = count.argmax(0)
    out = np.take_along_axis(v, best[None], 0)[0]
    if nodata is not None:
        out = np.where(count.max(0) > 0, out, np.asarray(nodata, a.dtype))
    return out.astype(a.dtype)


def sum2x2(a: np.ndarray) -> np.ndarray:
    """Each 2x2 cell's sum (odd edges: cells of 1 or 2 pixels)."""
    h, w = a.shape
    pad = np.pad(a, ((0, h % 2), (0, w % 2)))
    return pad[0::2, 0::2] + pad[0::2, 1::2] + pad[1::2, 0::2] + pad[1::2, 1::2]


@njit(nogil=True, cache=True)
def _mode_level(a, nodata, has_nodata, out):  # pragma: no cover - compiled
    """:func:`mode2x2` of ``a`` into ``out`` in one pass (the same cells, ties and no-data)."""
    h, w = a.shape
    vals = np.empty(4, a.dtype)
    ok = np.empty(4, np.bool_)
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            i, j = 2 * r, 2 * c
            if i + 1 < h and j + 1 < w:
                v = a[i, j]
                if a[i, j + 1] == v and a[i + 1, j] == v and a[i + 1, j + 1] == v:
                    out[r, c] = v  # a uniform cell (most of a class map): its value, or no-data
                    continue
            n = 0
            for dr in range(2):
                for dc in range(2):
                    if i + dr < h and j + dc < w:
                        vals[n] = a[i + dr, j + dc]
                        ok[n] = (not has_nodata) or vals[n] != nodata
                    else:
                        vals[n] = 0
                        ok[n] = False
                    n += 1
            best, best_count = -1, 0
            for p in range(4):
                if ok[p]:
                    cnt = 0
                    for q in range(4):
                        if ok[q] and vals[q] == vals[p]:
                            cnt += 1
                    if cnt > best_count:
                        best, best_count = p, cnt
            out[r, c] = vals[best] if best >= 0 else nodata


@njit(nogil=True, cache=True)
def _mean_level(a, counts, nodata, has_nodata, fill, total, count, out):  # pragma: no cover - compiled
    """One AVERAGE level: each 2x2 cell's sum and count of valid values (``counts`` None: ``a`` is the
    base, valid where not ``nodata``; else ``a`` and ``counts`` are the level below's sums and counts),
    and its mean rounded half up (``fill`` where none), as :class:`_Pyramid` computes it in numpy."""
    h, w = a.shape
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            s, n = 0, 0
            i, j = 2 * r, 2 * c
            if counts is None and i + 1 < h and j + 1 < w:  # a whole cell of the base (most)
                v0, v1, v2, v3 = a[i, j], a[i, j + 1], a[i + 1, j], a[i + 1, j + 1]
                if not has_nodata or (v0 != nodata and v1 != nodata and v2 != nodata and v3 != nodata):
                    s = np.int64(v0) + np.int64(v1) + np.int64(v2) + np.int64(v3)
                    total[r, c] = s
                    count[r, c] = 4
                    out[r, c] = np.floor(s / 4 + 0.5)
                    continue
            for i in range(2 * r, min(2 * r + 2, h)):
                for j in range(2 * c, min(2 * c + 2, w)):
                    if counts is None:
                        if (not has_nodata) or a[i, j] != nodata:
                            s += a[i, j]
                            n += 1
                    else:
                        s += a[i, j]
                        n += counts[i, j]
            total[r, c] = s
            count[r, c] = n
            out[r, c] = np.floor(s / n + 0.5) if n > 0 else fill


class _Pyramid:
    """Overview levels (factors 2, 4, ...) computed window by window while the base is written:
    MODE from the level below, AVERAGE as the exact mean of the valid base pixels (sums and
    counts carried down), rounded half up like GDAL. Each level is its own staging GTiff; the COG
    copy reads them as the base's overviews through a VRT, so no pass re-reads the base."""

    def __init__(
        self, stage: Path, grid: Grid, dtype: str, nodata: float | None, resampling: str, factors: list[int]
    ) -> None:
        self.kind = resampling.upper()
        self.nodata, self.dtype, self.factors = nodata, np.dtype(dtype), factors
        self.paths = [stage.with_name(f"{stage.stem}.ov{f}.tif") for f in factors]
        self.datasets = []
        for f, path in zip(factors, self.paths, strict=True):
            w, h = -(-grid.width // f), -(-grid.height // f)
            level = Grid(grid.crs, grid.transform * Affine.scale(f), w, h)
            profile = level.gtiff_profile(
                dtype, nodata, BLOCK, compress="zstd", zstd_level=1, bigtiff="if_safer"
            )
            self.datasets.append(rasterio.open(path, "w", **profile))

    @staticmethod
    def fits(window: Window, factors: list[int], grid: Grid) -> bool:
        """Whether a window's levels are whole cells of every level (offsets on the coarsest
        factor, sizes too unless it ends on the grid's edge)."""
        f = factors[-1] if factors else 1
        r, c, h, w = int(window.row_off), int(window.col_off), int(window.height), int(window.width)
        return (
            r % f == 0
            and c % f == 0
            and (h % f == 0 or r + h == grid.height)
            and (w % f == 0 or c + w == grid.width)
        )

    def write(self, window: Window, array: np.ndarray) -> None:
        """Every level of one window, by the compiled kernels (:func:`mode2x2` and
        :meth:`levels_numpy` are their references, tested equal); they release the GIL, so the
        writer threads of several COGs compute their pyramids side by side."""
        r, c = int(window.row_off), int(window.col_off)
        for f, dst, level in zip(self.factors, self.datasets, self.levels(array), strict=True):
            dst.write(level, 1, window=Window(c // f, r // f, level.shape[1], level.shape[0]))

    def levels(self, array: np.ndarray) -> list[np.ndarray]:
        if not np.issubdtype(array.dtype, np.integer):  # the kernels sum integers exactly
            return self.levels_numpy(array)
        has_nodata = self.nodata is not None
        nodata = int(self.nodata) if has_nodata else 0  # type: ignore[arg-type]
        out: list[np.ndarray] = []
        level, counts = array, None
        for _ in self.factors:
            shape = (-(-level.shape[0] // 2), -(-level.shape[1] // 2))
            if self.kind == "MODE":
                nxt = np.empty(shape, array.dtype)
                _mode_level(level, nodata, has_nodata, nxt)
                level = nxt
                out.append(nxt)
                continue
            total, count, mean = (
                np.empty(shape, np.int64),
                np.empty(shape, np.int64),
                np.empty(shape, self.dtype),
            )
            _mean_level(level, counts, nodata, has_nodata, nodata, total, count, mean)
            level, counts = total, count
            out.append(mean)
        return out

    def levels_numpy(self, array: np.ndarray) -> list[np.ndarray]:
        """:meth:`levels` in numpy (the reference of the compiled kernels)."""
        out = []
        if self.kind == "MODE":
            level = array
            for _ in self.factors:
                level = mode2x2(level, self.nodata)
                out.append(level)
            return out
        valid = np.ones(array.shape, bool) if self.nodata is None else array != self.nodata
        total = np.where(valid, array, 0).astype(np.float64)
        count = valid.astype(np.int64)
        for _ in self.factors:
            total, count = sum2x2(total), sum2x2(count)
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.floor(total / count + 0.5)
            fill = 0 if self.nodata is None else self.nodata
            out.append(np.where(count > 0, mean, fill).astype(self.dtype))
        return out

    def close(self) -> None:
        for d in self.datasets:
            d.close()

    def unlink(self) -> None:
        self.close()
        for p in self.paths:
            p.unlink(missing_ok=True)


def _with_overviews(stage: Path, levels: list[Path], vrt: Path) -> Path:
    """A VRT of ``stage`` (its metadata, nodata and colour table) declaring ``levels`` as overviews."""
    rasterio.shutil.copy(stage, vrt, driver="VRT")
    xml = vrt.read_text()
    extra = "".join(
        f'<Overview><SourceFilename relativeToVRT="0">{escape(str(p.resolve()))}</SourceFilename>'
        "<SourceBand>1</SourceBand></Overview>"
        for p in levels
    )
    xml = xml.replace("</VRTRasterBand>", extra + "</VRTRasterBand>", 1)
    vrt.write_text(xml)
    return vrt


_DONE, _ABORT = object(), object()


class _Aborted(Exception):
    pass


class _Background:
    """One writer context run in its own thread, fed windows through a bounded queue."""

    def __init__(self, writer: contextlib.AbstractContextManager[RasterSink], depth: int) -> None:
        self.queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(writer,), daemon=True)
        self.thread.start()

    def _run(self, writer: contextlib.AbstractContextManager[RasterSink]) -> None:
        try:
            with writer as sink:
                while (item := self.queue.get()) is not _DONE:
                    if item is _ABORT:
                        raise _Aborted  # inside the writer: its atomic output is discarded
                    sink.write(*item)
        except _Aborted:
            pass
        except BaseException as exc:  # re-raised in the caller's thread
            self.error = exc
            with contextlib.suppress(queue.Empty):  # unblock a producer waiting on a full queue
                while True:
                    self.queue.get_nowait()

    def put(self, item: Any) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue


@dataclass
class BackgroundSink:
    """A :class:`RasterSink` whose writes go to a writer thread (``write`` returns at once unless
    ``depth`` windows are already waiting)."""

    _bg: _Background

    def write(self, window: Window, array: np.ndarray) -> None:
        self._bg.put((window, array))


@contextlib.contextmanager
def parallel_sinks(
    *writers: contextlib.AbstractContextManager[RasterSink], depth: int = 4
) -> Iterator[list[BackgroundSink]]:
    """Several COG writers, each in its own thread: the staging writes overlap the caller's work,
    and the COGs' overviews and final copies run at the same time when the block exits. An error
    in the caller or in any writer before the end discards every output (no writer's atomic rename
    runs) and is raised here; one in a writer's final COG copy is raised too, but the others may
    already be in place (Snakemake removes a failed job's outputs). Memory: at most ``depth``
    windows per writer wait in its queue."""
    bgs = [_Background(w, depth) for w in writers]
    ok = False
    try:
        yield [BackgroundSink(bg) for bg in bgs]
        ok = True
    finally:
        ok = ok and all(bg.error is None for bg in bgs)  # one writer failed: none may finish
        for bg in bgs:  # every writer is told first, so they finish in parallel
            if bg.error is None:
                with contextlib.suppress(BaseException):
                    bg.put(_DONE if ok else _ABORT)
        for bg in bgs:
            bg.thread.join()
    errors = [bg.error for bg in bgs if bg.error is not None]
    if errors:
        raise errors[0]


@contextlib.contextmanager
def cog_writer(
    out: str | os.PathLike[str],
    grid: Grid,
    dtype: str,
    *,
    nodata: float | None,
    resampling: str,
    colormap: dict[int, tuple[int, int, int, int]] | None = None,
    tags: dict[str, str] | None = None,
    band_tags: dict[str, str] | None = None,
    description: str | None = None,
    predictor: str = "NO",
    threads: int = 1,
    stream_overviews: bool = False,
    count: int = 1,
    band_descriptions: Sequence[str] | None = None,
) -> Iterator[RasterSink]:
    """Yield a sink for windows; on success turn the staging file into a COG at ``out``. One band,
    or ``count`` bands written together as (count, h, w) arrays (``band_descriptions`` name them).

    ``stream_overviews``: compute the overview levels from each window as it is written (in the
    writer's thread; :class:`_Pyramid`) instead of by GDAL from the finished base, which re-reads
    all of it (MODE on a national class mosaic: the largest part of its COG's time). Needs windows
    on the coarsest level's cells (the mosaic's blocks are); any other window falls back to GDAL."""
    with atomic_path(out) as tmp:
        stage = tmp.with_name(tmp.stem + ".stage.tif")
        vrt = tmp.with_name(tmp.stem + ".stage.vrt")
        # staging only: zstd 1 is fast and keeps a full tile's staging file small
        profile = grid.gtiff_profile(dtype, nodata, BLOCK, compress="zstd", zstd_level=1, bigtiff="if_safer")
        profile["count"] = count
        if count > 1:
            profile["interleave"] = "band"
        factors = overview_factors(grid.width, grid.height)
        streamed = stream_overviews and factors and count == 1
        pyramid = _Pyramid(stage, grid, dtype, nodata, resampling, factors) if streamed else None
        try:
            with rasterio.open(stage, "w", **profile) as dst:
                if tags:
                    dst.update_tags(**tags)
                if band_tags:
                    dst.update_tags(1, **band_tags)
                if description:
                    dst.set_band_description(1, description)
                for band, text in enumerate(band_descriptions or (), start=1):
                    dst.set_band_description(band, text)
                sink = RasterSink(dst, pyramid, factors, grid)
                yield sink
                if sink.pyramid is None and factors:
                    # overviews of the values, built before the colour table: with one, GDAL averages a
                    # paletted band in RGB and maps back to the nearest entry (8x slower, and a
                    # confidence overview would not be the mean confidence)
                    dst.build_overviews(factors, Resampling[resampling.lower()])
                if colormap is not None:
                    dst.write_colormap(1, colormap)
            source = stage
            if sink.pyramid is not None:
                sink.pyramid.close()
                source = _with_overviews(stage, sink.pyramid.paths, vrt)
            rasterio.shutil.copy(
                source,
                tmp,
                driver="COG",
                COMPRESS="DEFLATE",
                PREDICTOR=predictor,
                BLOCKSIZE=str(BLOCK),
                OVERVIEWS="FORCE_USE_EXISTING",
                NUM_THREADS=str(threads),
                BIGTIFF="IF_SAFER",
            )
        finally:
            if pyramid is not None:
                pyramid.unlink()
            vrt.unlink(missing_ok=True)
            stage.unlink(missing_ok=True)


def overview_factors(width: int, height: int, block: int = BLOCK) -> list[int]:
    """Decimation factors 2, 4, ... until a level fits one block (the COG driver's own default)."""
    out, f = [], 2
    while math.ceil(max(width, height) / (f // 2)) > block:
        out.append(f)
        f *= 2
    return out


def class_colormap(classes: Sequence[ClassDef]) -> dict[int, tuple[int, int, int, int]]:
    """Nomenclature colours as a GDAL colour table; 0 (no-data) transparent."""
    cmap = {0: (0, 0, 0, 0)}
    cmap.update({c.code: (*c.rgb, 255) for c in classes})
    return cmap


def class_tags(classes: Sequence[ClassDef]) -> tuple[dict[str, str], dict[str, str]]:
    """Dataset and band metadata naming every class code."""
    table = [{"code": c.code, "name": c.name, "label": c.label, "colour": c.colour} for c in classes]
    band = {f"CLASS_{c.code}": f"{c.name}: {c.label}" for c in classes}
    return {"CLASSES": json.dumps(table), "NODATA_MEANING": "0 = no data / not classified"}, band


@contextlib.contextmanager
def class_map_writer(
    out: str | os.PathLike[str],
    grid: Grid,
    classes: Sequence[ClassDef],
    *,
    extra_tags: dict[str, str] | None = None,
    threads: int = 1,
    stream_overviews: bool = False,
) -> Iterator[RasterSink]:
    """A class-map COG (uint8, or uint16 for codes above 255; nodata 0, colour table, class names,
    MODE overviews) fed by windows."""
    tags, band = class_tags(classes)
    with cog_writer(
        out,
        grid,
        map_dtype([c.code for c in classes]).name,
        nodata=0,
        resampling="MODE",
        colormap=class_colormap(classes),
        tags=tags | (extra_tags or {}),
        band_tags=band,
        description="land cover class",
        threads=threads,
        stream_overviews=stream_overviews,
    ) as sink:
        yield sink


CONFIDENCE_NODATA = 255


def confidence_colormap() -> dict[int, tuple[int, int, int, int]]:
    """0-100 from red (hesitant) through yellow to green (sure); 255 (no data) transparent."""
    cmap = {}
    for v in range(101):
        f = v / 100
        r, g = (255, int(510 * f)) if f < 0.5 else (int(510 * (1 - f)), 255)
        cmap[v] = (r, g, 0, 255)
    return cmap | {CONFIDENCE_NODATA: (0, 0, 0, 0)}


@contextlib.contextmanager
def percent_writer(
    out: str | os.PathLike[str],
    grid: Grid,
    meaning: str,
    *,
    description: str | None = None,
    colormap: dict[int, tuple[int, int, int, int]] | None = None,
    band_descriptions: Sequence[str] | None = None,
    extra_tags: dict[str, str] | None = None,
    threads: int = 1,
    stream_overviews: bool = False,
) -> Iterator[RasterSink]:
    """A COG of percentages (uint8 0-100, nodata 255, AVERAGE overviews): the confidence, margin
    and probability layers; one band, or one per ``band_descriptions`` entry."""
    with cog_writer(
        out,
        grid,
        "uint8",
        nodata=CONFIDENCE_NODATA,
        resampling="AVERAGE",
        colormap=colormap,
        tags={"MEANING": meaning} | (extra_tags or {}),
        description=description,
        band_descriptions=band_descriptions,
        count=len(band_descriptions) if band_descriptions else 1,
        threads=threads,
        stream_overviews=stream_overviews,
    ) as sink:
        yield sink


def confidence_writer(
    out: str | os.PathLike[str],
    grid: Grid,
    *,
    extra_tags: dict[str, str] | None = None,
    threads: int = 1,
    stream_overviews: bool = False,
) -> contextlib.AbstractContextManager[RasterSink]:
    """A confidence COG: the winning class's probability in % (uint8 0-100, nodata 255), AVERAGE overviews."""
    return percent_writer(
        out,
        grid,
        "probability of the mapped class, percent (max softmax / tree vote share)",
        description="confidence (%)",
        colormap=confidence_colormap(),
        extra_tags=extra_tags,
        threads=threads,
        stream_overviews=stream_overviews,
    )


def probability_writer(
    out: str | os.PathLike[str],
    grid: Grid,
    classes: Sequence[ClassDef],
    *,
    extra_tags: dict[str, str] | None = None,
    threads: int = 1,
) -> contextlib.AbstractContextManager[RasterSink]:
    """Per-class probabilities in % (uint8 0-100, nodata 255), one band per class in the
    nomenclature's order (band descriptions: code and name), AVERAGE overviews."""
    return percent_writer(
        out,
        grid,
        "probability of each class, percent (band = class)",
        band_descriptions=[f"{c.code} {c.name}" for c in classes],
        extra_tags=extra_tags,
        threads=threads,
    )


def margin_writer(
    out: str | os.PathLike[str],
    grid: Grid,
    *,
    extra_tags: dict[str, str] | None = None,
    threads: int = 1,
    stream_overviews: bool = False,
) -> contextlib.AbstractContextManager[RasterSink]:
    """The uncertainty layer: margin between the two most probable classes in % (uint8 0-100,
    nodata 255; 0 = a tie, the most uncertain), red-to-green like the confidence."""
    return percent_writer(
        out,
        grid,
        "margin between the two most probable classes, percent (0 = tie)",
        description="margin of the two most probable classes (%)",
        colormap=confidence_colormap(),
        extra_tags=extra_tags,
        threads=threads,
        stream_overviews=stream_overviews,
    )


def margin_layers(proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, H, W) probabilities (NaN = no data) -> their uint8 % layers and the top-two margin (%)."""
    empty = np.isnan(proba[0])
    pct = np.where(np.isnan(proba), CONFIDENCE_NODATA, np.rint(np.nan_to_num(proba) * 100)).astype(np.uint8)
    if proba.shape[0] > 1:
        top2 = -np.partition(-np.nan_to_num(proba), 1, axis=0)[:2]
        margin = np.rint((top2[0] - top2[1]) * 100)
    else:
        margin = np.full(empty.shape, 100.0)
    return pct, np.where(empty, CONFIDENCE_NODATA, margin).astype(np.uint8)


def write_class_map(
    out: str | os.PathLike[str],
    grid: Grid,
    classes: Sequence[ClassDef],
    labels: np.ndarray,
    *,
    extra_tags: dict[str, str] | None = None,
    threads: int = 1,
) -> None:
    """Write an in-memory class map (tests, small maps); tiles go through :func:`class_map_writer`."""
    if labels.shape != (grid.height, grid.width):
        raise ValueError(f"labels shape {labels.shape} does not match the grid {grid.height}x{grid.width}")
    dtype = map_dtype([c.code for c in classes])
    with class_map_writer(out, grid, classes, extra_tags=extra_tags, threads=threads) as sink:
        for win in iter_windows(grid.height, grid.width, BLOCK):
            sink.write(win, labels[win_slices(win)].astype(dtype))


def write_validity(gapfilled: Path, out: Path) -> None:
    """The store's clear-observation count as a uint16 COG, AVERAGE overviews.

    No nodata value: 0 is a meaningful count (never observed clear), users must see it.
    """
    group = open_store(gapfilled, "gapfilled", ("clear_count",))
    grid = store_grid(group)
    counts = group["clear_count"]
    n_dates = len(group.attrs.get("dates", []))
    with cog_writer(
        out,
        grid,
        "uint16",
        nodata=None,
        resampling="AVERAGE",
        tags={"TILE": str(group.attrs.get("tile", "")), "DATES": str(n_dates), "SOURCE": str(gapfilled)},
        description="clear observations per pixel",
        predictor="STANDARD",
        threads=min(4, len(os.sched_getaffinity(0))),
    ) as sink:
        wins = list(iter_windows(grid.height, grid.width, SHARD))
        for win in tqdm(wins, desc=f"validity {group.attrs.get('tile', '')}", unit="win", leave=False):
            sink.write(win, np.asarray(counts[win_slices(win)]).astype(np.uint16))
