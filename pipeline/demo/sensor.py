"""What the satellites see and when: orbits, swaths, per-tile date lists, clouds and their shadows.

Why this shape: an operational chain must cope with tiles whose date lists differ (two relative
orbits overlap on some tiles only, products go missing), with partial swaths (no-data edges),
with clouds that move between dates and leave some pixels never clear. Every quantity is a
function of world coordinates and of the *pass* (datatake), never of the tile, so neighbouring
tiles acquired by the same pass show the same clouds in their overlap strip.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pipeline.demo.landscape import Country, TileSpec
from pipeline.demo.noise import fbm, name_key, uniform

# (relative orbit, UTC time of the pass, swath side): orbit 51 sees the west, orbit 8 the east
ORBITS = ((51, dt.time(10, 50, 31), "west"), (8, dt.time(10, 40, 21), "east"))
REVISIT_DAYS = 10
_CLOUD, _SHADOW, _KEEP, _PASS, _THIN = (name_key(n) for n in ("cloud", "shadow", "keep", "pass", "thin"))
CLOUD_MASK_ALPHA = 0.3  # cloud opacity from which the L2A cloud mask flags a pixel


@dataclass(frozen=True)
class Pass:
    """One datatake: a date on one relative orbit by one platform, common to every tile it covers."""

    acquired: dt.datetime
    orbit: int
    platform: str
    side: str
    key: int
    cover: float  # cloudy share of the datatake

    @property
    def doy(self) -> float:
        return float(self.acquired.timetuple().tm_yday)


def passes(c: Country) -> tuple[Pass, ...]:
    """All datatakes of the year over the country, both orbits, 5 days apart, S2A/S2B alternating."""
    first = 1 + int(uniform(c.key, _PASS) * 5)
    out = []
    for i, (orbit, when, side) in enumerate(ORBITS):
        start = dt.date(c.year, 1, 1) + dt.timedelta(days=first - 1 + 5 * i)
        k = 0
        day = start
        while day.year == c.year:
            key = int(np.int64(uniform(c.key, _PASS, orbit, k) * 2**62))
            doy = day.timetuple().tm_yday
            season = 1.0 + 0.6 * np.cos(2 * np.pi * (doy - 15) / 365.0)  # cloudier winters
            cover = float(min(0.97, -c.cloud_cover * season * np.log(1.0 - uniform(key, 1))))
            platform = "SENTINEL2A" if (k + i) % 2 == 0 else "SENTINEL2B"
            acquired = dt.datetime.combine(day, when, tzinfo=dt.UTC)
            out.append(Pass(acquired, orbit, platform, side, key, cover))
            k += 1
            day += dt.timedelta(days=REVISIT_DAYS)
    return tuple(sorted(out, key=lambda p: p.acquired))


def in_swath(c: Country, p: Pass, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """Pixels (gy x gx) inside the pass's swath: a slanted edge, as orbit tracks are not north-south."""
    u = (gx + 0.5 - c.gx0) / c.width
    v = (gy + 0.5 - c.gy0) / c.height
    if p.side == "west":
        return u[None, :] < 0.78 + 0.08 * (v[:, None] - 0.5)
    return u[None, :] > 0.42 + 0.08 * (v[:, None] - 0.5)


def coverage(c: Country, tile: TileSpec, p: Pass) -> float:
    """Share of the tile inside the swath (sampled on a 64 x 64 lattice)."""
    t = tile.grid.transform
    r0, c0 = int(round(-t.f / 10)), int(round(t.c / 10))
    gy = r0 + np.linspace(0, tile.grid.height - 1, 64).astype(np.int64)
    gx = c0 + np.linspace(0, tile.grid.width - 1, 64).astype(np.int64)
    return float(in_swath(c, p, gy, gx).mean())


def tile_passes(c: Country, tile: TileSpec) -> list[Pass]:
    """The products delivered for a tile: ~75 % of full-swath passes, ~30 % of partial ones.

    Missing products (processing failures, fully cloudy scenes not distributed) are drawn per tile,
    so two tiles seen by the same orbit still end up with different date lists.
    """
    out = []
    tkey = name_key(tile.name)
    for p in passes(c):
        cov = coverage(c, tile, p)
        if cov <= 0.0 or p.cover >= 0.96:
            continue
        keep = 0.75 if cov > 0.98 else 0.3
        if uniform(c.key, _KEEP, tkey, p.key) < keep:
            out.append(p)
    return out


