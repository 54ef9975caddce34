"""Geometric QA (seed §4.3, §5.4): how well a map keeps the sharp corners of pixel-based maps.

**Corners of a class map.** The map is split into one binary mask per class; OpenCV's Line Segment
Detector (LSD, von Gioi et al.) finds straight segments in each mask; all classes' segments are
merged (segments shorter than ``min_length`` px are dropped: their direction is unreliable). A
*corner candidate* is an extremity P of a segment A lying within ``distance`` px of another segment
B; it sits at X, the crossing of A's and B's supporting lines, and must pass the angle rule:

- **L** (B does not run on past X by more than ``distance`` on both sides: the segments meet end to
  end): the angle between the arms X -> far end of A and X -> far end of B, in [0, 180] degrees
  (180: straight on), must lie in [``min_angle``, ``max_angle``]. ``max_angle`` is the seed's
  threshold ("their angle is smaller than a given threshold"); ``min_angle`` rejects the near-
  parallel pairs that the two classes of one boundary give (each boundary is found in both masks).
- **T** (B runs through X: A ends on B's side): the two angles at X are phi and 180 - phi (phi the
  acute angle between the lines); both must be <= ``max_angle``, i.e. phi >= 180 - ``max_angle``.

The candidates that one geometric corner yields (both ends, both classes of each boundary, several
segment pairs) are merged when closer than ``merge_radius`` px (single linkage, centroid).
``docs/qa.md`` explains the choices, in particular how LSD treats raster staircases.

**Matching.** A reference corner is *matched* when the evaluated map has a corner within ``radius``
px; the score is matched reference corners / reference corners (a recall of the reference's corners).

Coordinates are pixel coordinates with (0, 0) at the top-left corner of the top-left pixel (GDAL's
convention: ``transform * (x, y)`` is the map position); corners are (m, 2) float arrays of (x, y).

**Windows.** Maps are processed in ``window``-px windows read with a ``margin``: a window takes its
segments from the window plus margin and keeps the corners that fall in its own core, so a segment
crossing a window edge is seen far enough and each corner is reported once. Inside a window, a
coarse 8-px cell grid tells where each class has edges, and LSD runs on the boxes around those
places only (:func:`class_crops`), not on the whole mask: this halves LSD's time on a
17-class map, and a class absent from a map (or filling a window) costs nothing and gives nothing.
Windows and boxes start on multiples of 5 px: LSD first resamples the mask at scale 0.8 = 4/5, so
its sampling lattice repeats every 5 px, and keeping that phase makes the segments of a box the same
as those of the whole mask (checked: 99+ % of corners agree, see ``docs/qa.md``).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import rasterio
from rasterio.windows import Window
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from pipeline.errors import PipelineError
from pipeline.io.atomic import write_json

log = logging.getLogger(__name__)

WINDOW = 1000  # px; windows and boxes start on multiples of _LATTICE (module docstring)
MARGIN = 25
_LATTICE = 5  # LSD samples the image at scale 0.8 = 4/5: its sampling repeats every 5 px
_CELL = 8  # coarse grid that locates each class's edges
_RING = np.ones((3, 3), bool)
_PAD = 4  # extra background around a box of cells
_CUT = 3.0  # a segment ending this close to a box border inside the window was cut by it


@dataclass(frozen=True)
class CornerRule:
    """The corner rule's parameters, in pixels and degrees (defaults: ``docs/qa.md``)."""

    distance: float = 3.0
    max_angle: float = 120.0
    min_angle: float = 15.0
    min_length: float = 8.0
    merge_radius: float | None = None  # None: distance / 2

    def __post_init__(self) -> None:
        if self.distance <= 0:
            raise ValueError(f"corner distance must be > 0, got {self.distance}")
        if not 0 <= self.min_angle < self.max_angle < 180:
            raise ValueError(f"need 0 <= min_angle < max_angle < 180, got {self.min_angle}, {self.max_angle}")

    @property
    def merge(self) -> float:
        return self.distance / 2 if self.merge_radius is None else self.merge_radius

    def as_dict(self) -> dict[str, float]:
        return asdict(self) | {"merge_radius": self.merge}


