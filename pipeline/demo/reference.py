"""Demo reference polygons: as dense as the national databases, eroded, imbalanced, slightly wrong.

Why like this: operational reference data (Stoian et al. 2019, section 2.2-2.3) are a fusion of
existing databases, each as dense as its source: the LPIS declares most farm parcels, the forest
database most stands, the urban and water layers most of their objects, while natural classes come
from generalised CLC-like layers and are sparser (:data:`SOURCE_DENSITY`). Polygons sit inside
objects without following their boundaries, classes are imbalanced (the landscape's own proportions
times each source's density), some classes are missing on some tiles, and labels are sometimes out
of date. A demo whose reference were exact would let a classifier look better than it will on real
data; one far sparser than the real layers (the 8 % of Table 1's shares it once had) starves the
patch-based networks in a way real national data do not (issue 10, docs/networks.md).

Sampling: every object (parcel, block, stand, per-cell piece of sea, rock, glacier, road...) of
every 320 m macro cell is a candidate; its pixels inside the cell are eroded by one pixel
(8-connected, so a polygon never touches the object's boundary nor a neighbouring polygon; but a
share of the polygons of generalised-database classes keep the object's full outline, boundary
pixels included, as real CLC-derived polygons do not follow the ground exactly) and
the largest remaining blob becomes a polygon. Candidates are then drawn class by class, in hash
order, until each class reaches its share of ``reference_share`` (Table 1 proportions), with a
minimum number of (small, cropped) polygons for the rare classes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio.features
from affine import Affine
from scipy import ndimage
from shapely.geometry import Polygon, box, shape

from pipeline.demo.landscape import CELL, CLASS_NAMES, Country, K, render_static
from pipeline.demo.noise import name_key, uniform
from pipeline.io.atomic import atomic_path

log = logging.getLogger(__name__)

# Share of each class's area that its source database labels (relative weights; the run's
# ``reference_share`` scales them): LPIS crops, forest stands, urban fabric and water mostly
# declared, roads as thin lines, natural classes from generalised land-cover layers.
SOURCE_DENSITY = {
    "ASC": 0.8, "AWC": 0.8, "IGL": 0.8, "ORC": 0.6, "VIN": 0.6, "BLF": 0.6, "COF": 0.6, "CUF": 0.5,
    "DUF": 0.5, "ICU": 0.5, "RSF": 0.25, "WAT": 0.5, "NGL": 0.3, "WOM": 0.3, "BDS": 0.3, "BRO": 0.3,
    "GPS": 0.3,
}  # fmt: skip
# Plausible out-of-date labels: crop rotation, meadow ploughed, clear-cut replanted, glacier retreat...
CONFUSION = {
    "ASC": "AWC", "AWC": "ASC", "IGL": "ASC", "BLF": "COF", "COF": "BLF", "NGL": "WOM", "WOM": "NGL",
    "CUF": "DUF", "DUF": "CUF", "ICU": "DUF", "VIN": "ORC", "ORC": "VIN", "GPS": "BRO", "BRO": "NGL",
    "BDS": "NGL",
}  # fmt: skip
MIN_POLYGONS = 6  # per class present: enough for a 67/33 polygon split
# Classes whose reference comes from generalised land-cover databases (CLC-like, seed section 2.2):
# a share of their polygons follows the object's outline without the inward buffer, so it holds
# the mixed pixels of its boundary (roads, gardens, neighbouring stands seen through the PSF).
GENERALISED = ("CUF", "DUF", "ICU", "NGL", "WOM", "BRO", "BLF", "COF")
LOOSE_SHARE = 0.25
MIN_PX = 4
_POOL, _NOISE, _ORDER, _LOOSE = (name_key(n) for n in ("ref-pool", "ref-noise", "ref-order", "ref-loose"))
_GEN = {K[n] for n in GENERALISED}
_EIGHT = np.ones((3, 3), bool)


@dataclass
class Candidate:
    cls: int
    area: float  # px
    geom: Polygon
    order: float


def class_areas(c: Country, step: int = 4) -> np.ndarray:
    """Approximate area (px) of each class in the country, from a 1/step^2 subsample of the truth."""
    gy = np.arange(c.gy0, c.gy0 + c.height, step, dtype=np.int64)
    gx = np.arange(c.gx0, c.gx0 + c.width, step, dtype=np.int64)
    counts = np.zeros(len(CLASS_NAMES))
    for r in range(0, len(gy), 256):
        cls = render_static(c, gy[r : r + 256], gx)["cls"]
        counts += np.bincount(cls.ravel(), minlength=len(CLASS_NAMES))
    return counts * step * step


def targets(c: Country, areas: np.ndarray) -> np.ndarray:
    """Reference area (px) wanted per class: each class's area times its source's density, scaled so
    the whole reference covers ``reference_share`` of the country."""
    w = np.array([SOURCE_DENSITY[n] for n in CLASS_NAMES]) * np.asarray(areas, dtype=np.float64)
    total = c.reference_share * c.width * c.height
    return total * w / w.sum()


def _polygon(mask: np.ndarray, transform: Affine) -> Polygon | None:
    """The largest blob of ``mask`` as a polygon on pixel edges, lightly simplified."""
    lab, n = ndimage.label(mask, structure=_EIGHT)
    if n == 0:
        return None
    if n > 1:
        sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
        mask = lab == (1 + int(np.argmax(sizes)))
    found = rasterio.features.shapes(mask.astype(np.uint8), mask=mask, transform=transform)
    geoms = [shape(g) for g, _ in found]
    if not geoms:
        return None
    poly = max(geoms, key=lambda g: g.area)
    simple = poly.simplify(3.0)  # < half a pixel: pixel centres stay on their side
    if isinstance(simple, Polygon) and simple.is_valid and not simple.is_empty:
        poly = simple
    return poly


def candidates(c: Country, pool_p: np.ndarray) -> list[Candidate]:
    """Eroded per-cell object polygons, each kept with its class's pool probability (memory bound)."""
    out: list[Candidate] = []
    gx = np.arange(c.gx0, c.gx0 + c.width, dtype=np.int64)
    cy_first, cy_last = c.gy0 // CELL, (c.gy0 + c.height - 1) // CELL
    for cy in range(cy_first, cy_last + 1):
        r0, r1 = max(c.gy0, cy * CELL), min(c.gy0 + c.height, (cy + 1) * CELL)
        gy = np.arange(r0, r1, dtype=np.int64)
        st = render_static(c, gy, gx)
        cls_s, obj_s = st["cls"], st["obj"]
        cx_first, cx_last = c.gx0 // CELL, (c.gx0 + c.width - 1) // CELL
        for cx in range(cx_first, cx_last + 1):
            c0, c1 = max(c.gx0, cx * CELL) - c.gx0, min(c.gx0 + c.width, (cx + 1) * CELL) - c.gx0
            obj = obj_s[:, c0:c1]
            cls = cls_s[:, c0:c1]
            keys, first = np.unique(obj, return_index=True)
            for o, f in zip(keys, first, strict=True):
                k = int(cls.flat[f])
                draw = float(uniform(c.key, _POOL, o, cy, cx))
                if draw >= pool_p[k]:
                    continue
                mask = obj == o
                loose = k in _GEN and float(uniform(c.key, _LOOSE, o, cy, cx)) < LOOSE_SHARE
                if k != K["RSF"] and not loose:  # roads are 1-2 px wide: the polygon is the road itself
                    mask = ndimage.binary_erosion(mask, structure=_EIGHT, border_value=0)
                if mask.sum() < MIN_PX:
                    continue
                transform = Affine(10.0, 0.0, (c.gx0 + c0) * 10.0, 0.0, -10.0, -r0 * 10.0)
                poly = _polygon(mask, transform)
                if poly is None or poly.area < MIN_PX * 100:
                    continue
                out.append(Candidate(k, poly.area / 100.0, poly, float(uniform(c.key, _ORDER, o, cy, cx))))
    return out