@lru_cache(maxsize=256)
def _cloud_threshold(c: Country, key: int, cover: float) -> float:
    """Cloud-field level exceeded on ``cover`` of the country (sampled, so every window agrees)."""
    gy = c.gy0 + np.linspace(-0.2 * c.height, 1.2 * c.height, 96)
    gx = c.gx0 + np.linspace(-0.2 * c.width, 1.2 * c.width, 160)
    f = _cloud_field(c, key, gy, gx)
    return float(np.quantile(f, 1.0 - cover)) if cover > 0 else 2.0


def _cloud_field(c: Country, key: int, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    return fbm(gy, gx, 160, 5, c.key, _CLOUD, key, gain=0.55)


def _persistent(c: Country, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """Opacity of two clouds present on every date (orographic caps): pixels that are never clear."""
    out = np.zeros((len(gy), len(gx)), np.float32)
    for u, v in ((0.36, 0.3), (0.86, 0.72)):
        cy, cx = c.gy0 + v * c.height, c.gx0 + u * c.width
        r = max(6.0, 0.03 * c.width)
        d = np.hypot((gy[:, None] + 0.5 - cy), (gx[None, :] + 0.5 - cx))
        out = np.maximum(out, np.clip((r - d) / 3.0, 0.0, 1.0))
    return out


def cloud_opacity(c: Country, p: Pass, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """Cloud opacity (0 clear .. 1 opaque) of pass ``p`` over gy x gx."""
    thr = _cloud_threshold(c, p.key, round(p.cover, 4))
    f = _cloud_field(c, p.key, gy, gx)
    alpha = np.clip((f - thr) / 0.05, 0.0, 1.0) ** 0.8
    return np.maximum(alpha, _persistent(c, gy, gx)).astype(np.float32)


def sun_angles(p: Pass) -> tuple[float, float]:
    """(zenith, azimuth) of the sun at the pass, radians; azimuth from north, clockwise (~150 deg: SSE)."""
    lat = 43.3
    decl = 23.44 * np.sin(2 * np.pi * (p.doy - 81) / 365.0)
    zen = np.radians(min(75.0, lat - decl + 5))
    az = np.radians(150 + 10 * (uniform(p.key, 8) - 0.5))
    return float(zen), float(az)


def shadow_offset(c: Country, p: Pass) -> tuple[float, float]:
    """(rows, cols) from a cloud to its shadow: sun from the south-south-east, low in winter."""
    zen, az = sun_angles(p)
    height = 600 + 900 * uniform(p.key, 7)  # cloud base (m)
    length = height * np.tan(zen) / 10.0  # px
    return float(length * np.cos(az)), float(-length * np.sin(az))  # south +rows, west -cols


# ground track of each orbit (zone coordinate) and half swath width: the swath edges of in_swath
_TRACK = {"west": (0.78 - 0.45, 0.45), "east": (0.42 + 0.45, 0.45)}


def view_angle(c: Country, p: Pass, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """Signed view zenith angle over its maximum (~11 deg), -1..1: > 0 where the pixel is seen in
    backscatter (west of the descending track, sensor on the sun's side), < 0 in forward scatter.

    Where the two orbits overlap, one sees a pixel from the east and the other from the west.
    """
    track, half = _TRACK[p.side]
    u = (gx + 0.5 - c.gx0) / c.width
    v = (gy + 0.5 - c.gy0) / c.height
    return np.clip((track + 0.08 * (v[:, None] - 0.5) - u[None, :]) / half, -1, 1).astype(np.float32)


def thin_cloud_opacity(c: Country, p: Pass, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """Cirrus and haze veils (opacity < 0.2) on about a third of the dates: below the mask's
    detection threshold, they stay in the "clear" data as they do in real L2A products."""
    u = uniform(p.key, _THIN, np.arange(2))
    if u[0] > 0.35:
        return np.zeros((len(gy), len(gx)), np.float32)
    f = fbm(gy, gx, 120, 3, c.key, _THIN, p.key)
    return ((0.06 + 0.14 * u[1]) * np.clip((f - 0.5) / 0.2, 0.0, 1.0)).astype(np.float32)


def shadow_opacity(c: Country, p: Pass, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """Shadow strength: the cloud field seen from the ground along the sun direction."""
    dr, dc = shadow_offset(c, p)
    # shadow at (r, c) comes from the cloud at (r, c) minus the displacement towards the shadow
    return cloud_opacity(c, p, gy.astype(np.float64) - dr, gx.astype(np.float64) - dc)
