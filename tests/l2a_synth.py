"""Synthetic L2A series written with the project's own writers (shared by test_l2a_* and test_ingest)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from pipeline.io.l2a import NODATA, Acquisition, WindowMasks, open_writer
from pipeline.io.tilestore import Grid, iter_windows


@dataclass
class Series:
    r10: np.ndarray  # (T, 4, H, W) int16 as handed to the writer
    r20: np.ndarray  # (T, 6, H/2, W/2)
    masks: list[dict[str, np.ndarray]]  # per date, full-size 10 m bool masks
    paths: list[Path]


def make_masks(h: int, w: int, t: int) -> dict[str, np.ndarray]:
    """Blocks of each flag at known places, plus one lone 10 m cloud pixel (odd position)."""
    z = np.zeros((h, w), bool)
    m = {k: z.copy() for k in ("cloud", "shadow", "saturated", "edge", "snow", "water")}
    m["cloud"][10:20, 10:30] = True
    m["cloud"][41:42, 51:52] = True
    m["shadow"][22:28, 10:30] = True
    m["saturated"][60:62, 60:64] = True
    m["edge"][:, w - 6 :] = t % 2 == 1  # edge strip on odd dates only
    m["snow"][70:80, 0:10] = True
    m["water"][70:80, 20:30] = True
    m["snow"][12:14, 12:14] = True  # under a cloud: cloud wins in SCL
    return m


def write_series(
    root: Path,
    fmt: str,
    grid: Grid,
    days: list[int],
    tile: str = "T31TCJ",
    win: int = 32,
    seed: int = 0,
    **options: object,
) -> Series:
    """Write one product per day of May 2019 window by window; returns what went in."""
    rng = np.random.default_rng(seed)
    h, w = grid.height, grid.width
    y, x = np.mgrid[0:h, 0:w]
    r10s, r20s, masks, paths = [], [], [], []
    for t, day in enumerate(days):
        base = 1500 + 800 * np.sin(x / 7.0 + t) * np.cos(y / 9.0)
        r10 = np.stack([base + 100 * k + rng.integers(-50, 50, (h, w)) for k in range(4)]).astype(np.int16)
        b20 = base[::2, ::2]
        r20 = np.stack([b20 + 200 * k + rng.integers(-50, 50, b20.shape) for k in range(6)]).astype(np.int16)
        r10[0, 3, 5] = NODATA  # a lone nodata 10 m pixel
        m = make_masks(h, w, t)
        acq = Acquisition(tile, datetime(2019, 5, day, 10, 50, 39, 24000, tzinfo=UTC), "SENTINEL2A", 51, grid)
        with open_writer(fmt, root, acq, **options) as wr:
            for wdw in iter_windows(h, w, win):
                ys = slice(wdw.row_off, wdw.row_off + wdw.height)
                xs = slice(wdw.col_off, wdw.col_off + wdw.width)
                ys2 = slice(wdw.row_off // 2, (wdw.row_off + wdw.height) // 2)
                xs2 = slice(wdw.col_off // 2, (wdw.col_off + wdw.width) // 2)
                wr.write(
                    wdw, r10[:, ys, xs], r20[:, ys2, xs2], WindowMasks(**{k: v[ys, xs] for k, v in m.items()})
                )
            paths.append(root / getattr(wr, "id", getattr(wr, "uri", "")))
        r10s.append(r10)
        r20s.append(r20)
        masks.append(m)
    return Series(np.stack(r10s), np.stack(r20s), masks, paths)


def up2(m: np.ndarray) -> np.ndarray:
    """Nearest 2x upsampling (20 m -> 10 m)."""
    return np.repeat(np.repeat(m, 2, axis=-2), 2, axis=-1)


def any2(m: np.ndarray) -> np.ndarray:
    h, w = m.shape
    return m.reshape(h // 2, 2, w // 2, 2).any(axis=(1, 3))
