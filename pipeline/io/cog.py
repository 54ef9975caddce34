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
import math
import os
import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.windows import Window
from tqdm import tqdm

from pipeline.config import ClassDef, map_dtype
from pipeline.io.atomic import atomic_path
from pipeline.io.tilestore import SHARD, Grid, iter_windows, open_store, store_grid, win_slices

BLOCK = 512


@dataclass
class RasterSink:
    """An open staging GTiff: ``write(window, array)`` places one finished window."""

    dataset: rasterio.io.DatasetWriter

    def write(self, window: Window, array: np.ndarray) -> None:
        self.dataset.write(array, 1, window=window)


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
    in the caller or in any writer discards every output (each writer's atomic rename never runs)
    and is raised here. Memory: at most ``depth`` windows per writer wait in its queue."""
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
) -> Iterator[RasterSink]:
    """Yield a sink for one-band windows; on success turn the staging file into a COG at ``out``."""
    with atomic_path(out) as tmp:
        stage = tmp.with_name(tmp.stem + ".stage.tif")
        # staging only: zstd 1 is fast and keeps a full tile's staging file small
        profile = grid.gtiff_profile(dtype, nodata, BLOCK, compress="zstd", zstd_level=1, bigtiff="if_safer")
        try:
            with rasterio.open(stage, "w", **profile) as dst:
                if tags:
                    dst.update_tags(**tags)
                if band_tags:
                    dst.update_tags(1, **band_tags)
                if description:
                    dst.set_band_description(1, description)
                yield RasterSink(dst)
                # overviews of the values, built before the colour table: with one, GDAL averages a
                # paletted band in RGB and maps back to the nearest entry (8x slower, and a
                # confidence overview would not be the mean confidence)
                if factors := overview_factors(grid.width, grid.height):
                    dst.build_overviews(factors, Resampling[resampling.lower()])
                if colormap is not None:
                    dst.write_colormap(1, colormap)
            rasterio.shutil.copy(
                stage,
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
def confidence_writer(
    out: str | os.PathLike[str],
    grid: Grid,
    *,
    extra_tags: dict[str, str] | None = None,
    threads: int = 1,
) -> Iterator[RasterSink]:
    """A confidence COG: the winning class's probability in % (uint8 0-100, nodata 255), AVERAGE overviews."""
    with cog_writer(
        out,
        grid,
        "uint8",
        nodata=CONFIDENCE_NODATA,
        resampling="AVERAGE",
        colormap=confidence_colormap(),
        tags={"MEANING": "probability of the mapped class, percent (max softmax / tree vote share)"}
        | (extra_tags or {}),
        description="confidence (%)",
        threads=threads,
    ) as sink:
        yield sink


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
