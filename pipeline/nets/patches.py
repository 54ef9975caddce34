"""Training patches for the patch-based networks (FG-UNET family): positions, sampling, reading, inputs.

Seed §3.3.2: a patch is worth drawing only when >= 10 % of its pixels are labelled, so the valid
top-left corners of every tile are precomputed once (:func:`index_tile`, one ``.npz`` per tile) on
a lattice of step ``stride``, with, per class, the positions holding >= 10 % of that class.
Seed §3.3.4 / §3.3.6 steps 1-2: training draws a class uniformly first, then a position uniformly
among that class's positions pooled over every tile (:class:`ClassFirstSampler`), so minority
classes are seen as often as water.

Sparse labels: the 10 % rule suits reference data as dense as the French national layers; a class
whose objects are small or sparsely labelled may have no such position at all, and would then never
be drawn (it was so for 13 of the demo's 17 classes). So each class's threshold is the paper's,
relaxed only as far as needed to give ``min_positions`` positions: ``min(10 % of a patch, the count
of the class's min_positions-th best-stocked position)``, at least one pixel. The index keeps, per
class, every position holding at least its tile's relaxed threshold and how many pixels of the
class it holds, so the sampler can apply the run-wide threshold over all tiles.

Patches are then sliced out of the gapfilled zarr cubes (:func:`read_patches`, a 64-px patch
touches 1-4 inner chunks, never a tile), normalised by eq. 2 plus optional spectral indices
(§3.2.5, :func:`patch_inputs`) and augmented by the 8 rotations / mirrors of the square (§3.3.5,
:func:`augment`).

The array functions are pure and independent of zarr, so they are tested against brute-force
oracles; only :func:`index_tile` and :func:`read_patches` touch stores. :func:`index_patches` is
the ``patches`` stage (``landcover patches``): one tile's train and model-selection positions.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import zarr

from pipeline.config import map_dtype
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path
from pipeline.io.tilestore import SHARD, open_store
from pipeline.stats import NODATA

if TYPE_CHECKING:
    from pipeline.config import Config
    from pipeline.models.features import Normalisation

log = logging.getLogger(__name__)

INDICES = ("ndvi", "ndwi", "brightness")
# raw bands each index needs (brightness uses the normalised bands of its date, whatever they are)
_INDEX_BANDS = {"ndvi": ("B8", "B4"), "ndwi": ("B3", "B8"), "brightness": ()}


# --------------------------------------------------------------------------- valid patch positions


def min_pixels(size: int, min_fraction: float) -> int:
    """Pixels a ``size`` x ``size`` patch needs: ``ceil(min_fraction * size**2)``, at least 1.

    The product is rounded to 9 decimals first so float noise (0.1 * 900 = 90.00000000000001) does
    not push an exact threshold up by one pixel.
    """
    return max(1, math.ceil(round(min_fraction * size * size, 9)))


class BlockPositions(NamedTuple):
    """Valid positions of one label block: absolute top-left rows/cols and, per requested code, the
    indices (into rows/cols) of the positions holding enough pixels of that code."""

    rows: np.ndarray  # (n,) int32
    cols: np.ndarray  # (n,) int32
    members: list[np.ndarray]  # one sorted int64 index array per code, in the order of ``codes``
    pixels: list[np.ndarray]  # per code, int32 pixels of that code in each member position


def _lattice(start: int, length: int, size: int, stride: int) -> np.ndarray:
    """Local offsets of the lattice points ``k * stride`` whose patch fits in [start, start + length)."""
    first = -(-start // stride) * stride
    last = start + length - size  # last absolute top-left whose patch still fits
    return np.arange(first, last + 1, stride, dtype=np.int64) - start


def _box_sums(mask: np.ndarray, lr: np.ndarray, lc: np.ndarray, size: int, stride: int) -> np.ndarray:
    """Pixel counts of ``mask`` in the size x size boxes at local (lr x lc), by separable cumulative sums.

    Lattice points and patch sides are multiples of ``g = gcd(size, stride)``, so the mask is first
    summed over g x g cells aligned on the lattice (one cheap pass) and the integral image is taken
    over cells: 64x fewer cumulative sums for the default 64-px patches on an 8-px lattice.
    """
    g = math.gcd(size, stride)
    if g > 1:
        nr = (int(lr[-1] - lr[0]) + size) // g
        nc = (int(lc[-1] - lc[0]) + size) // g
        sub = mask[lr[0] : lr[0] + nr * g, lc[0] : lc[0] + nc * g]
        mask = sub.reshape(nr, g, nc, g).sum(axis=(1, 3), dtype=np.int32)
        lr, lc, size = (lr - lr[0]) // g, (lc - lc[0]) // g, size // g
    h, w = mask.shape
    col_cum = np.zeros((h + 1, w), np.int32)
    np.cumsum(mask, axis=0, dtype=np.int32, out=col_cum[1:])
    band = col_cum[lr + size] - col_cum[lr]  # (nr, W): per column, the pixels in each row window
    row_cum = np.zeros((lr.size, w + 1), np.int32)
    np.cumsum(band, axis=1, out=row_cum[:, 1:])
    return row_cum[:, lc + size] - row_cum[:, lc]


def _check_params(size: int, stride: int, min_fraction: float, codes: Sequence[int]) -> list[int]:
    if size < 1 or stride < 1:
        raise ValueError(f"size and stride must be >= 1, got {size} and {stride}")
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    codes = [int(c) for c in codes]
    if bad := [c for c in codes if not 0 < c < 65536]:
        raise ValueError(f"class codes must be in 1..65535, got {bad}")
    return codes


def _present(labels: np.ndarray) -> set[int]:
    """Codes occurring in a block (for uint8 a bincount: much faster than np.unique's sort)."""
    if labels.dtype != np.uint8:
        return set(np.unique(labels).tolist())
    return set(np.flatnonzero(np.bincount(labels.ravel(), minlength=256)).tolist())


def patch_positions(
    labels: np.ndarray,
    size: int,
    stride: int,
    min_fraction: float,
    codes: Sequence[int],
    row0: int = 0,
    col0: int = 0,
    thresholds: Sequence[int] | None = None,
) -> BlockPositions:
    """Valid patch positions of a (H, W) label block whose top-left pixel is at absolute (row0, col0).

    Candidates are the absolute lattice points (``row % stride == col % stride == 0``) whose
    ``size`` x ``size`` patch lies inside the block, so blocks cut from one tile with ``size - 1``
    px of overlap give each position exactly once. A position is valid when >= :func:`min_pixels`
    pixels are labelled (any non-zero code) and is listed for code ``c`` when that many are ``c``,
    or, with ``thresholds``, when at least ``thresholds[i]`` are ``codes[i]`` (such a position is
    listed even if less of it is labelled). Counts come from integral images over the whole block
    (one per code present), not a loop.
    """
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    codes = _check_params(size, stride, min_fraction, codes)
    need = min_pixels(size, min_fraction)
    thr = _thresholds(thresholds, codes, need)
    lr = _lattice(row0, labels.shape[0], size, stride)
    lc = _lattice(col0, labels.shape[1], size, stride)
    none = [np.empty(0, np.int64)] * len(codes)
    empty = BlockPositions(
        np.empty(0, np.int32), np.empty(0, np.int32), none, [np.empty(0, np.int32)] * len(codes)
    )
    if lr.size == 0 or lc.size == 0:
        return empty
    labelled = labels != 0
    if not labelled.any():
        return empty
    valid = (_box_sums(labelled, lr, lc, size, stride) >= need).ravel()
    present = _present(labels)
    hits: list[tuple[np.ndarray, np.ndarray]] = []
    for code, t in zip(codes, thr, strict=True):
        if code not in present:
            hits.append((np.empty(0, np.int64), np.empty(0, np.int32)))
            continue
        count = _box_sums(labels == code, lr, lc, size, stride).ravel()
        hit = np.flatnonzero(count >= t)
        hits.append((hit, count[hit].astype(np.int32)))
        valid[hit] = True  # a relaxed class's position is listed even when little else is labelled
    vid = np.flatnonzero(valid)
    if vid.size == 0:
        return empty
    members = [np.searchsorted(vid, hit) for hit, _ in hits]  # each hit is in vid: its rank there
    rows = (lr[vid // lc.size] + row0).astype(np.int32)
    cols = (lc[vid % lc.size] + col0).astype(np.int32)
    return BlockPositions(rows, cols, members, [px for _, px in hits])


def _thresholds(thresholds: Sequence[int] | None, codes: list[int], need: int) -> list[int]:
    if thresholds is None:
        return [need] * len(codes)
    thr = [int(t) for t in thresholds]
    if len(thr) != len(codes) or any(t < 1 for t in thr):
        raise ValueError(f"need one threshold >= 1 per code, got {thr} for {codes}")
    return thr


def class_count_histogram(
    labels: np.ndarray, size: int, stride: int, codes: Sequence[int], row0: int = 0, col0: int = 0
) -> np.ndarray:
    """(len(codes), size**2 + 1) int64: per code, how many lattice positions hold n pixels of it.

    Same lattice as :func:`patch_positions`, so histograms of blocks cut with ``size - 1`` px of
    overlap add up to the tile's.
    """
    codes = _check_params(size, stride, 0.5, codes)
    hist = np.zeros((len(codes), size * size + 1), np.int64)
    lr = _lattice(row0, labels.shape[0], size, stride)
    lc = _lattice(col0, labels.shape[1], size, stride)
    if lr.size == 0 or lc.size == 0:
        return hist
    present = _present(labels)
    for i, code in enumerate(codes):
        if code in present:
            count = _box_sums(labels == code, lr, lc, size, stride).ravel()
            hist[i] = np.bincount(count, minlength=size * size + 1)
        else:
            hist[i, 0] = lr.size * lc.size
    return hist


def relaxed_threshold(counts_at_least: np.ndarray, need: int, min_positions: int) -> int:
    """``min(need, n)`` for the largest ``n`` with >= ``min_positions`` positions holding >= n pixels.

    ``counts_at_least[n]`` is the number of positions holding at least ``n`` pixels of the class
    (non-increasing in n). At least 1: a position without any pixel of the class never counts.
    """
    if min_positions <= 0:
        return need
    ok = np.flatnonzero(counts_at_least[1 : need + 1] >= min_positions)
    return int(ok[-1]) + 1 if ok.size else 1


def at_least(hist: np.ndarray) -> np.ndarray:
    """Per row of a count histogram: positions holding at least n pixels, for every n."""
    return np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1]


@dataclass(frozen=True, eq=False)
class PatchIndex:
    """One tile's valid patch positions (row-major) and, per class, the positions rich in that class (CSR)."""

    tile: str
    size: int
    stride: int
    min_fraction: float
    rows: np.ndarray  # (n,) int32 top-left rows
    cols: np.ndarray  # (n,) int32 top-left cols
    class_codes: np.ndarray  # (K,) uint8, ascending, codes with at least one position
    class_offsets: np.ndarray  # (K + 1,) int64
    class_members: np.ndarray  # (class_offsets[-1],) int64 indices into rows/cols
    class_pixels: np.ndarray  # (class_offsets[-1],) int32 pixels of the class at each member

    @property
    def n_positions(self) -> int:
        return int(self.rows.size)

    def _of(self, csr: np.ndarray, code: int) -> np.ndarray:
        """``code``'s slice of a per-member CSR array (empty, same dtype, if the class has none)."""
        i = np.flatnonzero(self.class_codes == code)
        if i.size == 0:
            return csr[:0]
        return csr[self.class_offsets[i[0]] : self.class_offsets[i[0] + 1]]

    def members_of(self, code: int) -> np.ndarray:
        """Indices (into rows/cols) of the positions holding enough pixels of ``code`` (empty if none)."""
        return self._of(self.class_members, code)

    def pixels_of(self, code: int) -> np.ndarray:
        """Pixels of ``code`` in each of :meth:`members_of`'s positions."""
        return self._of(self.class_pixels, code)

    def positions_of(self, code: int) -> tuple[np.ndarray, np.ndarray]:
        m = self.members_of(code)
        return self.rows[m], self.cols[m]

    def counts(self) -> dict[int, int]:
        """Positions per class code."""
        return {int(c): int(n) for c, n in zip(self.class_codes, np.diff(self.class_offsets), strict=True)}

    def save(self, path: Path) -> None:
        """Write a compressed ``.npz`` atomically (an interrupted run leaves no half index)."""
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(
                f,
                tile=np.array(self.tile),
                size=np.int64(self.size),
                stride=np.int64(self.stride),
                min_fraction=np.float64(self.min_fraction),
                rows=self.rows,
                cols=self.cols,
                class_codes=self.class_codes,
                class_offsets=self.class_offsets,
                class_members=self.class_members,
                class_pixels=self.class_pixels,
            )

    @classmethod
    def load(cls, path: Path) -> PatchIndex:
        """Read and check an index; a missing, unreadable or inconsistent file is a PipelineError."""
        path = Path(path)
        if not path.is_file():
            raise PipelineError(path, "patch index not found")
        try:
            with np.load(path, allow_pickle=False) as z:
                if "class_pixels" not in z.files:
                    raise PipelineError(
                        path,
                        "patch index written by an older version (no per-class pixel counts): "
                        "rerun the patches stage (snakemake --forcerun patches)",
                    )
                ix = cls(
                    tile=str(z["tile"]),
                    size=int(z["size"]),
                    stride=int(z["stride"]),
                    min_fraction=float(z["min_fraction"]),
                    rows=z["rows"].astype(np.int32, copy=False),
                    cols=z["cols"].astype(np.int32, copy=False),
                    class_codes=z["class_codes"].astype(map_dtype(z["class_codes"]), copy=False),
                    class_offsets=z["class_offsets"].astype(np.int64, copy=False),
                    class_members=z["class_members"].astype(np.int64, copy=False),
                    class_pixels=z["class_pixels"].astype(np.int32, copy=False),
                )
        except PipelineError:
            raise
        except Exception as exc:  # np.load raises OSError, ValueError, BadZipFile, EOFError, KeyError...
            raise PipelineError(path, f"not a readable patch index ({type(exc).__name__}: {exc})") from exc
        if why := ix._inconsistency():
            raise PipelineError(path, f"corrupt patch index: {why}")
        return ix

    def _inconsistency(self) -> str | None:
        n, k = self.rows.size, self.class_codes.size
        if self.rows.ndim != 1 or self.cols.shape != self.rows.shape:
            return f"rows {self.rows.shape} and cols {self.cols.shape} differ"
        if self.class_offsets.shape != (k + 1,) or self.class_offsets[0] != 0:
            return f"{self.class_offsets.size} class offsets for {k} classes"
        if (np.diff(self.class_offsets) < 0).any() or self.class_offsets[-1] != self.class_members.size:
            return "class offsets do not delimit the class members"
        if self.class_members.size and (self.class_members.min() < 0 or self.class_members.max() >= n):
            return f"class members outside the {n} positions"
        if self.class_pixels.shape != self.class_members.shape:
            return f"{self.class_pixels.size} pixel counts for {self.class_members.size} class members"
        if self.class_pixels.size and (self.class_pixels.min() < 1 or self.class_pixels.max() > self.size**2):
            return f"class pixel counts outside 1..{self.size**2}"
        return None


def index_tile(
    labels_store: Path,
    tile: str,
    out: Path,
    size: int,
    stride: int,
    min_fraction: float,
    codes: Sequence[int],
    split: str = "train",
    block: int = SHARD,
    min_positions: int = 0,
    held_out: str | None = None,
) -> PatchIndex:
    """Precompute one tile's valid patch positions from its ``split`` labels and write ``out``.

    The labels are streamed in full-width bands of ``block`` position rows (``block + size - 1``
    label rows each), so memory stays ~(block + size) x width whatever the tile's height; only
    patches fully inside the tile are kept. With ``min_positions`` > 0 a first pass counts, per
    class, the positions holding n of its pixels, and a class lacking ``min_positions`` positions
    at the ``min_fraction`` rule is listed at its relaxed threshold (:func:`relaxed_threshold`).
    ``held_out``: a label array whose pixels are removed from ``split`` (the model-selection
    polygons, :func:`pipeline.reference.training_labels`). A tile without any valid position only
    logs a warning: it still gets mapped, it just contributes no training patch.
    """
    from pipeline.reference import HeldOut

    labels_store = Path(labels_store)
    group = open_store(labels_store, "reference", (split,) + ((held_out,) if held_out else ()))
    arr: Any = group[split] if held_out is None else HeldOut(group[split], group[held_out])
    if len(arr.shape) != 2:
        raise PipelineError(labels_store, f"'{split}' labels have shape {arr.shape}, expected (H, W)")
    height, width = arr.shape
    codes = sorted(set(_check_params(size, stride, min_fraction, codes)))
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    need = min_pixels(size, min_fraction)

    def bands():
        for a in range(0, max(0, height - size + 1), block):
            lab = np.asarray(arr[a : min(height, a + block + size - 1), :])
            if bad := sorted(_present(lab) - {0, *codes}):
                raise PipelineError(labels_store, f"{split} labels hold codes {bad} not in the nomenclature")
            yield a, lab

    thresholds = [need] * len(codes)
    present: set[int] = set()
    if min_positions > 0:
        hist = sum((class_count_histogram(lab, size, stride, codes, row0=a) for a, lab in bands()), start=0)
        if not isinstance(hist, int):
            thresholds = [relaxed_threshold(h, need, min_positions) for h in at_least(hist)]
            present = {c for c, h in zip(codes, hist, strict=True) if h[1:].any()}
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    members: list[list[np.ndarray]] = [[] for _ in codes]
    pixels: list[list[np.ndarray]] = [[] for _ in codes]
    n = 0
    for a, lab in bands():
        got = patch_positions(lab, size, stride, min_fraction, codes, row0=a, col0=0, thresholds=thresholds)
        rows.append(got.rows)
        cols.append(got.cols)
        for i, (m, px) in enumerate(zip(got.members, got.pixels, strict=True)):
            members[i].append(m + n)
            pixels[i].append(px)
        n += got.rows.size
    per_code = [np.concatenate(m) if m else np.empty(0, np.int64) for m in members]
    keep = [i for i, m in enumerate(per_code) if m.size]
    index = PatchIndex(
        tile=tile,
        size=size,
        stride=stride,
        min_fraction=float(min_fraction),
        rows=np.concatenate(rows) if rows else np.empty(0, np.int32),
        cols=np.concatenate(cols) if cols else np.empty(0, np.int32),
        class_codes=np.array([codes[i] for i in keep], map_dtype(codes)),
        class_offsets=np.concatenate([[0], np.cumsum([per_code[i].size for i in keep])]).astype(np.int64),
        class_members=np.concatenate([per_code[i] for i in keep] or [np.empty(0, np.int64)]).astype(np.int64),
        class_pixels=np.concatenate(
            [np.concatenate(pixels[i]) for i in keep] or [np.empty(0, np.int32)]
        ).astype(np.int32),
    )
    if index.n_positions == 0:
        small = height < size or width < size
        log.warning(
            "%s: tile %s %s, so it gives no %s patch (the tile is still mapped)",
            labels_store,
            tile,
            f"({height}x{width} px) is smaller than a {size}x{size} patch (nets.patch_size)"
            if small
            else f"has no {size}x{size} patch with >= {need} labelled '{split}' pixels",
            split,
        )
    else:
        relaxed = {c: t for c, t in zip(codes, thresholds, strict=True) if t < need and c in present}
        log.info(
            "%s patch index %s: %d positions, per class %s%s",
            split,
            tile,
            index.n_positions,
            index.counts(),
            f"; relaxed thresholds (px, paper's {need}) {relaxed}" if relaxed else "",
        )
    index.save(out)
    return index


# --------------------------------------------------------------------------- class-first sampling


@dataclass(frozen=True)
class PatchRef:
    """One drawn patch: tile, top-left pixel and the class it was drawn for."""

    tile: str
    row: int
    col: int
    code: int


class ClassFirstSampler:
    """Draw a class uniformly, then a position uniformly among that class's positions of all tiles.

    ``classes`` are ``codes`` (default: every class of the indices) that have at least one position
    in some tile; a tile lacking a class is never chosen for it (seed §3.3.2, §3.3.4). A class's
    positions are those holding at least ``need`` of its pixels (default: each index's own
    ``min_fraction`` rule), or, with ``min_positions`` > 0 and fewer such positions pooled over the
    tiles, its ``min_positions`` best-stocked ones (:func:`relaxed_threshold`; the indices must
    have been built with at least that ``min_positions``). ``thresholds`` records each class's.
    """

    def __init__(
        self,
        indices: Sequence[PatchIndex],
        codes: Sequence[int] | None = None,
        need: int | None = None,
        min_positions: int = 0,
    ) -> None:
        self.indices = list(indices)
        if not self.indices:
            raise ValueError("no patch index given")
        self.tiles = [ix.tile for ix in self.indices]
        if len(set(self.tiles)) != len(self.tiles):
            raise ValueError(f"duplicate tiles among the patch indices: {self.tiles}")
        sizes = {ix.size for ix in self.indices}
        if len(sizes) != 1:
            raise ValueError(f"patch indices of different patch sizes {sorted(sizes)}")
        self.size = sizes.pop()
        if need is None:
            need = max(min_pixels(self.size, ix.min_fraction) for ix in self.indices)
        self.need = int(need)
        union = {int(c) for ix in self.indices for c in ix.class_codes}
        wanted = sorted(union if codes is None else {int(c) for c in codes})
        # per class: members per tile and the cumulative counts that pool them
        self._members: dict[int, list[np.ndarray]] = {}
        self._cum: dict[int, np.ndarray] = {}
        self.thresholds: dict[int, int] = {}
        for code in wanted:
            px = [ix.pixels_of(code) for ix in self.indices]
            if not any(p.size for p in px):
                continue
            hist = np.bincount(np.concatenate(px), minlength=self.size**2 + 1)
            thr = relaxed_threshold(at_least(hist), self.need, min_positions)
            parts = [ix.members_of(code)[p >= thr] for ix, p in zip(self.indices, px, strict=True)]
            cum = np.concatenate([[0], np.cumsum([p.size for p in parts])]).astype(np.int64)
            if cum[-1]:
                self._members[code], self._cum[code], self.thresholds[code] = parts, cum, thr
        self.missing = [c for c in wanted if c not in self._members]
        if self.missing:
            log.warning(
                "classes without any valid patch position in any tile (never drawn): %s", self.missing
            )
        if not self._members:
            raise PipelineError(None, f"no tile among {self.tiles} has a valid patch position for any class")
        self.classes = np.array(sorted(self._members), map_dtype(sorted(self._members)))

    @property
    def counts(self) -> dict[int, int]:
        """Positions per class, pooled over the tiles."""
        return {c: int(self._cum[c][-1]) for c in self._members}

    def draw(self, n: int, rng: np.random.Generator) -> list[PatchRef]:
        """``n`` patches (seed §3.3.6 steps 1-2); the same ``rng`` state gives the same draws."""
        if n <= 0:
            return []
        which = rng.integers(0, self.classes.size, size=n)
        totals = np.array([self._cum[int(c)][-1] for c in self.classes], np.int64)
        pick = rng.integers(0, totals[which])  # pooled rank within the drawn class
        tile_i = np.empty(n, np.int64)
        rows = np.empty(n, np.int64)
        cols = np.empty(n, np.int64)
        for k, code in enumerate(self.classes.tolist()):
            sel = np.flatnonzero(which == k)
            if sel.size == 0:
                continue
            cum = self._cum[code]
            t = np.searchsorted(cum, pick[sel], side="right") - 1
            local = pick[sel] - cum[t]
            for ti in np.unique(t):
                m = t == ti
                pos = self._members[code][ti][local[m]]
                tile_i[sel[m]] = ti
                rows[sel[m]] = self.indices[ti].rows[pos]
                cols[sel[m]] = self.indices[ti].cols[pos]
        codes = self.classes[which]
        return [
            PatchRef(self.tiles[t], int(r), int(c), int(k))
            for t, r, c, k in zip(tile_i.tolist(), rows.tolist(), cols.tolist(), codes.tolist(), strict=True)
        ]


# --------------------------------------------------------------------------- reading


def read_patches(
    refl: zarr.Array, labels: zarr.Array, refs: Sequence[PatchRef], size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Slice the patches of one tile: (n, T, C, size, size) raw reflectance and (n, size, size) labels.

    Only the patch slices are read (with 64-px inner chunks a 64-px patch decodes 1-4 chunks).
    ``refs`` must all belong to the tile of ``refl``/``labels``; ``ref.tile`` is not checked here.
    """
    t, c, h, w = refl.shape
    if tuple(labels.shape) != (h, w):
        raise ValueError(f"labels of shape {labels.shape} for a cube of shape {refl.shape}")
    x = np.empty((len(refs), t, c, size, size), refl.dtype)
    y = np.empty((len(refs), size, size), labels.dtype)
    for i, ref in enumerate(refs):
        r, q = ref.row, ref.col
        if r < 0 or q < 0 or r + size > h or q + size > w:
            raise ValueError(f"patch {ref} of {size} px is outside the {h}x{w} tile")
        x[i] = refl[:, :, r : r + size, q : q + size]
        y[i] = labels[r : r + size, q : q + size]
    return x, y


# --------------------------------------------------------------------------- model inputs


def _check_indices(bands: Sequence[str], indices: Sequence[str]) -> None:
    unknown = [i for i in indices if i not in _INDEX_BANDS]
    if unknown:
        raise ValueError(f"unknown spectral indices {unknown} (known: {', '.join(INDICES)})")
    if len(set(indices)) != len(indices):
        raise ValueError(f"spectral indices repeated: {list(indices)}")
    lacking = sorted({b for i in indices for b in _INDEX_BANDS[i]} - set(bands))
    if lacking:
        raise ValueError(f"spectral indices {list(indices)} need bands {lacking}, absent from {list(bands)}")


def channels_per_date(bands: Sequence[str], indices: Sequence[str]) -> int:
    """Input channels per date: the bands, then the indices (checked as in :func:`patch_inputs`)."""
    _check_indices(bands, indices)
    return len(bands) + len(indices)


def _normalised_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``((a - b) / (a + b) + 1) / 2`` in [0, 1] on raw reflectance; 0 for no-data or a zero denominator."""
    a = a.astype(np.float32)
    b = b.astype(np.float32)
    den = a + b
    ok = (den != 0) & (a != NODATA) & (b != NODATA)
    v = np.divide(a - b, den, out=np.zeros_like(den), where=ok)
    v = (v + 1) / 2
    np.clip(v, 0, 1, out=v)  # negative surface reflectances can push the ratio outside [-1, 1]
    v[~ok] = 0
    return v


def patch_inputs(raw: np.ndarray, norm: Normalisation, indices: Sequence[str]) -> np.ndarray:
    """Raw (..., T, C, H, W) int16 -> float32 (..., T * (C + I), H, W), date-major, in [0, 1].

    For date ``t``: the C bands normalised by eq. 2 (``norm.percentiles.normalise_cube``, the one
    implementation every model uses), then the I indices in the order given: NDVI = (B8-B4)/(B8+B4)
    and NDWI = (B3-B8)/(B3+B8) on raw reflectance mapped to [0, 1] by (v + 1) / 2, brightness = mean
    of the date's normalised bands. Date-major keeps each temporal group's channels contiguous.
    """
    bands = list(norm.bands)
    _check_indices(bands, indices)
    raw = np.asarray(raw)
    x = norm.percentiles.normalise_cube(raw)  # (..., T*C, H, W); checks the (T, C) shape
    t, c = len(norm.dates), len(bands)
    lead, hw = raw.shape[:-4], raw.shape[-2:]
    x = x.reshape(*lead, t, c, *hw)
    if not indices:
        return np.ascontiguousarray(x.reshape(*lead, t * c, *hw))
    out = np.empty((*lead, t, c + len(indices), *hw), np.float32)
    out[..., :c, :, :] = x
    band = {b: raw[..., :, i, :, :] for i, b in enumerate(bands)}  # (..., T, H, W) raw
    for j, name in enumerate(indices):
        if name == "ndvi":
            out[..., c + j, :, :] = _normalised_difference(band["B8"], band["B4"])
        elif name == "ndwi":
            out[..., c + j, :, :] = _normalised_difference(band["B3"], band["B8"])
        else:  # brightness
            out[..., c + j, :, :] = x.mean(axis=-3)
    return out.reshape(*lead, t * (c + len(indices)), *hw)


# --------------------------------------------------------------------------- augmentation


def augment(x: np.ndarray, y: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Element ``k`` (0..7) of the dihedral group D4 on the last two axes of ``x`` and ``y``.

    Rotation by ``90 * (k % 4)`` degrees (``np.rot90`` direction), then a left-right mirror when
    ``k >= 4``: the seed's 90/180/270 rotations and horizontal/vertical mirrors (a vertical mirror is
    k = 6: rotate 180, mirror left-right) and their compositions. ``k = 0`` is the identity. Image
    and labels get the same transform; contiguous copies are returned.
    """
    if not 0 <= k < 8:
        raise ValueError(f"augmentation index must be in 0..7, got {k}")

    def one(a: np.ndarray) -> np.ndarray:
        a = np.rot90(a, k % 4, axes=(-2, -1))
        if k >= 4:
            a = a[..., ::-1]
        return a.copy(order="C")  # a copy even for k = 0, so callers may modify it in place

    return one(x), one(y)


def random_augment(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Augment each patch of a batch (axis 0) by its own D4 element, ``rng.integers(0, 8, size=n)``."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"batches of {x.shape[0]} images and {y.shape[0]} label patches")
    if x.shape[-1] != x.shape[-2] or y.shape[-2:] != x.shape[-2:]:
        raise ValueError(f"square, aligned patches needed, got {x.shape} and {y.shape}")
    return augment_batch(x, y, rng.integers(0, 8, size=x.shape[0]))


def augment_batch(x: np.ndarray, y: np.ndarray, ks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Patch ``i`` of the batch transformed by D4 element ``ks[i]`` (drawn by whoever plans the batch)."""
    xo = np.empty_like(x)
    yo = np.empty_like(y)
    for i, k in enumerate(np.asarray(ks).tolist()):
        xo[i], yo[i] = augment(x[i], y[i], k)
    return xo, yo


# ---------------------------------------------------------------------------------------------------
# the ``patches`` stage


def selection_index_path(train_index: Path) -> Path:
    """The selection index beside a train index (``T.train.npz`` -> ``T.selection.npz``)."""
    from pipeline.reference import SELECTION  # geopandas: only when a stage needs it

    name = Path(train_index).name
    stem = name[: -len(".train.npz")] if name.endswith(".train.npz") else Path(name).stem
    return Path(train_index).with_name(f"{stem}.{SELECTION}.npz")


def check_tile_fits(labels: Path, tile: str, size: int) -> None:
    """A tile smaller than a patch gives the networks nothing to train on; say so, and what to set,
    rather than let training end in "no tile has a valid patch position"."""
    group = open_store(labels, "reference", ("train",))
    height, width = group["train"].shape
    if min(height, width) < size:
        fit = min(height, width) // 8 * 8
        remedy = (
            f"set nets.patch_size to at most {fit} (a multiple of the networks' pooling factor)"
            if fit >= 8
            else "map it with rf only (drop the networks from classifiers)"
        )
        raise PipelineError(
            labels, f"tile {tile} is {width}x{height} px, smaller than nets.patch_size {size}: {remedy}"
        )


def index_patches(cfg: Config, tile: str, labels: Path, out: Path) -> None:
    """``landcover patches``: a tile's train positions (class-first lists) and model-selection patches."""
    from pipeline.reference import SELECTION

    # only the settings pipeline/rerun.py declares for this stage: a change to any other network
    # setting must not re-index every tile
    n = cfg["nets"]
    size = int(n["patch_size"])
    codes = [int(c) for c in cfg.class_codes]
    check_tile_fits(labels, tile, size)
    index_tile(
        labels,
        tile,
        out,
        size,
        int(n["patch_stride"]),
        float(n["min_labelled"]),
        codes,
        split="train",
        min_positions=int(n["min_class_positions"]),
        held_out=SELECTION,
    )
    # model selection: non-overlapping patches holding at least one selection pixel
    one_px = 0.5 / (size * size)
    index_tile(
        labels,
        tile,
        selection_index_path(out),
        size,
        size,
        one_px,
        codes,
        split=SELECTION,
    )
