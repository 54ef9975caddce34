"""Surface reflectance of the demo country: endmember spectra mixed with per-class, time-varying abundances.

Why linear mixing of endmembers: it gives physically plausible spectra for every class and date
with a handful of numbers, mixed pixels for free (a 1 px road is asphalt plus verge, a DUF pixel
is roof plus garden), and classes that are separable only by their *temporal* profile (summer vs
winter crops, broadleaf vs conifer) or by their *texture* (CUF / DUF / ICU), which is exactly
what a classifier must learn and can fail at.

Band order everywhere in this module: B2 B3 B4 B8 (10 m) then B5 B6 B7 B8A B11 B12 (20 m).
"""

from __future__ import annotations

import numpy as np

from pipeline.demo.landscape import CLASS_NAMES, K
from pipeline.demo.noise import hash_keys, sig, uniform

#                     B2     B3     B4     B8     B5     B6     B7     B8A    B11    B12
ENDMEMBERS = {
    "soil":    (0.060, 0.090, 0.120, 0.220, 0.150, 0.180, 0.200, 0.230, 0.320, 0.260),
    "green":   (0.030, 0.070, 0.035, 0.440, 0.100, 0.300, 0.400, 0.450, 0.220, 0.110),
    "dry":     (0.070, 0.100, 0.130, 0.270, 0.170, 0.220, 0.250, 0.280, 0.380, 0.300),
    "needle":  (0.020, 0.040, 0.025, 0.260, 0.070, 0.180, 0.240, 0.270, 0.130, 0.060),
    "water":   (0.060, 0.050, 0.030, 0.010, 0.020, 0.012, 0.010, 0.010, 0.005, 0.003),
    "snow":    (0.900, 0.880, 0.860, 0.800, 0.780, 0.770, 0.760, 0.750, 0.050, 0.040),
    "roof":    (0.080, 0.100, 0.160, 0.230, 0.190, 0.210, 0.220, 0.240, 0.300, 0.250),
    "bright":  (0.300, 0.320, 0.330, 0.360, 0.340, 0.350, 0.355, 0.360, 0.380, 0.330),
    "asphalt": (0.070, 0.080, 0.090, 0.120, 0.100, 0.110, 0.115, 0.125, 0.150, 0.140),
    "sand":    (0.180, 0.220, 0.270, 0.350, 0.300, 0.320, 0.330, 0.355, 0.420, 0.360),
    "rock":    (0.140, 0.160, 0.180, 0.250, 0.200, 0.220, 0.230, 0.250, 0.300, 0.250),
}  # fmt: skip
EM = {n: i for i, n in enumerate(ENDMEMBERS)}
E = np.array(list(ENDMEMBERS.values()), dtype=np.float32)  # (endmembers, bands)
CLOUD = np.array((0.56, 0.55, 0.55, 0.57, 0.56, 0.56, 0.57, 0.57, 0.42, 0.32), dtype=np.float32)
SNOW_COVER = {K["COF"]: 0.5, K["BLF"]: 0.75, K["WAT"]: 0.0, K["GPS"]: 0.0, K["RSF"]: 0.6}


def bump(t: float, up, down, k: float):
    """Green-up at ``up`` and senescence at ``down`` (days of year), logistic edges of width ``k``."""
    return sig((t - up) / k) - sig((t - down) / k)


