"""What the report needs from the rasters, in bounded memory whatever the tile size.

Pictures come from *decimated* reads (``out_shape``): GDAL serves them from the COGs' overviews, so
a 10980-px tile costs a few hundred kB. Exact figures (class areas, confidence and clear-observation
counts) come from value counts accumulated over 512-px windows. Crops are single small windows. No
function here ever holds a full-resolution tile.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window
from scipy import ndimage

from pipeline.errors import PipelineError
from pipeline.io.tilestore import SHARD, iter_windows

QUICKLOOK = 800  # px, longest side of a quicklook


def _open(path: str | os.PathLike[str]) -> rasterio.io.DatasetReader:
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise PipelineError(path, f"cannot open the raster ({exc})") from exc


@dataclass(frozen=True)
class Counts:
    """How many pixels hold each value of a one-band integer raster, and the area of one pixel."""

    counts: np.ndarray  # counts[v] = pixels of value v (nodata included: callers know its value)
    pixel_area_m2: float

    def hectares(self, values: Sequence[int]) -> np.ndarray:
        c = np.zeros(len(values), dtype=np.float64)
        for i, v in enumerate(values):
            c[i] = self.counts[v] if v < len(self.counts) else 0
        return c * self.pixel_area_m2 / 1e4


def pixel_area_m2(src: rasterio.io.DatasetReader) -> float:
    """Area of one pixel in m², from the raster's own transform and CRS units (never assumed)."""
    if src.crs is None or not src.crs.is_projected:
        raise PipelineError(src.name, f"areas need a projected CRS, this raster has {src.crs}")
    _, metres_per_unit = src.crs.linear_units_factor
    return abs(src.transform.a * src.transform.e - src.transform.b * src.transform.d) * metres_per_unit**2


def value_counts(path: str | os.PathLike[str]) -> Counts:
    """Windowed value counts of band 1 (uint8/uint16 rasters: class maps, confidence, clear counts)."""
    with _open(path) as src:
        if src.dtypes[0] not in ("uint8", "uint16"):
            raise PipelineError(path, f"expected a uint8 or uint16 raster, found {src.dtypes[0]}")
        counts = np.zeros(256, dtype=np.int64)
        for win in iter_windows(src.height, src.width, SHARD):
            c = np.bincount(src.read(1, window=win).ravel())
            if len(c) > len(counts):
                counts = np.pad(counts, (0, len(c) - len(counts)))
            counts[: len(c)] += c
        return Counts(counts, pixel_area_m2(src))


def low_confidence_share(counts: np.ndarray, threshold: float) -> dict[str, float | None]:
    """Share of mapped pixels whose confidence (0-100 %) is below ``threshold``, and the mean confidence.

    ``counts`` are value counts of a confidence layer; values above 100 (nodata 255) are not mapped.
    """
    valid = np.asarray(counts[:101], dtype=np.float64)
    n = valid.sum()
    if n == 0:
        return {"low_share": None, "mean": None, "pixels": 0}
    low = valid[: int(math.ceil(threshold))].sum()
    return {
        "low_share": float(low / n),
        "mean": float((valid * np.arange(len(valid))).sum() / n),
        "pixels": int(n),
    }


