"""Exact per-channel percentiles from int16 histograms, and the normalisation of seed eq. 2.

Each tile's gapfilled cube is reduced to one exact histogram per channel (channel ``t * C + c``: the
order of reshaping (T, C) to T*C features). Histograms add up across tiles, so the run-wide 3rd/97th
percentiles are computed without ever holding all the pixels, and are *exactly* those
``np.percentile(values.astype(np.float64), q)`` (default 'linear' method) would give on the
concatenation of every tile's valid pixels.

Histogram file (``.npz``, compressed): ``counts`` int64 (K, B) over the values
``offset .. offset + B - 1`` (the 65536 int16 bins trimmed to the range that occurs in the tile),
``offset`` int64, ``channels`` / ``dates`` / ``bands`` / ``tile`` str, ``n_pixels`` int64 (pixels
with at least one clear observation). No-data pixels (``clear_count == 0``) are excluded, and so is
any value equal to NODATA.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit, prange

from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path, write_json
from pipeline.io.tilestore import for_each_window, open_store
from pipeline.parallel import window_executor

NODATA = -10000
_BINS = 65536
_SHIFT = 32768  # int16 value v lives in bin v + 32768


def channel_names(dates: list[str], bands: list[str]) -> list[str]:
    """Feature names in t-major order: ``"2018-01-05/B2"``, ..."""
    return [f"{d}/{b}" for d in dates for b in bands]


def tile_histogram(src: Path, out: Path, threads: int = 1, dask: Mapping[str, Any] | None = None) -> None:
    """Exact per-channel histograms of one gapfilled store, written atomically to ``out`` (.npz)."""
    src = Path(src)
    group = open_store(src, "gapfilled", ("reflectance", "clear_count"))
    refl, count = group["reflectance"], group["clear_count"]
    t, c, h, w = refl.shape
    dates = [str(d) for d in group.attrs["dates"]]
    bands = [str(b) for b in group.attrs["bands"]]
    if (len(dates), len(bands)) != (t, c):
        raise PipelineError(src, f"{len(dates)} dates x {len(bands)} bands for a cube of shape {refl.shape}")
    k = t * c
    hist = np.zeros((k, _BINS), dtype=np.int64)
    n_pixels = [0]

    def one(win) -> tuple[int, list[tuple[np.ndarray, np.ndarray]]] | None:
        # self-contained (may run on a dask worker): returns each channel's non-zero bins
        rs = slice(win.row_off, win.row_off + win.height)
        cs = slice(win.col_off, win.col_off + win.width)
        keep = np.asarray(count[rs, cs]).ravel() > 0
        if not keep.any():
            return None
        vals = np.asarray(refl[:, :, rs, cs]).reshape(k, -1)
        if not keep.all():
            vals = vals[:, keep]
        # int16 -> offset binary in uint16: bincount casts it to intp without a sign fix-up pass
        u = vals.view(np.uint16) ^ np.uint16(0x8000)
        sparse = []
        for i in range(k):
            counts = np.bincount(u[i], minlength=_BINS)
            nz = np.flatnonzero(counts).astype(np.uint16)
            sparse.append((nz, counts[nz].astype(np.uint32)))
        return int(keep.sum()), sparse

    def merge(result) -> None:
        if result is None:
            return
        n, sparse = result
        for i, (nz, counts) in enumerate(sparse):
            hist[i, nz] += counts
        n_pixels[0] += n

    with window_executor(dask, threads) as pool:
        for_each_window(one, h, w, threads, f"histogram {src.stem}", executor=pool, on_result=merge)
    hist[:, NODATA + _SHIFT] = 0
    used = np.flatnonzero(hist.any(axis=0))
    lo, hi = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 0)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f,
            counts=hist[:, lo:hi],
            offset=np.int64(lo - _SHIFT),
            channels=np.array(channel_names(dates, bands)),
            dates=np.array(dates),
            bands=np.array(bands),
            tile=np.array(str(group.attrs.get("tile", src.stem))),
            n_pixels=np.int64(n_pixels[0]),
        )


@dataclass
class _Hist:
    counts: np.ndarray
    offset: int
    channels: list[str]
    dates: list[str]
    bands: list[str]
    tile: str
    n_pixels: int


def _load_hist(path: Path) -> _Hist:
    try:
        with np.load(path, allow_pickle=False) as z:
            h = _Hist(
                counts=z["counts"].astype(np.int64, copy=False),
                offset=int(z["offset"]),
                channels=[str(x) for x in z["channels"]],
                dates=[str(x) for x in z["dates"]],
                bands=[str(x) for x in z["bands"]],
                tile=str(z["tile"]),
                n_pixels=int(z["n_pixels"]),
            )
    except (OSError, KeyError, ValueError) as exc:
        raise PipelineError(path, f"not a readable histogram file ({type(exc).__name__}: {exc})") from exc
    if h.counts.ndim != 2 or h.counts.shape[0] != len(h.channels) or (h.counts < 0).any():
        raise PipelineError(path, f"counts of shape {h.counts.shape} for {len(h.channels)} channels")
    return h


def percentile_from_counts(counts: np.ndarray, offset: int, q: float) -> float:
    """``np.percentile(values.astype(float64), q)`` for the values a 1-D histogram counts.

    Same arithmetic as numpy's 'linear' method: virtual index ``(n - 1) * (q / 100)``, its floor and
    the next order statistic, and numpy's ``_lerp`` (which interpolates from the upper neighbour when
    the fraction is >= 0.5), so the float64 result is bit-identical.
    """
    cum = np.cumsum(counts)
    n = int(cum[-1]) if cum.size else 0
    if n == 0:
        raise ValueError("no values")
    vidx = (n - 1) * float(np.true_divide(q, 100))
    if vidx >= n - 1:
        lo_rank = hi_rank = n - 1
        gamma = vidx - (n - 1)
    else:
        lo_rank = int(np.floor(vidx))
        hi_rank = lo_rank + 1
        gamma = vidx - lo_rank
    # order statistic of rank r = smallest bin whose cumulative count exceeds r
    a = float(np.searchsorted(cum, lo_rank, side="right") + offset)
    b = float(np.searchsorted(cum, hi_rank, side="right") + offset)
    diff = b - a
    return b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma


def merge_percentiles(hists: list[Path], low: float, high: float, out: Path) -> None:
    """Sum tile histograms and write the run-wide per-channel percentiles as JSON (atomically)."""
    if not hists:
        raise PipelineError(None, "no histogram files to merge")
    if not (0 <= low <= 100 and 0 <= high <= 100):
        raise PipelineError(None, f"percentiles must be in [0, 100], got {low} and {high}")
    first = _load_hist(Path(hists[0]))
    ref = (first.channels, first.dates, first.bands)
    lo, hi = first.offset, first.offset + first.counts.shape[1]
    loaded = [(Path(hists[0]), first)]
    for path in hists[1:]:
        h = _load_hist(Path(path))
        mine = (h.channels, h.dates, h.bands)
        for what, a, b in zip(("channels", "dates", "bands"), mine, ref, strict=True):
            if a != b:
                raise PipelineError(path, f"{what} differ from those of {hists[0]} ({len(a)} vs {len(b)})")
        if h.counts.shape[1]:
            lo, hi = min(lo, h.offset), max(hi, h.offset + h.counts.shape[1])
        loaded.append((Path(path), h))
    total = np.zeros((len(first.channels), max(0, hi - lo)), dtype=np.int64)
    for _, h in loaded:
        if h.counts.shape[1]:
            total[:, h.offset - lo : h.offset - lo + h.counts.shape[1]] += h.counts
    lows, highs = [], []
    for i, name in enumerate(first.channels):
        if total.shape[1] == 0 or not total[i].any():
            raise PipelineError(hists[0], f"channel {name} has no valid pixel in any tile")
        lows.append(percentile_from_counts(total[i], lo, low))
        highs.append(percentile_from_counts(total[i], lo, high))
    write_json(
        out,
        {
            "low_percentile": low,
            "high_percentile": high,
            "bands": first.bands,
            "dates": first.dates,
            "channels": first.channels,
            "low": lows,
            "high": highs,
            "n_pixels": sum(h.n_pixels for _, h in loaded),
            "tiles": [h.tile for _, h in loaded],
        },
    )


@dataclass(frozen=True)
class Percentiles:
    """Per-channel low/high percentiles and the eq. 2 normalisation ``clip((x - low) / (high - low), 0, 1)``.

    Channels are t-major (``t * C + c``). No-data (``x == NODATA``) comes out as 0.0: callers that
    must tell it from a real low value mask pixels with ``clear_count == 0`` themselves (a gapfilled
    pixel is either no-data on every channel or on none). A channel with ``high == low`` maps to 0.
    """

    low: np.ndarray  # (K,) float32
    high: np.ndarray  # (K,) float32
    channels: tuple[str, ...]
    dates: tuple[str, ...]
    bands: tuple[str, ...]
    low_percentile: float
    high_percentile: float

    @classmethod
    def load(cls, path: str | Path) -> Percentiles:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            p = cls(
                low=np.asarray(d["low"], dtype=np.float32),
                high=np.asarray(d["high"], dtype=np.float32),
                channels=tuple(d["channels"]),
                dates=tuple(d["dates"]),
                bands=tuple(d["bands"]),
                low_percentile=float(d["low_percentile"]),
                high_percentile=float(d["high_percentile"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            problem = f"not a readable percentiles file ({type(exc).__name__}: {exc})"
            raise PipelineError(path, problem) from exc
        if not (p.low.shape == p.high.shape == (len(p.channels),) == (len(p.dates) * len(p.bands),)):
            raise PipelineError(path, "low/high/channels/dates/bands lengths disagree")
        return p

    @property
    def n_channels(self) -> int:
        return len(self.channels)

    def normalise_features(self, x: np.ndarray) -> np.ndarray:
        """``x`` (..., K) with features last (e.g. (N, T*C) samples) -> float32 in [0, 1]."""
        x = np.asarray(x)
        if x.shape[-1:] != (self.n_channels,):
            raise ValueError(f"expected {self.n_channels} features last, got shape {x.shape}")
        return self._apply(x, self.low, self.high)

    def normalise_cube(self, x: np.ndarray) -> np.ndarray:
        """``x`` (..., T, C, h, w) as stored in a gapfilled cube -> float32 (..., T*C, h, w) in [0, 1]."""
        x = np.asarray(x)
        t, c = len(self.dates), len(self.bands)
        if x.ndim < 4 or x.shape[-4:-2] != (t, c):
            raise ValueError(f"expected (..., {t}, {c}, h, w), got shape {x.shape}")
        x = x.reshape(*x.shape[:-4], t * c, *x.shape[-2:])
        return self._apply(x, self.low[:, None, None], self.high[:, None, None])

    @staticmethod
    def _apply(x: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        """One compiled pass on numba's threads (what the caller set; predict sets the job's
        allocation): same float32 operations as ``clip((x - low) * (1 / (high - low)), 0, 1)``, so
        bit-identical to the numpy expression; half the time of numpy's passes inside predict_tile."""
        low = np.ascontiguousarray(low, np.float32).ravel()
        rng = np.ascontiguousarray(high, np.float32).ravel() - low
        scale = np.divide(1, rng, out=np.zeros_like(rng), where=rng > 0)  # high == low -> 0
        y = np.empty(x.shape, np.float32)
        if y.size == 0:
            return y
        if np.ndim(high) == 1:  # features last: (..., K)
            k = low.size
            _normalise_rows(np.ascontiguousarray(x).reshape(-1, k), low, scale, y.reshape(-1, k))
        else:  # channels before the (h, w) plane: (..., K, h, w)
            k, plane = low.size, x.shape[-1] * x.shape[-2]
            _normalise_planes(np.ascontiguousarray(x).reshape(-1, plane), low, scale, y.reshape(-1, plane), k)
        return y


@njit(inline="always", cache=True)
def _eq2(v, lo, sc):  # pragma: no cover - compiled
    """Eq. 2 for one value, float32 throughout; no-data -> 0."""
    y = (np.float32(v) - lo) * sc
    return np.float32(0) if v == NODATA else min(max(y, np.float32(0)), np.float32(1))


@njit(parallel=True, nogil=True, cache=True)
def _normalise_rows(x, low, scale, out):  # pragma: no cover - compiled
    for i in prange(x.shape[0]):
        for j in range(x.shape[1]):
            out[i, j] = _eq2(x[i, j], low[j], scale[j])


@njit(parallel=True, nogil=True, cache=True)
def _normalise_planes(x, low, scale, out, k):  # pragma: no cover - compiled
    for r in prange(x.shape[0]):
        lo, sc = low[r % k], scale[r % k]
        for j in range(x.shape[1]):
            out[r, j] = _eq2(x[r, j], lo, sc)