def _profile(k: int, t: float, s, a, tx, t2) -> dict[str, np.ndarray]:
    """Abundances of the endmembers for class ``k`` at day ``t`` (parcel shift ``s``, amplitude ``a``)."""
    one = np.ones_like(s)
    if k == K["ASC"]:  # maize / sunflower: bare until May, green Jun-Aug, harvested in October
        g = a * 0.9 * bump(t, 160 + s, 250 + s, 9)
        d = 0.75 * bump(t, 250 + s, 290 + s, 5) + 0.12 * sig((t - 290 - s) / 5)
        return {"green": g, "dry": d, "soil": np.clip(1 - g - d, 0, 1)}
    if k == K["AWC"]:  # wheat: sown in autumn, green Mar-May, ripe in June, harvested early July
        g = a * 0.9 * bump(t, 70 + s, 160 + s, 10) + 0.22 * (1 - sig((t - 70 - s) / 10))
        g = g + 0.2 * sig((t - 305 - s) / 8)
        d = 0.8 * bump(t, 160 + s, 192 + s, 4) + 0.3 * bump(t, 192 + s, 250 + s, 4)
        return {"green": g, "dry": d, "soil": np.clip(1 - g - d, 0, 1)}
    if k == K["IGL"]:  # meadows mown three times a year
        g = 0.5 + 0.35 * bump(t, 75, 300, 15) * a
        f = one.copy()
        for m in (140 + s, 190 + 0.7 * s, 245 + 0.5 * s):
            f = f * (1 - 0.6 * np.exp(-np.clip(t - m, 0, None) / 14.0) * (t >= m))
        dry = 0.35 * (1 - f) + 0.05
        return {"green": g * f, "dry": dry, "soil": np.clip(1 - g * f - dry, 0, 1)}
    if k == K["ORC"]:  # tree grid over grass, late leaf-out
        leaf = a * bump(t, 110 + s, 300 + s, 8)
        g = tx * 0.9 * leaf + (1 - tx) * (0.45 + 0.15 * bump(t, 80, 290, 15))
        d = tx * (1 - leaf) * 0.45
        return {"green": g, "dry": d, "soil": np.clip(1 - g - d, 0, 1)}
    if k == K["VIN"]:  # rows of vines on bare soil, leaves from late May, red-brown in October
        leaf = a * bump(t, 140 + s, 285 + s, 7)
        g = tx * 0.85 * leaf + (1 - tx) * 0.12
        d = tx * (1 - leaf) * 0.35 + tx * 0.3 * bump(t, 285 + s, 315 + s, 5)
        return {"green": g, "dry": d, "soil": np.clip(1 - g - d, 0, 1)}
    if k == K["BLF"]:  # deciduous: leaf-off from November to April (branches, litter)
        leaf = a * bump(t, 100 + s, 300 + s, 8)
        return {"green": tx * (0.85 * leaf + 0.05), "dry": tx * 0.55 * (1 - leaf), "soil": (1 - tx) * 0.5}
    if k == K["COF"]:  # evergreen, dark all year
        needle = tx * (0.82 + 0.06 * bump(t, 120, 270, 15))
        return {"needle": needle, "dry": 0.05 * one, "soil": (1 - tx) * 0.5}
    if k == K["NGL"]:  # alpine pasture: short green season, straw-coloured otherwise
        g = a * 0.6 * bump(t, 130 + s, 235 + s, 12) + 0.12
        d = 0.45 - 0.3 * bump(t, 130 + s, 210 + s, 12)
        return {"green": g, "dry": d, "rock": 0.25 * tx, "soil": np.clip(1 - g - d - 0.25 * tx, 0, 1)}
    if k == K["WOM"]:  # shrubs (evergreen), heather, rock
        return {"needle": 0.25 + 0.35 * tx, "green": 0.15 * bump(t, 110, 270, 12) * one, "dry": 0.25 * one,
                "rock": 0.25 * (1 - tx)}  # fmt: skip
    if k == K["BDS"]:
        return {"sand": 0.92 - 0.15 * tx, "dry": 0.12 * tx, "green": 0.06 * tx * bump(t, 90, 200, 15)}
    if k == K["BRO"]:
        return {"rock": 0.8 + 0.2 * tx, "soil": 0.1 * one, "green": 0.05 * tx * bump(t, 150, 240, 10)}
    if k == K["GPS"]:  # permanent snow, dirtier and wetter ice in late summer
        summer = bump(t, 150, 270, 12) * one
        return {"snow": 0.9 - 0.3 * summer, "rock": 0.05 + 0.15 * summer * tx, "water": 0.05 + 0.15 * summer}
    if k == K["WAT"]:  # turbidity per water body, a little algae in summer
        return {"water": 1 - tx, "soil": tx, "green": 0.015 * bump(t, 150, 250, 15) * one}
    if k == K["RSF"]:  # asphalt plus verge (roads are narrower than a pixel)
        v = 1 - tx
        return {"asphalt": tx, "green": v * 0.6 * (0.6 + 0.4 * bump(t, 90, 300, 15)), "soil": v * 0.4}
    if k == K["CUF"]:  # roofs (some bright) and streets, little vegetation
        v = 1 - tx
        return {"roof": tx * (1 - t2), "bright": tx * t2, "asphalt": v * 0.7,
                "green": v * 0.3 * (0.5 + 0.5 * bump(t, 100, 300, 10))}  # fmt: skip
    if k == K["DUF"]:  # houses in gardens: some pixels look like CUF, others like grassland
        v = 1 - tx
        return {"roof": tx, "green": v * 0.75 * (0.55 + 0.45 * bump(t, 100, 300, 10)), "dry": v * 0.1,
                "asphalt": v * 0.08, "soil": v * 0.07}  # fmt: skip
    if k == K["ICU"]:  # big roofs (mostly bright metal) and car parks
        v = 1 - tx
        return {"roof": tx * (1 - t2) * 0.9, "bright": tx * t2 * 0.95, "asphalt": v * 0.8, "green": v * 0.15,
                "soil": v * 0.05}  # fmt: skip
    raise ValueError(f"no profile for class index {k}")


