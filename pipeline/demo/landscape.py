"""The demo country's ground: a procedural landscape that is a pure function of world coordinates.

Why procedural and world-based: the landscape must be renderable one window at a time (a full
10980 px tile never fits a date in memory), identical in the overlap strip of neighbouring tiles,
and the same for the reflectance renderer, the reference-polygon sampler and the QA truth map.

Structure (west to east, zones scale with the country's width so any country size holds them all):

* sea (WAT) with a wavy coast, a strip of beach and dunes (BDS), coastal pine plantations;
* a plain of fields (ASC, AWC, IGL, a few orchards ORC and vineyards VIN), broadleaf woods, a
  capital town plus hashed towns: dense core (CUF), residential ring (DUF), industrial zones (ICU);
* hills: forests (BLF, COF), meadows, vineyards, villages, moorland (WOM);
* mountains: elevation bands of conifers, moorland, natural grassland (NGL), bare rock (BRO) and
  glaciers (GPS) on the highest ground;
* everywhere: lakes, a river flowing west to the sea, and a road network (RSF, 1-2 px wide).

Objects are physical in size (10 m pixels): 320 m macro cells are split by a hashed binary space
partition into parcels / stands / blocks of 40-320 m. Natural classes in the mountains follow
noise-driven elevation bands instead of rectangles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from pipeline.demo.noise import fbm, hash_keys, mix, name_key, uniform, value_noise, value_noise_1d
from pipeline.errors import PipelineError
from pipeline.io.tilestore import Grid

# Class names of the seed (Stoian et al. 2019, section 2.2); codes come from the config nomenclature.
CLASS_NAMES = (
    "CUF", "DUF", "ICU", "RSF", "ASC", "AWC", "IGL", "ORC", "VIN",
    "BLF", "COF", "NGL", "WOM", "BDS", "BRO", "GPS", "WAT",
)  # fmt: skip
K = {n: i for i, n in enumerate(CLASS_NAMES)}

CELL = 32  # macro cell side (px): 320 m, subdivided into parcels
RELIEF_M = 900.0  # metres per unit of relative elevation for the terrain slopes (illumination)
TOWN = 12  # town lattice (cells): one candidate town per 3.84 km square

# purpose keys, so that independent random decisions never share a hash stream
_P = {
    n: name_key(n)
    for n in (
        "warp", "elev", "cell", "bsp", "forest", "town", "veg", "veg2", "rock", "sea", "dune", "lake",
        "river", "vroad", "hroad", "house", "tex", "pvar", "nat", "coast", "capital", "soil", "moist",
        "region", "frac", "tree", "mode",
    )
}  # fmt: skip

# Zones (per macro cell) and the parcel class mix drawn in each.
Z_COAST, Z_PLAIN, Z_HILLS, Z_FOREST, Z_MOUNT = range(5)
_ZONE_MIX = {
    Z_COAST: {"COF": 0.45, "IGL": 0.15, "ASC": 0.2, "BLF": 0.1, "AWC": 0.1},
    Z_PLAIN: {"ASC": 0.29, "AWC": 0.31, "IGL": 0.22, "BLF": 0.06, "ORC": 0.045, "VIN": 0.045, "COF": 0.02},
    Z_HILLS: {"BLF": 0.3, "COF": 0.14, "IGL": 0.2, "VIN": 0.08, "ORC": 0.06, "WOM": 0.08, "ASC": 0.05,
              "AWC": 0.09},
    Z_FOREST: {"BLF": 0.75, "COF": 0.2, "IGL": 0.05},
}  # fmt: skip


def _cum_table() -> np.ndarray:
    """Cumulative class probabilities per parcel zone, shape (zones, classes)."""
    tab = np.zeros((len(_ZONE_MIX), len(CLASS_NAMES)))
    for z, mix_ in _ZONE_MIX.items():
        for name, p in mix_.items():
            tab[z, K[name]] = p
        tab[z] /= tab[z].sum()
    return np.cumsum(tab, axis=1)


_CUM = _cum_table()


@dataclass(frozen=True)
class TileSpec:
    """A demo tile. ``grid`` is where its ground is rendered (the country's CRS); a tile given its
    own ``epsg`` (another UTM zone) has its products written on :attr:`product_grid` instead."""

    name: str
    fmt: str
    index: int
    grid: Grid
    epsg: int | None = None

    @cached_property
    def product_grid(self) -> Grid:
        if self.epsg is None or CRS.from_epsg(self.epsg) == self.grid.crs:
            return self.grid
        from pipeline.demo.zones import zone_grid

        return zone_grid(self.grid, self.epsg)


@dataclass(frozen=True)
class Country:
    """Everything that defines the demo country; built from the config's ``demo`` section."""

    seed: int
    epsg: int
    origin: tuple[float, float]
    size: int
    overlap: int
    year: int
    tile_specs: tuple[tuple[str, str] | tuple[str, str, int | None], ...]  # name, format[, epsg]
    cloud_cover: float = 0.25
    label_noise: float = 0.03
    reference_share: float = 0.45
    out: Path = Path("demo")
    codes: tuple[int, ...] = field(default=tuple(range(1, 18)))
    window: int = 512

    @classmethod
    def from_config(cls, cfg: Any) -> Country:
        """Read ``cfg['demo']`` and map the 17 class names onto the nomenclature's codes."""
        demo = cfg["demo"] if cfg.get("demo") is not None else None
        if demo is None:
            raise PipelineError(None, "config has no 'demo' section: nothing to generate")
        by_name = {c.name: c.code for c in cfg.classes}
        missing = [n for n in CLASS_NAMES if n not in by_name]
        if missing:
            raise PipelineError(None, f"demo needs nomenclature classes {', '.join(missing)} (by name)")
        return cls(
            seed=int(demo.get("seed", 7)),
            epsg=int(demo.get("epsg", 32631)),
            origin=(float(demo.get("origin", [399960, 4800000])[0]), float(demo.get("origin")[1])),
            size=int(demo.get("size", 320)),
            overlap=int(demo.get("overlap", 16)),
            year=int(demo.get("year", 2018)),
            tile_specs=tuple((t["name"], t.get("format", "theia"), t.get("epsg")) for t in demo["tiles"]),
            cloud_cover=float(demo.get("cloud_cover", 0.25)),
            label_noise=float(demo.get("label_noise", 0.03)),
            reference_share=float(demo.get("reference_share", 0.45)),
            out=Path(demo["out"]),
            codes=tuple(by_name[n] for n in CLASS_NAMES),
            window=int(demo.get("window", 512)),
        )

    def __post_init__(self) -> None:
        ox, oy = self.origin
        if ox % 10 or oy % 10:
            raise PipelineError(None, f"demo.origin {self.origin} is not on the 10 m pixel lattice")
        if self.size % 2 or self.overlap % 2:
            raise PipelineError(None, "demo.size and demo.overlap must be even (20 m bands align on 2x2 px)")
        if self.overlap >= self.size:
            raise PipelineError(None, "demo.overlap must be smaller than demo.size")
        if self.window % 2 or self.window < 16:
            raise PipelineError(None, "demo.window must be even and >= 16")
        names = [n for n, *_ in self.tile_specs]
        if len(set(names)) != len(names):
            raise PipelineError(None, "demo.tiles has duplicate names")

    # ---- geometry -------------------------------------------------------------------------
    @property
    def gx0(self) -> int:
        """World column index (x / 10 m) of the country's west edge."""
        return int(round(self.origin[0] / 10))

    @property
    def gy0(self) -> int:
        """World row index (-y / 10 m) of the country's north edge."""
        return int(round(-self.origin[1] / 10))

    @property
    def width(self) -> int:
        return self.size + (len(self.tile_specs) - 1) * (self.size - self.overlap)

    @property
    def height(self) -> int:
        return self.size

    @cached_property
    def tiles(self) -> tuple[TileSpec, ...]:
        crs = CRS.from_epsg(self.epsg)
        out = []
        for k, (name, fmt, *zone) in enumerate(self.tile_specs):
            epsg = zone[0] if zone else None
            ulx = self.origin[0] + k * (self.size - self.overlap) * 10
            grid = Grid(crs, Affine(10.0, 0.0, ulx, 0.0, -10.0, self.origin[1]), self.size, self.size)
            out.append(TileSpec(name, fmt, k, grid, epsg))
        return tuple(out)

    @cached_property
    def country_grid(self) -> Grid:
        """The union of all tiles (they share rows): used to sample reference polygons once."""
        return Grid(
            CRS.from_epsg(self.epsg),
            Affine(10.0, 0.0, self.origin[0], 0.0, -10.0, self.origin[1]),
            self.width,
            self.height,
        )

    @cached_property
    def code_lut(self) -> np.ndarray:
        return np.array(self.codes, dtype=np.uint8)

    @property
    def key(self) -> int:
        return self.seed


def world_axes(grid: Grid, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """1-D world row and column indices (``-y/10``, ``x/10``) of a window's pixels."""
    t = grid.transform
    if abs(t.a - 10) > 1e-9 or abs(t.e + 10) > 1e-9 or t.b or t.d:
        raise PipelineError(None, "demo grids must be north-up 10 m grids")
    c0 = int(round(t.c / 10)) + int(window.col_off)
    r0 = int(round(-t.f / 10)) + int(window.row_off)
    return (
        np.arange(r0, r0 + int(window.height), dtype=np.int64),
        np.arange(c0, c0 + int(window.width), dtype=np.int64),
    )


# ---- zone fields --------------------------------------------------------------------------


def _warp_u(c: Country, gy: np.ndarray, gx: np.ndarray) -> np.ndarray:
    """West-east zone coordinate (0 west edge, 1 east edge), warped so zone borders meander."""
    u = (gx + 0.5 - c.gx0) / c.width
    return (u[None, :] + 0.05 * (fbm(gy, gx, 96, 2, c.key, _P["warp"]) - 0.5)).astype(np.float32)


def _elevation(c: Country, gy: np.ndarray, gx: np.ndarray, wu: np.ndarray) -> np.ndarray:
    """Relative elevation: 0 in the lowlands, rising east of u~0.55 to ~1 on the eastern ridge."""
    ramp = np.clip((wu - 0.55) / 0.42, 0.0, 1.15)
    relief = fbm(gy, gx, 64, 3, c.key, _P["elev"]) - 0.5
    return (ramp + 0.45 * relief * np.minimum(1.0, ramp * 3.0)).astype(np.float32)


def _coast(c: Country, gy: np.ndarray) -> np.ndarray:
    """Zone coordinate of the coast line for each row (wavy, ~8 % of the width from the west edge)."""
    return 0.075 + 0.03 * (value_noise_1d(gy, 90, c.key, _P["coast"]) - 0.5) * 2


# ---- per-cell decisions -------------------------------------------------------------------


def _bsp_tables(c: Country, cys: np.ndarray, cxs: np.ndarray) -> dict[str, np.ndarray]:
    """Binary space partition of each macro cell into up to 8 parcels (heap-numbered nodes)."""
    shape = (len(cys), len(cxs))
    CY, CX = cys[:, None], cxs[None, :]
    split = np.zeros((16,) + shape, bool)
    axis_x = np.zeros((16,) + shape, bool)
    pos = np.zeros((16,) + shape, np.int16)
    bx0 = np.zeros((16,) + shape, np.int16)
    by0 = np.zeros((16,) + shape, np.int16)
    bx1 = np.full((16,) + shape, CELL, np.int16)
    by1 = np.full((16,) + shape, CELL, np.int16)
    p_stop = (0.04, 0.3, 0.55)
    for n in range(1, 8):
        depth = n.bit_length() - 1
        x0, x1, y0, y1 = bx0[n], bx1[n], by0[n], by1[n]
        wdt, hgt = x1 - x0, y1 - y0
        r_stop = uniform(c.key, _P["bsp"], CY, CX, n, 0)
        r_axis = uniform(c.key, _P["bsp"], CY, CX, n, 1)
        r_pos = uniform(c.key, _P["bsp"], CY, CX, n, 2)
        ax = (wdt > hgt) | ((wdt == hgt) & (r_axis < 0.5))
        length = np.where(ax, wdt, hgt)
        lo = np.where(ax, x0, y0)
        sp = (r_stop >= p_stop[depth]) & (length >= 10)
        cut = np.clip(np.round((0.3 + 0.4 * r_pos) * length), 4, np.maximum(4, length - 4))
        cut = lo + cut.astype(np.int16)
        split[n], axis_x[n], pos[n] = sp, ax, cut
        for child, right in ((2 * n, False), (2 * n + 1, True)):
            bx0[child], bx1[child], by0[child], by1[child] = x0, x1, y0, y1
            if right:
                bx0[child] = np.where(ax, cut, x0)
                by0[child] = np.where(ax, y0, cut)
            else:
                bx1[child] = np.where(ax, cut, x1)
                by1[child] = np.where(ax, y1, cut)
    ckey = hash_keys(c.key, _P["cell"], CY, CX)
    pkey = hash_keys(ckey[None], np.arange(16).reshape(16, 1, 1))
    return {"split": split, "axis_x": axis_x, "pos": pos, "x0": bx0, "y0": by0, "x1": bx1, "y1": by1,
            "pkey": pkey}  # fmt: skip


def _towns(c: Country, cys: np.ndarray, cxs: np.ndarray, zone_u_c: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per cell: normalised distance to the nearest town centre (<1 = urban) and whether it is the capital.

    Towns sit on a 3.84 km lattice with hashed centres and radii; a capital town is always placed
    at 30 % of the country's width so that even a tiny country has CUF, DUF and ICU.
    """
    ccy = cys[:, None] + 0.5
    ccx = cxs[None, :] + 0.5
    best = np.full((len(cys), len(cxs)), np.inf)
    east = np.zeros_like(best, dtype=bool)
    ty0, tx0 = np.floor(ccy / TOWN).astype(np.int64), np.floor(ccx / TOWN).astype(np.int64)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            ty, tx = ty0 + dy, tx0 + dx
            cy_t = (ty + 0.2 + 0.6 * uniform(c.key, _P["town"], ty, tx, 0)) * TOWN
            cx_t = (tx + 0.2 + 0.6 * uniform(c.key, _P["town"], ty, tx, 1)) * TOWN
            u_t = (cx_t * CELL - c.gx0) / c.width
            p = np.where((u_t > 0.15) & (u_t < 0.5), 0.7, np.where((u_t >= 0.5) & (u_t < 0.66), 0.4, 0.0))
            exists = uniform(c.key, _P["town"], ty, tx, 2) < p
            radius = np.where(u_t < 0.5, 1.2 + 1.8 * uniform(c.key, _P["town"], ty, tx, 3), 0.9)
            d = np.hypot(ccy - cy_t, ccx - cx_t) / radius
            best = np.where(exists & (d < best), d, best)
    # the capital: centred on a cell centre so its core is always at least one CUF cell
    cap_cx = np.floor((c.gx0 + 0.3 * c.width) / CELL) + 0.5
    cap_cy = np.floor((c.gy0 + 0.5 * c.height) / CELL) + 0.5
    cap_r = float(np.clip(0.09 * c.width / CELL, 2.2, 4.0))
    d = np.hypot(ccy - cap_cy, ccx - cap_cx) / cap_r
    capital = d < best
    best = np.minimum(best, d)
    east = capital & (np.abs(ccy - cap_cy) < 0.6) & (ccx - cap_cx > 0.6) & (d < 1)
    return best, east


# ---- the static render --------------------------------------------------------------------


def render_static(c: Country, gy: np.ndarray, gx: np.ndarray) -> dict[str, np.ndarray]:
    """Everything about the ground that does not change with the date, for world rows ``gy`` x cols ``gx``.

    Returns ``cls`` (index into :data:`CLASS_NAMES`), ``obj`` (object key: parcel, block, stand,
    per-cell piece of sea/rock/glacier...), ``elev``, ``tex``/``tex2`` (class-specific sub-pixel
    texture: roof fraction, tree rows...), ``pvar`` (fixed per-pixel variability), ``shift``
    (phenology shift, days) and ``amp`` (phenology amplitude) per pixel.
    """
    h, w = len(gy), len(gx)
    key = c.key
    # elevation on one more row and column: forward differences give the terrain slope per pixel
    gye, gxe = np.append(gy, gy[-1] + 1), np.append(gx, gx[-1] + 1)
    elev_e = _elevation(c, gye, gxe, _warp_u(c, gye, gxe))
    wu = _warp_u(c, gy, gx)
    elev = elev_e[:h, :w]
    dzdx = (elev_e[:h, 1:] - elev) * (RELIEF_M / 10.0)  # east-going slope (m/m)
    dzdy = (elev_e[1:, :w] - elev) * (RELIEF_M / 10.0)  # south-going slope (m/m)

    # macro cells
    cx, cy = gx // CELL, gy // CELL
    lx, ly = (gx % CELL).astype(np.int16), (gy % CELL).astype(np.int16)
    cxs, cys = np.unique(cx), np.unique(cy)
    rx, ry = cx - cxs[0], cy - cys[0]
    cxs = np.arange(cxs[0], cxs[-1] + 1)
    cys = np.arange(cys[0], cys[-1] + 1)
    gxc, gyc = cxs * CELL + CELL // 2, cys * CELL + CELL // 2
    wu_c = _warp_u(c, gyc, gxc)
    el_c = _elevation(c, gyc, gxc, wu_c)
    forest_c = value_noise(gyc, gxc, 5 * CELL, key, _P["forest"])
    zone_c = np.full(wu_c.shape, Z_PLAIN, np.int8)
    zone_c[forest_c > 0.7] = Z_FOREST
    zone_c[wu_c < _coast(c, gyc)[:, None] + 0.07] = Z_COAST
    zone_c[(wu_c >= 0.5) & (el_c < 0.3)] = Z_HILLS
    zone_c[(wu_c >= 0.5) & (forest_c > 0.62) & (el_c < 0.3)] = Z_FOREST
    mountain_c = el_c >= 0.3
    town_d, ind_c = _towns(c, cys, cxs, wu_c)
    urban_c = (town_d < 1.0) & ~mountain_c & (wu_c > _coast(c, gyc)[:, None] + 0.03)

    # parcels: walk each pixel down its cell's BSP tree
    t = _bsp_tables(c, cys, cxs)
    RY, RX = ry[:, None], rx[None, :]
    LX, LY = lx[None, :], ly[:, None]
    node = np.ones((h, w), np.int64)
    for _ in range(3):
        sp = t["split"][node, RY, RX]
        coord = np.where(t["axis_x"][node, RY, RX], LX, LY)
        node = np.where(sp, 2 * node + (coord >= t["pos"][node, RY, RX]), node)
    pkey = t["pkey"][node, RY, RX]
    r_cls = (pkey >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
    zone = zone_c[RY, RX]
    cls = (r_cls[..., None] > _CUM[np.minimum(zone, Z_FOREST)]).sum(-1).astype(np.uint8)
    cls = np.minimum(cls, len(CLASS_NAMES) - 1).astype(np.uint8)
    obj = pkey.copy()

    # towns: classes by distance to the centre, industrial clusters per cell
    urb = urban_c[RY, RX]
    if urb.any():
        d = town_d[RY, RX]
        ind_cell = (uniform(key, _P["town"], cys[:, None], cxs[None, :], 9) < 0.22) | ind_c
        ind = ind_cell[RY, RX] & (d >= 0.4)
        r2 = uniform(pkey, 5)
        ucls = np.where(d < 0.4, np.where(r2 < 0.9, K["CUF"], K["ICU"]), K["DUF"])
        ucls = np.where(ind & (r2 < 0.85), K["ICU"], ucls)
        ucls = np.where((d >= 0.4) & ~ind & (r2 > 0.93), K["IGL"], ucls)  # parks
        cls = np.where(urb, ucls, cls).astype(np.uint8)

    # mountains: natural vegetation in noisy elevation bands, then rock and glaciers
    mnt = mountain_c[RY, RX]
    if mnt.any():
        ev = elev + 0.25 * (fbm(gy, gx, 24, 2, key, _P["veg"]) - 0.5)
        n2 = fbm(gy, gx, 16, 2, key, _P["veg2"])
        nat = np.where(
            ev < 0.42,
            np.where(n2 < 0.36, K["BLF"], np.where(n2 > 0.62, K["IGL"], K["COF"])),
            np.where(
                ev < 0.58,
                np.where(n2 < 0.5, K["COF"], K["WOM"]),
                np.where(ev < 0.74, np.where(n2 < 0.45, K["WOM"], K["NGL"]), K["NGL"]),
            ),
        )
        nat_obj = hash_keys(key, _P["nat"], cy[:, None], cx[None, :], nat)
        # meadows in the lower mountains keep their parcel keys (mown fields), the rest is per cell
        cls = np.where(mnt, nat, cls).astype(np.uint8)
        obj = np.where(mnt & (nat != K["IGL"]), nat_obj, obj)
    rock = 0.8 + 0.1 * (fbm(gy, gx, 12, 2, key, _P["rock"]) - 0.5)
    is_gps = elev > rock + 0.15
    is_bro = (elev > rock) & ~is_gps
    cls[is_bro] = K["BRO"]
    cls[is_gps] = K["GPS"]
    cell_obj = hash_keys(key, cy[:, None], cx[None, :])
    obj = np.where(is_bro, mix(cell_obj ^ np.uint64(_P["rock"] & 0xFFFFFFFF)), obj)
    obj = np.where(is_gps, mix(cell_obj ^ np.uint64(_P["nat"] & 0xFFFFFFFF)), obj)

    # lakes: a hashed ellipse in some lowland cells
    lake_c = (uniform(key, _P["lake"], cys[:, None], cxs[None, :], 0) < 0.035) & ~mountain_c & ~urban_c
    lake_c &= zone_c != Z_COAST
    if lake_c.any():
        lk = lake_c[RY, RX]
        ccy, ccx = cys[:, None] * CELL + 16, cxs[None, :] * CELL + 16
        oy = (ccy + 8 * (uniform(key, _P["lake"], cys[:, None], cxs[None, :], 1) - 0.5))[RY, RX]
        ox = (ccx + 8 * (uniform(key, _P["lake"], cys[:, None], cxs[None, :], 2) - 0.5))[RY, RX]
        ry_ = (6 + 6 * uniform(key, _P["lake"], cys[:, None], cxs[None, :], 3) + 0 * ccx)[RY, RX]
        rx_ = (6 + 7 * uniform(key, _P["lake"], cys[:, None], cxs[None, :], 4) + 0 * ccy)[RY, RX]
        wob = 0.8 + 0.4 * value_noise(gy, gx, 6, key, _P["lake"])
        inside = ((gy[:, None] + 0.5 - oy) / ry_) ** 2 + ((gx[None, :] + 0.5 - ox) / rx_) ** 2 < wob**2
        lake = lk & inside
        cls[lake] = K["WAT"]
        obj = np.where(lake, mix(cell_obj ^ np.uint64(_P["lake"] & 0xFFFFFFFF)), obj)

    # river: meanders from the mountains to the sea, wider downstream
    u = (gx + 0.5 - c.gx0) / c.width
    centre = c.gy0 + c.height * (0.3 + 0.4 * value_noise_1d(gx, 140, key, _P["river"]))
    half = (1.0 + 2.0 * np.clip(1 - u, 0, 1)) / 2 + 0.01
    riv = (np.abs(gy[:, None] + 0.5 - centre[None, :]) <= half[None, :]) & (u < 0.8)[None, :] & (elev < 0.6)
    cls[riv] = K["WAT"]
    obj = np.where(riv, mix(cell_obj ^ np.uint64(_P["river"] & 0xFFFFFFFF)), obj)

    # roads on cell edges: some straight country roads, every street edge in towns
    vr = uniform(key, _P["vroad"], cx) < 0.22
    hr = uniform(key, _P["hroad"], cy) < 0.25
    vw = np.where(uniform(key, _P["vroad"], cx, 1) < 0.4, 2, 1)
    hw = np.where(uniform(key, _P["hroad"], cy, 1) < 0.4, 2, 1)
    road_v = (vr & (lx < vw))[None, :] | (urb & (LX == 0))
    road_h = (hr & (ly < hw))[:, None] | (urb & (LY == 0))
    coast = _coast(c, gy)[:, None]
    dist_px = (wu - coast) * c.width
    dune_px = 12 + 8 * value_noise_1d(gy, 50, key, _P["dune"])[:, None]
    sea = dist_px < 0
    dune = (dist_px >= 0) & (dist_px < dune_px)
    sea_or_dune = sea | dune
    road = (road_v | road_h) & ~sea_or_dune & (elev < 0.55) & (cls != K["WAT"])
    road &= ~((cls == K["WAT"]) & ~riv)
    robj = np.where(road_h, mix(cell_obj ^ np.uint64(_P["hroad"] & 0xFFFFFFFF)),
                    mix(cell_obj ^ np.uint64(_P["vroad"] & 0xFFFFFFFF)))  # fmt: skip
    cls[road] = K["RSF"]
    obj = np.where(road, robj, obj)
    rwidth = np.where(road_h, hw[:, None], vw[None, :]) * road

    # sea and dunes last: the coast line owns everything west of it
    dune &= ~riv  # the river cuts through the dunes to the sea
    cls[dune] = K["BDS"]
    obj = np.where(dune, mix(cell_obj ^ np.uint64(_P["dune"] & 0xFFFFFFFF)), obj)
    cls[sea] = K["WAT"]
    obj = np.where(sea, mix(cell_obj ^ np.uint64(_P["sea"] & 0xFFFFFFFF)), obj)

    # per-object phenology parameters, per-pixel variability and textures
    tex, tex2 = _textures(c, gy, gx, cls, obj, node, t, RY, RX, LX, LY, rwidth)
    var = _variability(c, gy, gx, cls, obj, elev)
    return {"cls": cls, "obj": obj, "elev": elev, "tex": tex, "tex2": tex2, "dzdx": dzdx.astype(np.float32),
            "dzdy": dzdy.astype(np.float32), **var}  # fmt: skip


# sowing / green-up spread between parcels of a class (days, full width): farmers do not sow on one day
_SHIFT_SPREAD = {"ASC": 56, "AWC": 36, "IGL": 40, "ORC": 24, "VIN": 20, "BLF": 20, "NGL": 30, "WOM": 24}
# how much a class's green-up is delayed at altitude (days per unit of relative elevation)
_ALTITUDE_DELAY = {"IGL": 60, "BLF": 55, "COF": 30, "NGL": 50, "WOM": 45, "ASC": 30, "AWC": 40, "ORC": 40,
                   "VIN": 40}  # fmt: skip


def _variability(c, gy, gx, cls, obj, elev) -> dict[str, np.ndarray]:
    """Within-class variability: what makes two parcels of one class differ as much as in reality.

    * ``shift`` (days): per-object sowing / green-up date, class-specific spread, delayed with
      altitude and by an eco-climatic regional field (the same class behaves differently across the
      country, seed section 2.2);
    * ``amp``: per-object vigour (irrigated maize vs dry sunflower, thin vs dense canopies), times a
      regional water-availability field;
    * ``pvar``: per-pixel variability (-1..1), fine-grained plus within-field patches;
    * ``soil``: soil brightness (x 0.55..1.45: moisture, organic matter, stones), per object and
      per patch;
    * ``frac``: per-object class-specific mixing fraction (conifers in a broadleaf stand, grass
      inter-rows of a vineyard, shrub cover of a moor, trees in DUF gardens...);
    * ``mode``: per-object management draw (fallow, double cropping, rapeseed, grazing, roof
      material...).
    """
    key = c.key
    region = fbm(gy, gx, 200, 2, key, _P["region"])  # eco-climatic gradient, ~+-1
    shift = (uniform(obj, 11) - 0.5).astype(np.float32)
    spread = np.zeros(len(CLASS_NAMES), np.float32)
    delay = np.zeros(len(CLASS_NAMES), np.float32)
    for n, v in _SHIFT_SPREAD.items():
        spread[K[n]] = v
    for n, v in _ALTITUDE_DELAY.items():
        delay[K[n]] = v
    shift = shift * spread[cls] + delay[cls] * np.clip(elev, 0, 1) + 18 * (region - 0.5)
    amp = (0.55 + 0.45 * uniform(obj, 12)) * (0.85 + 0.3 * region)
    patch = fbm(gy, gx, 8, 2, key, _P["moist"]) - 0.5  # within-field patches (soil, vigour)
    pvar = (0.6 * (uniform(key, _P["pvar"], gy[:, None], gx[None, :]) * 2 - 1) + 1.6 * patch).clip(-1, 1)
    soil = (0.55 + 0.9 * uniform(obj, 13)) * (1 + 0.5 * patch)
    frac = uniform(obj, _P["frac"]).astype(np.float32)
    mode = uniform(obj, _P["mode"]).astype(np.float32)
    return {"shift": shift.astype(np.float32), "amp": amp.astype(np.float32), "pvar": pvar.astype(np.float32),
            "soil": soil.astype(np.float32), "frac": frac, "mode": mode}  # fmt: skip


def _textures(c, gy, gx, cls, obj, node, t, RY, RX, LX, LY, rwidth):
    """Sub-pixel structure per class: what separates CUF / DUF / ICU, vineyards, orchards at 10 m."""
    key = c.key
    h, w = cls.shape
    tex = np.zeros((h, w), np.float32)
    tex2 = np.zeros((h, w), np.float32)
    fine = fbm(gy, gx, 4, 2, key, _P["tex"])
    ox = LX - t["x0"][node, RY, RX]  # px from the parcel's west edge
    oy = LY - t["y0"][node, RY, RX]
    r_o = uniform(obj, 21)  # per-object choice (orientation, period, material)
    r_p = uniform(key, _P["tex"], gy[:, None], gx[None, :])

    # urban: ``tex`` is the pixel's roof fraction (~0.84-1 on a building, ~0-0.12 elsewhere) and
    # ``tex2`` a material draw, per building on roofs and per pixel (per garden in DUF) elsewhere.
    # The three classes share the materials, roof pixels look alike in all three: what sets them
    # apart is the arrangement (block size, street pattern, gardens), as at 10 m in reality.
    on_roof = 0.84 + 0.16 * r_p
    off_roof = 0.12 * r_p
    ground = uniform(key, _P["tree"], gy[:, None], gx[None, :])  # ground cover draw per open pixel
    m = cls == K["CUF"]  # terraced blocks cut by 1 px streets, a few courtyards
    if m.any():
        period = 5 + (r_o * 4).astype(np.int64)
        street = (ox % period == period - 1) | (oy % (period + 1) == period) | (r_p < 0.06)
        tex[m] = np.where(street, off_roof, on_roof)[m]
        roof = uniform(obj, ox // period, oy // (period + 1))  # roof material draw per block
        tex2[m] = np.where(street, ground, roof)[m]

    m = cls == K["DUF"]  # detached houses (2x2 px) in gardens
    if m.any():
        house = uniform(key, _P["house"], gy[:, None] // 2, gx[None, :] // 2) < 0.3
        tex[m] = np.where(house, on_roof, off_roof)[m]
        # roof material per house, ground cover (lawn, tree, drive) per 2x2 garden block
        tex2[m] = uniform(key, _P["tree"], gy[:, None] // 2, gx[None, :] // 2)[m]

    m = cls == K["ICU"]  # large roofs on paved yards
    if m.any():
        bx, by = 9 + (r_o * 6).astype(np.int64), 7 + (uniform(obj, 22) * 5).astype(np.int64)
        mx, my = ox % (bx + 3), oy % (by + 3)
        building = (mx >= 1) & (mx <= bx) & (my >= 1) & (my <= by)
        tex[m] = np.where(building, on_roof, off_roof)[m]
        material = uniform(obj, ox // (bx + 3), oy // (by + 3))  # roof material draw per building
        tex2[m] = np.where(building, material, ground)[m]

    m = cls == K["VIN"]  # vine rows, 30 m period, orientation per parcel
    if m.any():
        coord = np.where(r_o < 0.5, ox, oy)
        tex[m] = (0.42 + 0.22 * np.cos(2 * np.pi * coord / 3.0))[m]

    m = cls == K["ORC"]  # tree grid
    if m.any():
        tex[m] = (0.25 + 0.3 * (ox % 3 == 1) + 0.3 * (oy % 3 == 1))[m]

    m = (cls == K["BLF"]) | (cls == K["COF"])  # canopy gaps
    tex[m] = (0.78 + 0.3 * fine)[m].clip(0, 1)
    m = (cls == K["WOM"]) | (cls == K["NGL"]) | (cls == K["BDS"]) | (cls == K["BRO"])  # patchy cover
    tex[m] = fbm(gy, gx, 6, 2, key, _P["tex"], 1)[m]
    m = cls == K["RSF"]
    tex[m] = np.where(rwidth >= 2, 0.85, 0.6)[m]
    m = cls == K["WAT"]  # turbidity per water body
    tex[m] = (0.01 + 0.07 * r_o)[m]
    return tex, tex2


def render_truth(grid: Grid, window: Window, country: Country) -> np.ndarray:
    """True class codes (config nomenclature) of ``window`` of ``grid``: for tests and QA, never an input."""
    gy, gx = world_axes(grid, window)
    return country.code_lut[render_static(country, gy, gx)["cls"]]
