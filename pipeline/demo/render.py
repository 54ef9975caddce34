"""One window of one L2A product: ground reflectance + clouds, shadows, saturation, no-data edge and masks.

Everything here is a function of (country, pass, world pixel), so any window of any tile can be
rendered on its own, in any order, and the overlap strip of two tiles acquired by the same pass
is identical. The ground is rendered with a halo of :data:`HALO` pixels so that the instrument's
point spread function (a pixel integrates light from its neighbours: every object boundary gives
mixed pixels) is the same whichever window asks. The 20 m bands are the 2 x 2 block mean of the
PSF-blurred 10 m rendering, which is what a 20 m detector integrates (even more mixing).

What the L2A processor leaves in the data, as real products do: residual topographic
illumination in the mountains, BRDF differences between the two orbits' viewing angles, residual
aerosol haze varying per date, thin clouds and cloud/shadow edges missed by the masks, and false
cloud detections over bright surfaces.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window

from pipeline.demo.landscape import Country, K, TileSpec, render_static, world_axes
from pipeline.demo.noise import fbm, hash_keys, name_key, uniform
from pipeline.demo.sensor import (
    CLOUD_MASK_ALPHA,
    Pass,
    cloud_opacity,
    in_swath,
    shadow_opacity,
    sun_angles,
    thin_cloud_opacity,
    view_angle,
)
from pipeline.demo.spectra import CLOUD, ground_reflectance, pixel_noise

NODATA = -10000
_SAT, _HAZE, _COMM, _ATM = (name_key(n) for n in ("saturation", "haze", "commission", "atm"))
HALO = 2  # px of ground rendered around a window for the PSF (even: keeps the 20 m blocks aligned)
# Gaussian PSF of sigma ~0.55 px (S2 MSI MTF ~0.25 at Nyquist): weights of the 5-tap separable kernel
_PSF = np.exp(-0.5 * (np.arange(-HALO, HALO + 1) / 0.55) ** 2)
PSF = (_PSF / _PSF.sum()).astype(np.float32)
# residual path radiance (reflectance per unit of haze optical depth), ~ lambda^-1.3 (aerosols)
HAZE = np.array((0.060, 0.045, 0.034, 0.016, 0.028, 0.022, 0.019, 0.016, 0.005, 0.002), np.float32)
# BRDF: reflectance change per unit of signed view angle (backscatter brighter), per band
BRDF = np.array((0.07, 0.06, 0.07, 0.04, 0.06, 0.05, 0.045, 0.04, 0.05, 0.06), np.float32)
SAT_VALUE = 10000  # reflectance 1.0: the clipped value a saturated detector delivers


@dataclass
class RenderedWindow:
    """Everything a writer needs for one window: int16 reflectances and the 10 m masks."""

    r10: np.ndarray  # int16 (4, h, w): B2 B3 B4 B8
    r20: np.ndarray  # int16 (6, h/2, w/2): B5 B6 B7 B8A B11 B12
    cloud: np.ndarray
    shadow: np.ndarray
    saturated: np.ndarray
    edge: np.ndarray
    snow: np.ndarray
    water: np.ndarray

    def masks(self) -> dict[str, np.ndarray]:
        return {
            "cloud": self.cloud,
            "shadow": self.shadow,
            "saturated": self.saturated,
            "edge": self.edge,
            "snow": self.snow,
            "water": self.water,
        }


def static_for(c: Country, tile: TileSpec, window: Window) -> dict[str, np.ndarray]:
    """The date-independent ground of ``window`` plus a halo of :data:`HALO` px on every side."""
    gy, gx = world_axes(tile.grid, window)
    return render_static(c, _grow(gy), _grow(gx))


def _grow(g: np.ndarray) -> np.ndarray:
    return np.arange(g[0] - HALO, g[-1] + HALO + 1, dtype=np.int64)


def psf(R: np.ndarray) -> np.ndarray:
    """Blur (bands, h + 2 HALO, w + 2 HALO) with the separable PSF; returns (bands, h, w)."""
    n = len(PSF)
    rows = sum(PSF[i] * R[:, i : R.shape[1] - n + 1 + i, :] for i in range(n))
    return sum(PSF[i] * rows[:, :, i : R.shape[2] - n + 1 + i] for i in range(n))


def illumination(st: dict[str, np.ndarray], p: Pass) -> np.ndarray:
    """Residual topographic illumination factor after the L2A slope correction (1 on flat ground).

    cos(i) / cos(sun zenith) of each facet, of which the Lambertian correction of the processor
    removes only part (canopies and snow are not Lambertian, the DEM is smoother than the ground):
    sunlit slopes stay brighter and shaded ones darker, more so under the low winter sun.
    """
    zen, az = sun_angles(p)
    sx, sy = st["dzdx"], st["dzdy"]
    norm = np.sqrt(1 + sx * sx + sy * sy)
    # unit vectors, x east, y north, z up (dzdy is south-going)
    sun = (np.sin(zen) * np.sin(az), np.sin(zen) * np.cos(az), np.cos(zen))
    cos_i = (-sx * sun[0] + sy * sun[1] + sun[2]) / norm
    ratio = np.clip(cos_i, 0.05, None) / np.cos(zen)
    return np.clip(1 + 0.35 * (ratio - 1), 0.45, 1.5).astype(np.float32)


def render_window(
    c: Country, tile: TileSpec, p: Pass, window: Window, static: dict[str, np.ndarray] | None = None
) -> RenderedWindow:
    """Render ``window`` (even offsets and sizes, 10 m px) of ``tile`` as acquired by pass ``p``.

    ``static`` is :func:`static_for` of the same window (with its halo).
    """
    if window.col_off % 2 or window.row_off % 2 or window.width % 2 or window.height % 2:
        raise ValueError(f"window {window} must have even offsets and sizes (20 m bands)")
    gy, gx = world_axes(tile.grid, window)
    st = static if static is not None else static_for(c, tile, window)
    t = p.doy
    Rh, snow_h = ground_reflectance(st, t, p.key)
    Rh *= illumination(st, p)[None]
    R = psf(Rh)
    inner = (slice(HALO, -HALO), slice(HALO, -HALO))
    cls = st["cls"][inner]
    snow = snow_h[inner]
    # BRDF: the same ground looks brighter seen in backscatter than in forward scatter
    R *= 1 + BRDF[:, None, None] * view_angle(c, p, gy, gx)[None]
    # residual atmospheric-correction error per date and band, sensor noise per pixel
    gain = 1 + 0.04 * (uniform(p.key, 40, np.arange(10)) - 0.5)
    R *= gain.astype(np.float32)[:, None, None]
    tau = 0.12 * float(uniform(p.key, _HAZE)) ** 2  # residual aerosol optical depth of the date
    haze = tau * (0.3 + 1.4 * fbm(gy, gx, 90, 2, c.key, _HAZE, p.key))
    R = R * (1 - 0.5 * haze[None]) + HAZE[:, None, None] * haze[None]
    R += pixel_noise(gy, gx, p.key)

    alpha_s = shadow_opacity(c, p, gy, gx)
    alpha_t = thin_cloud_opacity(c, p, gy, gx)
    alpha = np.maximum(cloud_opacity(c, p, gy, gx), alpha_t)
    R *= 1 - 0.7 * alpha_s[None]
    bright = 0.85 + 0.3 * float(uniform(p.key, 41))
    R = R * (1 - alpha[None]) + alpha[None] * (CLOUD * bright)[:, None, None]

    edge = ~in_swath(c, p, gy, gx)
    # the masks: the detection threshold varies per date (thin cloud edges and cirrus are missed),
    # shadows are detected less well than clouds (penumbras missed, some dates not at all), and
    # bright ground (sand, roofs, snow, rock) is now and then taken for cloud
    u = uniform(p.key, _ATM, np.arange(4))
    thr = CLOUD_MASK_ALPHA + 0.25 * float(u[0])
    cloud = (alpha >= thr) & ~edge
    bright_ground = (R[0] > 0.15 + 0.1 * float(u[1])) & (alpha_s < 0.3)
    if u[2] < 0.3:  # commission on this date, in patches
        patches = fbm(gy, gx, 24, 2, c.key, _COMM, p.key) > 0.55
        cloud |= bright_ground & patches & ~edge
    shadow_thr = 0.45 + 0.25 * float(u[3]) if u[3] < 0.8 else 2.0
    shadow = (alpha_s >= shadow_thr) & ~cloud & ~edge

    # saturation: specular glints on bright roofs, fresh snow and water, a few pixels per date
    hit = uniform(hash_keys(c.key, _SAT, p.key), gy[:, None], gx[None, :])
    cand = np.where(R[0] > 0.28, 0.004, np.where(cls == K["WAT"], 0.001, 0.0))
    sat = (hit < cand) & (alpha < 0.1) & ~edge & ~cloud
    r10 = np.clip(np.rint(R[:4] * 10000), 0, 32767).astype(np.int16)
    r10[:, sat] = SAT_VALUE
    r10[:, edge] = NODATA

    h, w = edge.shape
    R20 = R[4:].reshape(6, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    r20 = np.clip(np.rint(R20 * 10000), 0, 32767).astype(np.int16)
    edge20 = edge.reshape(h // 2, 2, w // 2, 2).any(axis=(1, 3))
    r20[:, edge20] = NODATA

    clear = ~cloud & ~edge
    return RenderedWindow(
        r10=r10,
        r20=r20,
        cloud=cloud,
        shadow=shadow,
        saturated=sat,
        edge=edge,
        snow=(snow > 0.5) & clear,
        water=(cls == K["WAT"]) & clear,
    )
