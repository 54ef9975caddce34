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
    "dark":    (0.050, 0.055, 0.060, 0.080, 0.065, 0.070, 0.075, 0.080, 0.095, 0.085),  # slate, bitumen
    "concrete": (0.170, 0.190, 0.210, 0.260, 0.230, 0.240, 0.250, 0.265, 0.310, 0.280),
}  # fmt: skip
EM = {n: i for i, n in enumerate(ENDMEMBERS)}
E = np.array(list(ENDMEMBERS.values()), dtype=np.float32)  # (endmembers, bands)
CLOUD = np.array((0.56, 0.55, 0.55, 0.57, 0.56, 0.56, 0.57, 0.57, 0.42, 0.32), dtype=np.float32)
SNOW_COVER = {K["COF"]: 0.5, K["BLF"]: 0.75, K["WAT"]: 0.0, K["GPS"]: 0.0, K["RSF"]: 0.6}
MINERAL = ("soil", "rock", "sand")  # endmembers whose brightness varies with moisture and lithology


def bump(t: float, up, down, k: float):
    """Green-up at ``up`` and senescence at ``down`` (days of year), logistic edges of width ``k``."""
    return sig((t - up) / k) - sig((t - down) / k)


def _roofs(tx, t2, p_tile: float, p_dark: float) -> dict[str, np.ndarray]:
    """Roof material per building from its draw ``t2``: tiles, slate/bitumen, or bright metal/membrane.

    Every urban class has every material (in different proportions): a single roof pixel does not
    tell CUF, DUF and ICU apart, only the arrangement around it does.
    """
    tile = t2 < p_tile
    dark = (t2 >= p_tile) & (t2 < p_tile + p_dark)
    return {"roof": tx * tile, "dark": tx * dark, "bright": tx * ~(tile | dark)}


def _urban(t, tx, t2, roofs: tuple[float, float], paved, tree) -> dict[str, np.ndarray]:
    """An urban pixel: roof fraction ``tx``; the rest is paved, tree or lawn by the draw ``t2``.

    The materials (roofs, asphalt and concrete, lawns, street trees) are the same in CUF, DUF and
    ICU; only their shares differ (``roofs`` = tile and slate shares of the roofs, ``paved`` and
    ``tree`` the open ground's), so one pixel says little and the neighbourhood says the class.
    """
    building = tx >= 0.5
    open_ = 1 - tx
    is_paved = building | (t2 < paved)  # a roof pixel's remainder is gutter and pavement
    is_tree = ~is_paved & (t2 < paved + tree)
    is_lawn = ~is_paved & ~is_tree
    leaf = bump(t, 100, 300, 10)
    out = {n: r * building for n, r in _roofs(tx, t2, *roofs).items()}
    green = is_tree * (0.1 + 0.8 * leaf) + is_lawn * 0.8 * (0.55 + 0.45 * leaf)
    dry = is_tree * 0.5 * (1 - leaf) + is_lawn * 0.1
    return {**out, "asphalt": open_ * is_paved * 0.7, "concrete": open_ * is_paved * 0.3,
            "green": open_ * green, "dry": open_ * dry, "soil": open_ * is_lawn * 0.07}  # fmt: skip


def _crop_fallow(t, s, a):
    """Set-aside / fallow: spontaneous weeds in spring, straw all summer (a grassland look-alike)."""
    g = a * 0.45 * bump(t, 80 + s, 190 + s, 15) + 0.12
    d = 0.2 + 0.25 * bump(t, 170 + s, 330, 15)
    return g, d


