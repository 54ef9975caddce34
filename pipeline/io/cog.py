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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

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