_local = threading.local()


def _detector() -> Any:
    """One LSD per thread (OpenCV algorithm objects are not documented as thread-safe)."""
    lsd = getattr(_local, "lsd", None)
    if lsd is None:
        # the LSD paper's parameters (OpenCV's defaults): scale 0.8 with its Gaussian sub-sampling,
        # which turns raster staircases back into straight edges; 22.5 deg tolerance; density 0.7
        lsd = _local.lsd = cv2.createLineSegmentDetector(cv2.LSD_REFINE_STD)
    return lsd


def segments(binary: np.ndarray) -> np.ndarray:
    """LSD segments of one class mask (uint8 0/255, or bool): (n, 4) float64 ``x1, y1, x2, y2``.

    Pixel coordinates, (0, 0) at the top-left corner of the top-left pixel.
    """
    img = np.ascontiguousarray(binary, dtype=np.uint8)
    if binary.dtype == bool:
        img = img * np.uint8(255)
    found = _detector().detect(img)[0]
    if found is None:
        return np.zeros((0, 4))
    return found.reshape(-1, 4).astype(np.float64) + 0.5  # OpenCV puts pixel centres on integers


@functools.lru_cache(maxsize=8)
def _cell_index(height: int, width: int) -> np.ndarray:
    """Per pixel: the index of its ``_CELL``-px cell (int32, row-major)."""
    wc = -(-width // _CELL)
    rows = (np.arange(height, dtype=np.int32) // _CELL) * wc
    return rows[:, None] + np.arange(width, dtype=np.int32) // _CELL


def class_crops(
    window: np.ndarray, codes: Iterable[int] | None = None, nodata: int | None = 0
) -> list[tuple]:
    """Where each class has edges: ``(code, r0, r1, c0, c1)`` boxes for LSD, from a coarse cell grid.

    A ``_CELL``-px cell is kept for class c when it is next to (3 x 3) a cell holding c and next to a
    cell not full of c, so every boundary of c lies in kept cells with at least a cell around it.
    Connected groups of kept cells give one box each (bounding box + ``_PAD``, its top-left corner
    moved back onto the ``_LATTICE``). Absent classes, and classes that fill the window, give nothing.
    """
    h, w = window.shape
    top = np.iinfo(window.dtype).max + 1  # 256 for uint8 maps, 65536 for uint16
    present = np.bincount(window.ravel(), minlength=top)
    if codes is None:
        wanted = [int(c) for c in np.flatnonzero(present) if c != nodata]
    else:
        wanted = [int(c) for c in codes if 0 <= c < top and present[c]]
    wanted = [c for c in wanted if present[c] < window.size]
    if not wanted:
        return []
    # per (cell, class) pixel counts, classes renumbered 1..k (0: any other value)
    lut = np.zeros(top, np.int32)
    lut[wanted] = np.arange(1, len(wanted) + 1, dtype=np.int32)
    k = len(wanted) + 1
    hc, wc = -(-h // _CELL), -(-w // _CELL)
    hist = np.bincount((_cell_index(h, w) * k + lut[window]).ravel(), minlength=hc * wc * k).reshape(
        hc, wc, k
    )
    size = hist.sum(axis=2)
    out = []
    for i, code in enumerate(wanted, start=1):
        kept = ndimage.binary_dilation(hist[:, :, i] > 0, _RING) & ndimage.binary_dilation(
            hist[:, :, i] < size, _RING
        )
        groups, _ = ndimage.label(kept, _RING)
        for rs, cs in ndimage.find_objects(groups):
            r0, c0 = max(rs.start * _CELL - _PAD, 0), max(cs.start * _CELL - _PAD, 0)
            out.append(
                (
                    code,
                    r0 - r0 % _LATTICE,
                    min(rs.stop * _CELL + _PAD, h),
                    c0 - c0 % _LATTICE,
                    min(cs.stop * _CELL + _PAD, w),
                )
            )
    return out


def class_segments(
    window: np.ndarray, codes: Iterable[int] | None = None, nodata: int | None = 0
) -> np.ndarray:
    """All classes' LSD segments in a class map (uint8), LSD run on :func:`class_crops` boxes only.

    ``codes``: the classes (default: every value present but ``nodata``). Boxes of one class may
    overlap: a box then also holds pieces of another group's edges, cut by the box border. Those
    pieces are dropped (an end within ``_CUT`` px of a border inside the window; a group's own edges
    lie at least a cell away from its box's inner borders); whole foreign segments are duplicates of
    that group's own, which the corner merge absorbs.
    """
    h, w = window.shape
    out = []
    for code, r0, r1, c0, c1 in class_crops(window, codes, nodata):
        seg = segments((window[r0:r1, c0:c1] == code).view(np.uint8) * np.uint8(255))
        if not len(seg):
            continue
        x, y = seg[:, 0::2], seg[:, 1::2]
        cut = np.zeros(len(seg), bool)
        if c0 > 0:
            cut |= (x < _CUT).any(axis=1)
        if c1 < w:
            cut |= (x > c1 - c0 - _CUT).any(axis=1)
        if r0 > 0:
            cut |= (y < _CUT).any(axis=1)
        if r1 < h:
            cut |= (y > r1 - r0 - _CUT).any(axis=1)
        seg = seg[~cut]
        seg[:, 0::2] += c0
        seg[:, 1::2] += r0
        out.append(seg)
    return np.concatenate(out) if out else np.zeros((0, 4))


def corner_candidates(
    segs: np.ndarray, rule: CornerRule = CornerRule(), *, return_angles: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Every (extremity, other segment) pair that passes ``rule``: (k, 2) corner positions X.

    With ``return_angles`` also the corner angle of each (L: angle between the arms; T: phi).
    Vectorised: the segments are sampled every <= ``distance`` px and a KD-tree finds, for each
    extremity, the segments that pass within ``distance`` of it.
    """
    none = (np.zeros((0, 2)), np.zeros(0)) if return_angles else np.zeros((0, 2))
    segs = np.asarray(segs, dtype=np.float64).reshape(-1, 4)
    p1, p2 = segs[:, :2], segs[:, 2:]
    vec = p2 - p1
    length = np.hypot(vec[:, 0], vec[:, 1])
    keep = length >= max(rule.min_length, 1e-9)
    p1, vec, length = p1[keep], vec[keep], length[keep]
    n = len(p1)
    if n < 2:
        return none
    unit = vec / length[:, None]
    d = rule.distance
    # a point within d of a segment is within d + step/2 of one of its sample points
    step = max(d, 1.0)
    n_pts = np.ceil(length / step).astype(np.int64) + 1
    owner = np.repeat(np.arange(n), n_pts)
    first = np.cumsum(n_pts) - n_pts
    frac = (np.arange(owner.size) - first[owner]) / (n_pts[owner] - 1)
    samples = p1[owner] + frac[:, None] * vec[owner]
    ends = np.concatenate([p1, p1 + vec])
    end_owner = np.concatenate([np.arange(n), np.arange(n)])
    end_arm = np.concatenate([unit, -unit])  # from the extremity into its own segment
    pairs = cKDTree(ends).sparse_distance_matrix(cKDTree(samples), d + step / 2 + 1e-6, output_type="ndarray")
    if len(pairs) == 0:
        return none
    e_idx, b = pairs["i"].astype(np.int64), owner[pairs["j"]]
    other = b != end_owner[e_idx]
    key = np.unique(e_idx[other] * n + b[other])
    e_idx, b = key // n, key % n
    p, ua, ub = ends[e_idx], end_arm[e_idx], unit[b]
    # exact point-to-segment distance
    along = np.clip(np.einsum("ij,ij->i", p - p1[b], ub), 0.0, length[b])
    ok = np.hypot(*(p - p1[b] - along[:, None] * ub).T) <= d
    # the lines must cross at an angle some branch of the rule can accept (keeps X well defined)
    sin_ab = ua[:, 0] * ub[:, 1] - ua[:, 1] * ub[:, 0]
    floor = max(min(rule.min_angle, 180.0 - rule.max_angle), 1.0)
    ok &= np.abs(sin_ab) >= math.sin(math.radians(floor)) - 1e-12
    p, ua, ub, b, sin_ab = p[ok], ua[ok], ub[ok], b[ok], sin_ab[ok]
    if len(p) == 0:
        return none
    # X = p + s ua on B's line; B's ends at t1 < t2 along ub from X
    rel = p1[b] - p
    s = (rel[:, 0] * ub[:, 1] - rel[:, 1] * ub[:, 0]) / sin_ab
    x = p + s[:, None] * ua
    t1 = np.einsum("ij,ij->i", p1[b] - x, ub)
    t2 = t1 + length[b]
    through = (t1 < -d) & (t2 > d)
    far = np.where(np.abs(t2) >= np.abs(t1), 1.0, -1.0)  # B's arm: towards its far end
    angle_l = np.degrees(np.arccos(np.clip(np.einsum("ij,ij->i", ua, ub) * far, -1.0, 1.0)))
    phi = np.degrees(np.arcsin(np.clip(np.abs(sin_ab), 0.0, 1.0)))
    good = np.where(
        through,
        phi >= 180.0 - rule.max_angle,
        (angle_l >= rule.min_angle) & (angle_l <= rule.max_angle),
    )
    if return_angles:
        return x[good], np.where(through, phi, angle_l)[good]
    return x[good]


def merge_points(points: np.ndarray, radius: float) -> np.ndarray:
    """Merge points closer than ``radius`` (single linkage) into the centroid of each group."""
    if len(points) < 2 or radius <= 0:
        return points
    pairs = cKDTree(points).query_pairs(radius, output_type="ndarray")
    if len(pairs) == 0:
        return points
    n = len(points)
    graph = coo_matrix((np.ones(len(pairs), np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    n_comp, label = connected_components(graph, directed=False)
    size = np.bincount(label, minlength=n_comp)
    x = np.bincount(label, points[:, 0], minlength=n_comp) / size
    y = np.bincount(label, points[:, 1], minlength=n_comp) / size
    return np.column_stack([x, y])


def corners_of_segments(segs: np.ndarray, rule: CornerRule = CornerRule()) -> np.ndarray:
    """The rule's merged corners of a set of segments: (m, 2) ``x, y``."""
    return merge_points(corner_candidates(segs, rule), rule.merge)


def _windows(height: int, width: int, window: int, margin: int) -> list[tuple[Window, tuple[int, ...]]]:
    """(read window = core + margin, core as r0 r1 c0 c1) on a ``window``-px grid."""
    out = []
    for r in range(0, height, window):
        for c in range(0, width, window):
            r0, c0 = max(r - margin, 0), max(c - margin, 0)
            r1, c1 = min(r + window + margin, height), min(c + window + margin, width)
            core = (r, min(r + window, height), c, min(c + window, width))
            out.append((Window(c0, r0, c1 - c0, r1 - r0), core))
    return out


def corners_windowed(
    read: Callable[[Window], np.ndarray],
    height: int,
    width: int,
    rule: CornerRule = CornerRule(),
    *,
    codes: Iterable[int] | None = None,
    nodata: int | None = 0,
    window: int = WINDOW,
    margin: int = MARGIN,
    threads: int = 1,
) -> np.ndarray:
    """Corners of a ``height`` x ``width`` class map that ``read(window)`` returns piece by piece.

    Windows run on ``threads`` threads (LSD releases the GIL); memory: one read window per thread.
    """
    codes = None if codes is None else [int(c) for c in codes]
    # a corner in the core needs its segments' ends (<= 2 distance away) and enough of them (min_length)
    margin = max(margin, int(math.ceil(2 * rule.distance + rule.min_length)) + 2 * _PAD)
    margin, window = (-(-v // _LATTICE) * _LATTICE for v in (margin, window))  # keep LSD's sampling phase

    def one(item: tuple[Window, tuple[int, ...]]) -> np.ndarray:
        win, (r0, r1, c0, c1) = item
        a = read(win)
        if a.dtype not in (np.uint8, np.uint16):
            a = a.astype(np.uint16)
        pts = corners_of_segments(class_segments(a, codes, nodata), rule)
        if len(pts) == 0:
            return pts
        pts = pts + (win.col_off, win.row_off)
        inside = (pts[:, 0] >= c0) & (pts[:, 0] < c1) & (pts[:, 1] >= r0) & (pts[:, 1] < r1)
        return pts[inside]

    items = _windows(height, width, window, margin)
    if threads <= 1 or len(items) == 1:
        parts = [one(it) for it in items]
    else:
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(one, items))
    parts = [p for p in parts if len(p)]
    return np.concatenate(parts) if parts else np.zeros((0, 2))


def extract_corners(
    class_map: np.ndarray,
    codes: Iterable[int] | None = None,
    distance: float = CornerRule.distance,
    max_angle: float = CornerRule.max_angle,
    *,
    min_angle: float = CornerRule.min_angle,
    min_length: float = CornerRule.min_length,
    merge_radius: float | None = None,
    nodata: int | None = 0,
    window: int = WINDOW,
    margin: int = MARGIN,
    threads: int = 1,
) -> np.ndarray:
    """Corners of an in-memory class map (codes 0-65535): (m, 2) float64 ``x, y`` in pixel coordinates.

    ``codes``: the classes to split the map into (default: every value present but ``nodata``); a
    class absent from the map contributes nothing. See the module docstring for the rule.
    """
    class_map = np.asarray(class_map)
    if class_map.ndim != 2:
        raise ValueError(f"a class map is 2-D, got shape {class_map.shape}")
    if class_map.dtype not in (np.uint8, np.uint16):
        if class_map.size and (class_map.min() < 0 or class_map.max() > 65535):
            raise ValueError("class codes must fit in uint16")
        class_map = class_map.astype(np.uint8 if class_map.size == 0 or class_map.max() <= 255 else np.uint16)
    rule = CornerRule(distance, max_angle, min_angle, min_length, merge_radius)
    return corners_windowed(
        lambda w: class_map[w.row_off : w.row_off + w.height, w.col_off : w.col_off + w.width],
        *class_map.shape,
        rule,
        codes=codes,
        nodata=nodata,
        window=window,
        margin=margin,
        threads=threads,
    )


def match_score(evaluated: np.ndarray, reference: np.ndarray, radius: float = 3.0) -> float | None:
    """Share of ``reference`` corners with an ``evaluated`` corner within ``radius`` px.

    None when the reference has no corner (nothing to match); 0.0 when only the evaluated has none.
    """
    reference = np.asarray(reference, dtype=np.float64).reshape(-1, 2)
    evaluated = np.asarray(evaluated, dtype=np.float64).reshape(-1, 2)
    if len(reference) == 0:
        return None
    if len(evaluated) == 0:
        return 0.0
    dist, _ = cKDTree(evaluated).query(reference, k=1, distance_upper_bound=radius * (1 + 1e-12))
    return float(np.count_nonzero(np.isfinite(dist))) / len(reference)


# ---------------------------------------------------------------------------------------- rasters


def _open(path: Path) -> rasterio.io.DatasetReader:
    try:
        return rasterio.open(path)
    except rasterio.errors.RasterioIOError as exc:
        raise PipelineError(path, f"cannot open the class map ({exc})") from exc


def check_grids(paths: Sequence[str | os.PathLike[str]]) -> tuple[int, int]:
    """(height, width) of rasters that share one grid (CRS, transform, size), else PipelineError
    naming the first raster that differs from ``paths[0]``."""
    first = Path(paths[0])
    with _open(first) as src:
        crs, transform, size = src.crs, src.transform, (src.width, src.height)
    for path in paths[1:]:
        with _open(Path(path)) as src:
            if src.crs != crs:
                raise PipelineError(path, f"CRS {src.crs} differs from {crs} of {first}")
            if (src.width, src.height) != size or not src.transform.almost_equals(transform):
                raise PipelineError(
                    path,
                    f"pixel grid ({src.width}x{src.height}, origin {src.transform.c}, {src.transform.f}, "
                    f"pixel {src.transform.a} x {src.transform.e}) differs from the one of {first} "
                    f"({size[0]}x{size[1]}, origin {transform.c}, {transform.f}, "
                    f"pixel {transform.a} x {transform.e})",
                )
    return size[1], size[0]


def map_corners(
    path: str | os.PathLike[str],
    rule: CornerRule = CornerRule(),
    *,
    codes: Iterable[int] | None = None,
    window: int = WINDOW,
    margin: int = MARGIN,
    threads: int = 1,
) -> np.ndarray:
    """Corners of a one-band class-map raster (its nodata, else 0, is no class), read window by window."""
    path = Path(path)
    with _open(path) as src:
        height, width = src.height, src.width
        if src.count != 1 or src.dtypes[0] not in ("uint8", "uint16"):
            raise PipelineError(
                path, f"a class map has one uint8 or uint16 band, this has {src.count} {src.dtypes[0]}"
            )
        nodata = 0 if src.nodata is None else int(src.nodata)
    handles: list[rasterio.io.DatasetReader] = []
    local = threading.local()
    lock = threading.Lock()

    def read(win: Window) -> np.ndarray:
        src = getattr(local, "src", None)
        if src is None:  # one handle per thread: a GDAL dataset is not thread-safe
            src = local.src = _open(path)
            with lock:
                handles.append(src)
        return src.read(1, window=win)

    try:
        return corners_windowed(
            read,
            height,
            width,
            rule,
            codes=codes,
            nodata=nodata,
            window=window,
            margin=margin,
            threads=threads,
        )
    finally:
        for src in handles:
            src.close()


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample std (ddof 1; 0 for one value) of the scores that are not None, and the scores.

    Shared with the QA report's seed statistics, so every "mean +- std" of the run means the same.
    """
    v = np.array([x for x in values if x is not None], dtype=np.float64)
    return {
        "mean": round(float(v.mean()), 6) if len(v) else None,
        "std": round(float(v.std(ddof=1)), 6) if len(v) > 1 else (0.0 if len(v) else None),
        "n": int(len(v)),
        "scores": [None if x is None else round(float(x), 6) for x in values],
    }


MAX_STANDARD_ERROR = 0.05  # qa.max_standard_error's default


def standard_error(scores: Sequence[float | None], counts: Sequence[int]) -> float | None:
    """The sampling error of one corner score: the binomial standard error of a share of ``n``
    reference corners, sqrt(p(1 - p) / n), at the Laplace estimate p = (k + 1) / (n + 2) (so that a
    score of 0 or 1 from a handful of corners is not given an error of 0), as the root mean square
    over the references. It is not divided by sqrt(R): the R references map the same corners of
    the same tile, far from R independent samples. None when no reference has a corner."""
    var = [
        (k := s * n + 1) * (n + 2 - k) / (n + 2) ** 2 / n
        for s, n in zip(scores, counts, strict=True)
        if s is not None and n > 0
    ]
    return round(math.sqrt(sum(var) / len(var)), 6) if var else None


def few_corners_warning(doc: Mapping[str, Any], tile: str, max_se: float) -> str | None:
    """One line when the tile's scores rest on too few corners to tell maps apart, else None."""
    errors = [doc["reference_vs_reference"].get("standard_error")]
    errors += [m.get("standard_error") for m in doc["models"].values()]
    known = [e for e in errors if e is not None]
    if known and max(known) <= max_se:
        return None
    counts = [r["corners"] for r in doc["references"]]
    need = math.ceil(0.25 / max_se**2)  # the worst case, p = 1/2
    held = f"{min(counts)}-{max(counts)}" if min(counts) != max(counts) else f"{counts[0]}"
    error = f"standard errors up to {max(known):.2f}" if known else "no score at all"
    return (
        f"{tile}: too few corners for the geometric QA to tell maps apart: the reference maps hold "
        f"{held} corners, so {error} (qa.max_standard_error {max_se:g} needs about {need} corners per "
        "reference map); a larger tile or area gives a meaningful score"
    )


def tile_qa(
    map_paths: Mapping[str, str | os.PathLike[str]],
    reference_paths: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    distance: float = CornerRule.distance,
    max_angle: float = CornerRule.max_angle,
    radius: float = 3.0,
    *,
    min_angle: float = CornerRule.min_angle,
    min_length: float = CornerRule.min_length,
    merge_radius: float | None = None,
    codes: Iterable[int] | None = None,
    threads: int | None = None,
    max_standard_error: float = MAX_STANDARD_ERROR,
    **extra: Any,
) -> dict[str, Any]:
    """Corner QA of one tile: each map of ``map_paths`` (name -> class-map COG) against R references.

    Checks first that every map and reference shares one grid (else PipelineError naming the file).
    Writes atomically, and returns, a JSON document:

    - ``models.<name>``: the R scores "reference j's corners matched by the model's corners", with
      their mean and sample standard deviation (ddof 1), and the model map's corner count;
    - ``reference_vs_reference``: the same over the R(R-1) ordered pairs (reference i evaluated
      against reference j, i != j): how well pixel-based maps agree with each other (the seed's
      Fig. 20 RF bar; None with a single reference);
    - ``references``: each reference's corner count; ``params``: the rule and radius;
    - each record's ``standard_error`` (:func:`standard_error`), and ``warnings``: a line when any
      exceeds ``max_standard_error`` (a small tile: too few corners for the score to mean anything).

    A score is None when its reference has no corner; means and stds skip those. ``extra`` is copied
    into the document (tile name, config digest, ...).
    """
    refs = [Path(p) for p in reference_paths]
    if not refs:
        raise PipelineError(out, "geometric QA needs at least one reference map")
    check_grids(refs + [Path(p) for p in map_paths.values()])
    rule = CornerRule(distance, max_angle, min_angle, min_length, merge_radius)
    kw: dict[str, Any] = {"codes": codes, "threads": threads or len(os.sched_getaffinity(0))}
    ref_corners = [map_corners(p, rule, **kw) for p in refs]
    pairs = [(i, j) for j in range(len(refs)) for i in range(len(refs)) if i != j]
    counts = [len(c) for c in ref_corners]
    rr = [match_score(ref_corners[i], ref_corners[j], radius) for i, j in pairs]
    rr_se = standard_error(rr, [counts[j] for _, j in pairs])
    models: dict[str, Any] = {}
    for name, path in map_paths.items():
        corners = map_corners(path, rule, **kw)
        scores = [match_score(corners, rc, radius) for rc in ref_corners]
        models[name] = (
            {"map": str(path), "corners": int(len(corners))}
            | mean_std(scores)
            | {"standard_error": standard_error(scores, counts)}
        )
    doc = {
        **extra,
        "score": "reference corners with a corner of the evaluated map within match_radius"
        " / reference corners",
        "params": rule.as_dict() | {"match_radius": radius, "unit": "pixels, degrees"},
        "references": [
            {"map": str(p), "corners": int(len(c))} for p, c in zip(refs, ref_corners, strict=True)
        ],
        "reference_vs_reference": mean_std(rr) | {"standard_error": rr_se, "pairs": [list(p) for p in pairs]},
        "models": models,
        "max_standard_error": max_standard_error,
    }
    warning = few_corners_warning(doc, str(extra.get("tile", Path(out).stem)), max_standard_error)
    doc["warnings"] = [warning] if warning else []
    if warning:
        log.warning(warning)
    write_json(out, doc)
    return doc