def _profile(k: int, t: float, s, a, tx, t2, fr, md) -> dict[str, np.ndarray]:
    """Abundances of the endmembers for class ``k`` at day ``t``.

    Per pixel: parcel shift ``s`` (days), vigour ``a``, texture ``tx``/``t2``, object mixing fraction
    ``fr`` and management draw ``md`` (see :func:`pipeline.demo.landscape._variability`).
    """
    one = np.ones_like(s)
    if k == K["ASC"]:  # maize (some irrigated) / sunflower / fallow, some with a winter cover crop
        sunflower = (md >= 0.1) & (md < 0.4)
        a = np.where(md > 0.82, np.minimum(1.0, a + 0.3), a)  # irrigated
        up, down = np.where(sunflower, 150, 160) + s, np.where(sunflower, 225, 255) + s
        g = a * np.where(sunflower, 0.7, 0.9) * bump(t, up, down, 9)
        d = 0.75 * bump(t, down, down + 35, 5) + 0.12 * sig((t - down - 35) / 5)
        cover = (md >= 0.4) & (md < 0.6)  # catch crop over winter, destroyed before sowing
        g = g + cover * 0.4 * a * (1 - sig((t - 95 - 0.5 * s) / 8))
        fg, fd = _crop_fallow(t, s, a)
        fallow = md < 0.1
        g, d = np.where(fallow, fg, g), np.where(fallow, fd, d)
        return {"green": g, "dry": d, "soil": np.clip(1 - g - d, 0, 1)}
    if k == K["AWC"]:  # wheat / barley / rapeseed, some double-cropped after harvest, a few fallow
        rape = (md >= 0.07) & (md < 0.3)
        s = s - 15 * rape
        g = a * 0.9 * bump(t, 70 + s, 160 + s, 10) + np.where(rape, 0.35, 0.22) * (1 - sig((t - 70 - s) / 10))
        g = g + 0.2 * sig((t - 305 - s) / 8)
        d = 0.8 * bump(t, 160 + s, 192 + s, 4) + 0.3 * bump(t, 192 + s, 250 + s, 4)
        d = d + rape * 0.25 * bump(t, 95 + s, 125 + s, 5)  # yellow flowers
        double = md > 0.75  # summer catch crop / second crop after the harvest
        g = g + double * 0.65 * a * bump(t, 215 + 0.5 * s, 285 + 0.5 * s, 8)
        d = d * np.where(double, 1 - bump(t, 215 + 0.5 * s, 285 + 0.5 * s, 8), 1)
        fg, fd = _crop_fallow(t, s, a)
        fallow = md < 0.07
        g, d = np.where(fallow, fg, g), np.where(fallow, fd, d)
        return {"green": g, "dry": d, "soil": np.clip(1 - g - d, 0, 1)}
    if k == K["IGL"]:  # meadows mown 2-3 times, or grazed pastures that brown in summer
        grazed = md < 0.3
        g = 0.5 + 0.35 * bump(t, 75 + 0.3 * s, 300, 15) * a
        f = one.copy()
        cuts = ((140, 1.0), (190, 0.7), (245, 0.5))
        for n, (m0, ks) in enumerate(cuts):
            m = m0 + ks * s
            mown = ~grazed & ((n < 2) | (md > 0.65))
            f = f * (1 - mown * 0.6 * np.exp(-np.clip(t - m, 0, None) / 14.0) * (t >= m))
        f = f * (1 - grazed * 0.35 * bump(t, 185 + 0.5 * s, 265, 15))  # grazed + summer drought
        dry = 0.35 * (1 - f) + 0.05
        return {"green": g * f, "dry": dry, "soil": np.clip(1 - g * f - dry, 0, 1)}
    if k == K["ORC"]:  # tree grid (density per orchard) over grassed or bare inter-rows
        trees = tx * (0.45 + 0.55 * fr)
        leaf = a * bump(t, 110 + s, 300 + s, 8)
        grass = md < 0.6
        under = np.where(grass, 0.45 + 0.15 * bump(t, 80, 290, 15), 0.12)
        g = trees * 0.9 * leaf + (1 - trees) * under
        d = trees * (1 - leaf) * 0.45 + (1 - trees) * grass * 0.12
        return {"green": g, "dry": d, "soil": np.clip(1 - g - d, 0, 1)}
    if k == K["VIN"]:  # rows of vines, inter-rows bare or grassed, leaves from late May, red in October
        leaf = a * bump(t, 140 + s, 285 + s, 7)
        grass = 0.75 * fr * (md < 0.6)
        under = (1 - tx) * (0.1 + grass * (0.45 + 0.2 * bump(t, 60, 160, 15)))
        g = tx * 0.85 * leaf + under
        d = tx * (1 - leaf) * 0.35 + tx * 0.3 * bump(t, 285 + s, 315 + s, 5) + (1 - tx) * grass * 0.15
        return {"green": g, "dry": d, "soil": np.clip(1 - g - d, 0, 1)}
    if k == K["BLF"]:  # deciduous, leaf-off Nov-Apr; grassy gaps; some conifers (< 25 %: else "mixed")
        conifer = np.where(md < 0.35, 0.05 + 0.2 * fr, 0.0)
        cover = tx * (0.75 + 0.25 * a)
        leaf = a * bump(t, 100 + s, 300 + s, 8)
        dec = cover * (1 - conifer)
        return {"green": dec * (0.85 * leaf + 0.05) + (1 - cover) * 0.3 * bump(t, 90, 280, 15),
                "dry": dec * 0.55 * (1 - leaf), "needle": cover * conifer * 0.85,
                "soil": (1 - cover) * 0.35}  # fmt: skip
    if k == K["COF"]:  # evergreen; some broadleaves (< 25 %) in some stands, young plantations are open
        broad = np.where(md < 0.35, 0.05 + 0.2 * fr, 0.0)
        cover = tx * np.where(md > 0.88, 0.35 + 0.2 * fr, 1.0)
        leaf = bump(t, 105 + s, 295 + s, 8)
        needle = cover * (1 - broad) * (0.82 + 0.06 * bump(t, 120, 270, 15))
        gap = 1 - cover
        green = cover * broad * (0.8 * leaf + 0.05) + gap * 0.35 * bump(t, 100, 260, 15)
        dry = 0.05 * one + cover * broad * 0.5 * (1 - leaf) + gap * 0.2
        return {"needle": needle, "green": green, "dry": dry, "soil": gap * 0.35}
    if k == K["NGL"]:  # alpine pasture: short green season, straw otherwise; some shrub encroachment
        shrub = 0.3 * fr * (md < 0.5)
        g = (a * 0.6 * bump(t, 130 + s, 235 + s, 12) + 0.12) * (1 - shrub)
        d = (0.45 - 0.3 * bump(t, 130 + s, 210 + s, 12)) * (1 - shrub)
        r = (0.1 + 0.3 * tx) * (1 - shrub)
        soil = np.clip(1 - g - d - r - shrub, 0, 1)
        return {"green": g, "dry": d, "rock": r, "needle": shrub, "soil": soil}
    if k == K["WOM"]:  # evergreen shrubs (heather, broom, juniper) between grass and rock
        shrub = 0.2 + 0.55 * fr * (0.5 + 0.5 * tx)
        grass = 1 - shrub
        return {"needle": shrub * 0.75, "green": shrub * 0.2 * bump(t, 110 + s, 270 + s, 12)
                + grass * (a * 0.5 * bump(t, 130 + s, 235 + s, 12) + 0.1), "dry": grass * 0.35 + shrub * 0.1,
                "rock": grass * 0.2 * (1 - tx)}  # fmt: skip
    if k == K["BDS"]:  # sand, dune grass (marram) on the back dunes, shingle
        veg = tx * (0.1 + 0.35 * fr)
        return {"sand": (0.92 - veg) * (1 - 0.4 * (md < 0.2)), "rock": 0.35 * (md < 0.2), "dry": 0.6 * veg,
                "green": 0.5 * veg * bump(t, 90, 200, 15)}  # fmt: skip
    if k == K["BRO"]:  # granite / limestone scree (some bright as sand), sparse alpine grass
        lime = md > 0.6
        return {"rock": (0.8 + 0.2 * tx) * (1 - 0.5 * lime), "sand": 0.45 * lime, "soil": 0.1 * one,
                "green": (0.05 + 0.15 * fr) * tx * bump(t, 150 + s, 240 + s, 10)}  # fmt: skip
    if k == K["GPS"]:  # permanent snow, dirtier and wetter ice in late summer, debris on some glaciers
        summer = bump(t, 150, 270, 12) * one
        return {"snow": 0.9 - (0.3 + 0.1 * fr) * summer, "rock": 0.05 + (0.15 + 0.15 * fr) * summer * tx,
                "water": 0.05 + 0.15 * summer}  # fmt: skip
    if k == K["WAT"]:  # turbidity per water body, algal blooms in some lakes
        bloom = 0.015 + 0.04 * (md > 0.85) * fr
        return {"water": 1 - tx, "soil": tx, "green": bloom * bump(t, 150, 250, 15) * one}
    if k == K["RSF"]:  # asphalt plus verge (roads are narrower than a pixel)
        v = 1 - tx
        return {"asphalt": tx, "green": v * 0.6 * (0.6 + 0.4 * bump(t, 90, 300, 15)), "soil": v * 0.4}
    if k == K["CUF"]:  # terraced roofs and streets, some lined with trees
        trees = md < 0.4
        return _urban(t, tx, t2, roofs=(0.55, 0.25), paved=0.75 - 0.25 * trees, tree=0.15 + 0.25 * trees)
    if k == K["DUF"]:  # houses in gardens: lawns, trees, paved drives
        return _urban(t, tx, t2, roofs=(0.6, 0.25), paved=0.08 + 0.3 * (md < 0.3), tree=0.15 + 0.5 * fr)
    if k == K["ICU"]:  # large roofs (more of them bright metal) on car parks and yards, a few lawns
        return _urban(t, tx, t2, roofs=(0.45, 0.25), paved=0.9 - 0.3 * fr * (md < 0.4), tree=0.03 * one)
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
        ab = _profile(int(k), t, *(st[n][m] for n in ("shift", "amp", "tex", "tex2", "frac", "mode")))
        for name, val in ab.items():
            A[EM[name]][m] = val
    # within-class variability: per-pixel vegetation vigour, soil moisture / lithology
    A[EM["green"]] *= 1 + 0.2 * st["pvar"]
    soil = np.where(cls == K["WAT"], 1.0, st["soil"])  # (turbidity is set per water body already)
    for name in MINERAL:
        A[EM[name]] *= soil
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