def _crop(poly: Polygon, px: float) -> Polygon:
    """A pixel-aligned square of ~``px`` pixels inside ``poly`` (rare classes get small polygons)."""
    side = max(2, int(round(np.sqrt(px))))
    p = poly.representative_point()
    x0 = np.floor(p.x / 10.0) * 10.0 - (side // 2) * 10.0
    y0 = np.floor(p.y / 10.0) * 10.0 - (side // 2) * 10.0
    cut = poly.intersection(box(x0, y0, x0 + side * 10.0, y0 + side * 10.0))
    if not isinstance(cut, Polygon):
        parts = [g for g in getattr(cut, "geoms", []) if isinstance(g, Polygon)]
        cut = max(parts, key=lambda g: g.area) if parts else poly
    return cut if cut.area >= MIN_PX * 100 else poly


def select(c: Country, cands: list[Candidate], want: np.ndarray) -> list[Candidate]:
    """Draw candidates per class up to its target, at least ``MIN_POLYGONS`` each; refill shortfalls."""
    by_cls: dict[int, list[Candidate]] = {}
    for cand in sorted(cands, key=lambda x: x.order):
        by_cls.setdefault(cand.cls, []).append(cand)
    chosen: dict[int, list[Candidate]] = {k: [] for k in by_cls}
    got = dict.fromkeys(by_cls, 0.0)
    nxt = dict.fromkeys(by_cls, 0)
    goal = {k: float(want[k]) for k in by_cls}
    total = float(want.sum())
    for _ in range(4):
        for k, lst in by_cls.items():
            while nxt[k] < len(lst):
                n_sel = len(chosen[k])
                if got[k] >= goal[k] and n_sel >= MIN_POLYGONS:
                    break
                cand = lst[nxt[k]]
                nxt[k] += 1
                if n_sel < MIN_POLYGONS and got[k] + cand.area > goal[k]:
                    budget = max(MIN_PX, (goal[k] - got[k]) / (MIN_POLYGONS - n_sel))
                    geom = _crop(cand.geom, budget)
                    cand = Candidate(k, geom.area / 100.0, geom, cand.order)
                elif n_sel >= MIN_POLYGONS and got[k] + cand.area > 1.25 * goal[k]:
                    continue  # too big for what is left: look for a smaller one
                chosen[k].append(cand)
                got[k] += cand.area
        short = total - sum(got.values())
        open_ = {k: goal[k] for k in by_cls if nxt[k] < len(by_cls[k])}
        if short <= 0.03 * total or not open_:
            break
        scale = sum(open_.values())
        for k, g in open_.items():
            goal[k] = g + short * g / scale
    return [x for lst in chosen.values() for x in lst]


def build_reference(c: Country) -> tuple[list[Polygon], list[int], list[int]]:
    """(polygons, class indices as labelled, class indices as true) for the whole country."""
    areas = class_areas(c)
    want = targets(c, areas)
    # keep ~4x the needed candidates (all for small countries): bounds memory on full tiles
    pool_p = np.where(areas > 0, np.clip(4 * want / np.maximum(0.5 * areas, 1), 0, 1), 0)
    rare = np.minimum(1.0, 200.0 * MIN_POLYGONS / np.maximum(areas, 1))
    pool_p = np.where(want > 0, np.maximum(pool_p, rare), 0.0)
    if c.width * c.height <= 4096 * 4096 // 4:
        pool_p[:] = 1.0
    cands = candidates(c, pool_p)
    sel = select(c, cands, want)
    sel.sort(key=lambda x: (-x.geom.bounds[3], x.geom.bounds[0]))  # north to south, west to east
    true = [x.cls for x in sel]
    labels = list(true)
    order = np.argsort([float(uniform(c.key, _NOISE, i)) for i in range(len(sel))], kind="stable")
    n_noisy = int(round(c.label_noise * len(sel)))
    flipped = 0
    for i in order:
        if flipped >= n_noisy:
            break
        name = CLASS_NAMES[true[i]]
        if name in CONFUSION:
            labels[i] = K[CONFUSION[name]]
            flipped += 1
    return [x.geom for x in sel], labels, true


def write_reference(c: Country, path: Path) -> int:
    """Write the reference GeoPackage (layer ``reference``: code, name, id, geometry) atomically."""
    import geopandas as gpd

    geoms, labels, true = build_reference(c)
    df = gpd.GeoDataFrame(
        {
            "code": np.array([int(c.codes[k]) for k in labels], dtype=np.int32),
            "name": [CLASS_NAMES[k] for k in labels],
            "id": np.arange(1, len(geoms) + 1, dtype=np.int64),
        },
        geometry=geoms,
        crs=f"EPSG:{c.epsg}",
    )
    with atomic_path(path) as tmp:
        df.to_file(tmp, driver="GPKG", layer="reference", engine="pyogrio")
    area = sum(g.area for g in geoms) / 100.0
    log.info(
        "reference: %d polygons over %.1f %% of the area, %d with an out-of-date label -> %s",
        len(geoms),
        100 * area / (c.width * c.height),
        sum(a != b for a, b in zip(labels, true, strict=True)),
        path,
    )
    return len(geoms)
