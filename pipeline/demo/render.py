"""One window of one L2A product: ground reflectance + clouds, shadows, saturation, no-data edge and masks.

Everything here is a function of (country, pass, world pixel), so any window of any tile can be
rendered on its own, in any order, and the overlap strip of two tiles acquired by the same pass
is identical. The 20 m bands are the 2 x 2 block mean of the 10 m rendering, which is what a
20 m detector integrates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rasterio.windows import Window

from pipeline.demo.landscape import Country, K, TileSpec, render_static, world_axes
from pipeline.demo.noise import hash_keys, name_key, uniform
from pipeline.demo.sensor import CLOUD_MASK_ALPHA, Pass, cloud_opacity, in_swath, shadow_opacity
from pipeline.demo.spectra import CLOUD, ground_reflectance, pixel_noise

NODATA = -10000
_SAT = name_key("saturation")
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
    gy, gx = world_axes(tile.grid, window)
    return render_static(c, gy, gx)


def render_window(
    c: Country, tile: TileSpec, p: Pass, window: Window, static: dict[str, np.ndarray] | None = None
) -> RenderedWindow:
    """Render ``window`` (even offsets and sizes, 10 m px) of ``tile`` as acquired by pass ``p``."""
    if window.col_off % 2 or window.row_off % 2 or window.width % 2 or window.height % 2:
        raise ValueError(f"window {window} must have even offsets and sizes (20 m bands)")
    gy, gx = world_axes(tile.grid, window)
    st = static if static is not None else render_static(c, gy, gx)
    t = p.doy
    R, snow = ground_reflectance(st, t, p.key)
    # residual atmospheric-correction error per date and band, sensor noise per pixel
    gain = 1 + 0.03 * (uniform(p.key, 40, np.arange(10)) - 0.5)
    R *= gain.astype(np.float32)[:, None, None]
    R += pixel_noise(gy, gx, p.key)

    alpha_s = shadow_opacity(c, p, gy, gx)
    alpha = cloud_opacity(c, p, gy, gx)
    R *= 1 - 0.7 * alpha_s[None]
    bright = 0.85 + 0.3 * float(uniform(p.key, 41))
    R = R * (1 - alpha[None]) + alpha[None] * (CLOUD * bright)[:, None, None]

    edge = ~in_swath(c, p, gy, gx)
    cloud = (alpha >= CLOUD_MASK_ALPHA) & ~edge
    shadow = (alpha_s >= CLOUD_MASK_ALPHA) & ~cloud & ~edge

    # saturation: specular glints on bright roofs, fresh snow and water, a few pixels per date
    hit = uniform(hash_keys(c.key, _SAT, p.key), gy[:, None], gx[None, :])
    cand = np.where(R[0] > 0.28, 0.004, np.where(st["cls"] == K["WAT"], 0.001, 0.0))
    sat = (hit < cand) & (alpha < 0.1) & ~edge
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
        water=(st["cls"] == K["WAT"]) & clear,
    )