def snowline(t: float, key: int) -> float:
    """Relative elevation of the snow line: low in February, above every summit from June to October."""
    return 0.42 + 0.62 * float(bump(t, 95, 330, 18)) + 0.06 * (float(uniform(key, 31)) - 0.5)


def ground_reflectance(st: dict[str, np.ndarray], t: float, key: int) -> tuple[np.ndarray, np.ndarray]:
    """Cloud-free surface reflectance (10, h, w) float32 at day ``t``, and the snow fraction (h, w)."""
    cls = st["cls"]
    h, w = cls.shape
    A = np.zeros((len(E), h, w), np.float32)
    for k in np.unique(cls):
        m = cls == k
        ab = _profile(int(k), t, st["shift"][m], st["amp"][m], st["tex"][m], st["tex2"][m])
        for name, val in ab.items():
            A[EM[name]][m] = val
    # within-class variability: per-pixel vegetation vigour and brightness
    A[EM["green"]] *= 1 + 0.12 * st["pvar"]
    # seasonal snow on high ground, partly hidden by canopies
    cover = np.ones(len(CLASS_NAMES), np.float32)
    for k, f in SNOW_COVER.items():
        cover[k] = f
    snow = np.clip((st["elev"] - snowline(t, key)) / 0.08, 0, 1) * cover[cls]
    if snow.any():
        A *= 1 - snow
        A[EM["snow"]] += snow
    if (cls == K["GPS"]).any():
        snow = np.where(cls == K["GPS"], np.maximum(snow, 0.8), snow)
    R = np.tensordot(E.T, A, axes=1) * (1 + 0.08 * st["pvar"] * 0.5)
    return R.astype(np.float32), snow


def pixel_noise(gy: np.ndarray, gx: np.ndarray, key: int) -> np.ndarray:
    """Per pixel, band and date sensor noise (+-0.006 reflectance) from one 64-bit hash per pixel."""
    hsh = hash_keys(key, gy[:, None], gx[None, :])
    out = np.empty((10,) + hsh.shape, np.float32)
    for b in range(10):
        bits = ((hsh >> np.uint64(6 * b)) & np.uint64(63)).astype(np.float32)
        out[b] = (bits / 63.0 - 0.5) * 0.012
    return out
