"""Synthetic L2A series written with the project's own writers (shared by test_l2a_* and test_ingest)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from rasterio.windows import Window

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


# ------------------------------------------------------------------------- real WorldCereal patch

WORLDCEREAL = "worldcereal_0000280849BAC91C"


def read_worldcereal(real: Path, dates: int | None = None) -> dict:
    """The real WorldCereal S2 patch (64 x 64 px, 72 dates) as arrays: DN, SCL, grid and dates;
    ``dates`` of them evenly spread, or all. Read with h5py, independently of xarray and of the
    chain's cube reader."""
    import h5py
    from affine import Affine
    from rasterio.crs import CRS

    folder = real / WORLDCEREAL
    f10 = folder / "S2_L2A_10m_0000280849BAC91C_32631_2018-08-01_2019-11-30.nc"
    f20 = folder / "S2_L2A_20m_0000280849BAC91C_32631_2018-08-01_2019-11-30.nc"
    with h5py.File(f10) as h10, h5py.File(f20) as h20:
        x, y = h10["x"][:], h10["y"][:]
        x20, y20 = h20["x"][:], h20["y"][:]
        ts = h10["timestamp"][:]
        units = h10["timestamp"].attrs["units"]
        units = units.decode() if isinstance(units, bytes) else units
        wkt = h10["spatial_ref"].attrs["crs_wkt"]
        wkt = wkt.decode() if isinstance(wkt, bytes) else wkt
        sel = np.arange(len(ts)) if dates is None else np.linspace(0, len(ts) - 1, dates).astype(int)
        r10 = np.stack([h10[b][sel] for b in ("B02", "B03", "B04", "B08")], axis=1)
        r20 = np.stack([h20[b][sel] for b in ("B05", "B06", "B07", "B8A", "B11", "B12")], axis=1)
        scl = h20["SCL"][sel]
        assert (h20["timestamp"][:] == ts).all()
    epoch = datetime.fromisoformat(units.removeprefix("seconds since ")).replace(tzinfo=UTC)
    # pixel-centre coordinates -> upper-left corner of the 10 m grid; the 20 m grid must share it
    t10 = Affine(10, 0, x[0] - 5, 0, -10, y[0] + 5)
    assert (x20[0] - 10, y20[0] + 10) == (t10.c, t10.f)
    return {
        "folder": folder,
        "grid": Grid(CRS.from_wkt(wkt), t10, len(x), len(y)),
        "dates": [epoch + timedelta(seconds=int(s)) for s in ts[sel]],
        "r10": r10,
        "r20": r20,
        "scl": scl,
    }


def write_worldcereal_products(src: Path, fmt: str, wc: dict, tile: str = "T31UES") -> None:
    """The patch in a product layout, by hand: DN 0 -> no data, SCL -> the format's masks (cloud
    8-10, shadow 3, saturated 1, edge 0, snow 11, water 6), written in two windows, bottom first."""
    r10 = np.where(wc["r10"] == 0, NODATA, wc["r10"]).astype(np.int16)
    r20 = np.where(wc["r20"] == 0, NODATA, wc["r20"]).astype(np.int16)
    scl10 = up2(wc["scl"])
    for t, when in enumerate(wc["dates"]):
        s = scl10[t]
        masks = {"cloud": np.isin(s, (8, 9, 10)), "shadow": s == 3, "saturated": s == 1, "edge": s == 0,
                 "snow": s == 11, "water": s == 6}  # fmt: skip
        acq = Acquisition(tile, when, "SENTINEL2A", 51, wc["grid"])
        with open_writer(fmt, src, acq) as wr:
            for r0 in (0, 32):
                ys, ys2 = slice(32 - r0, 64 - r0), slice((32 - r0) // 2, (64 - r0) // 2)
                wr.write(Window(0, 32 - r0, 64, 32), r10[t][:, ys], r20[t][:, ys2],
                         WindowMasks(**{k: m[ys] for k, m in masks.items()}))  # fmt: skip