def clear_summary(counts: np.ndarray) -> dict[str, float | int]:
    """Clear-observation statistics from the validity layer's value counts (value = clear dates)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum()
    if n == 0:
        return {"pixels": 0, "zero_share": 0.0, "mean": 0.0, "max": 0}
    return {
        "pixels": int(n),
        "zero_share": float(counts[0] / n),
        "mean": float((counts * np.arange(len(counts))).sum() / n),
        "max": int(np.flatnonzero(counts)[-1]),
    }


def decimation(height: int, width: int, max_side: int = QUICKLOOK) -> int:
    """Integer factor bringing the longest side to ``max_side`` px or less (1: full resolution)."""
    return max(1, math.ceil(max(height, width) / max_side))


def quicklook(path: str | os.PathLike[str], factor: int | None = None) -> np.ndarray:
    """Band 1 decimated by ``factor`` (default: to :data:`QUICKLOOK` px) with nearest sampling, which
    GDAL takes from the nearest overview (MODE overviews for class maps: no invented classes)."""
    with _open(path) as src:
        f = factor or decimation(src.height, src.width)
        shape = (math.ceil(src.height / f), math.ceil(src.width / f))
        return src.read(1, out_shape=shape, resampling=Resampling.nearest)


def read_crop(path: str | os.PathLike[str], row: int, col: int, size: int) -> np.ndarray:
    """One full-resolution ``size`` x ``size`` window (clipped to the raster)."""
    with _open(path) as src:
        win = Window(col, row, min(size, src.width - col), min(size, src.height - row))
        return src.read(1, window=win)


def disagreement(maps: Sequence[np.ndarray]) -> np.ndarray:
    """Per pixel, the share of classifier pairs whose classes differ (0 where a map has no class)."""
    stack = np.stack(maps)
    valid = (stack > 0).all(axis=0)
    n = len(maps)
    if n < 2:
        return np.zeros(stack.shape[1:], dtype=np.float32)
    differ = sum((stack[i] != stack[j]).astype(np.float32) for i in range(n) for j in range(i + 1, n))
    return np.where(valid, differ / (n * (n - 1) / 2), 0).astype(np.float32)


def edge_density(labels: np.ndarray) -> np.ndarray:
    """1 where a pixel's right or lower neighbour has another class (0 on no-data): detailed places."""
    e = np.zeros(labels.shape, dtype=np.float32)
    e[:, :-1] += labels[:, :-1] != labels[:, 1:]
    e[:-1, :] += labels[:-1, :] != labels[1:, :]
    return np.where(labels > 0, np.minimum(e, 1), 0).astype(np.float32)


def pick_places(score: np.ndarray, block: int, count: int) -> list[tuple[int, int]]:
    """Top-left (row, col) of up to ``count`` non-overlapping ``block``-px squares of highest mean
    score, greedily (the best first, then the best not overlapping it, ...)."""
    h, w = score.shape
    block = max(1, min(block, h, w))
    mean = ndimage.uniform_filter(score.astype(np.float64), size=block, mode="constant")
    # mean[r, c] is centred; shift to top-left corners that keep the square inside the image
    half = block // 2
    tl = mean[half : h - block + half + 1, half : w - block + half + 1]
    taken = np.zeros(tl.shape, dtype=bool)
    places: list[tuple[int, int]] = []
    for _ in range(count):
        cand = np.where(taken, -np.inf, tl)
        r, c = np.unravel_index(int(np.argmax(cand)), cand.shape)
        if not np.isfinite(cand[r, c]) or cand[r, c] <= 0:
            break
        places.append((int(r), int(c)))
        taken[max(0, r - block + 1) : r + block, max(0, c - block + 1) : c + block] = True
    return places


def disagreement_places(
    looks: Sequence[np.ndarray], factor: int, shape: tuple[int, int], size: int, count: int
) -> tuple[list[tuple[int, int]], float]:
    """Where to cut ``count`` full-resolution ``size``-px extracts: the places where the maps disagree
    most, found on their quicklooks (decimated by ``factor`` from a ``shape`` tile); the edge density
    of the maps breaks ties, so one map alone still gets its most detailed places. Returns the
    extracts' top-left (row, col) at full resolution and the share of mapped pixels where the maps
    disagree (on the quicklooks)."""
    height, width = shape
    dis = disagreement(looks)
    score = dis + 0.01 * np.mean([edge_density(m) for m in looks], axis=0)
    valid = np.stack(looks).all(axis=0)
    share = float(np.count_nonzero(dis[valid]) / valid.sum()) if valid.any() else 0.0
    size = min(size, height, width)
    places = pick_places(score, max(1, size // factor), count)
    return [(min(r * factor, height - size), min(c * factor, width - size)) for r, c in places], share
