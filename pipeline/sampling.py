"""Class-balanced pixel sampling from the training labels of all tiles (the RF baseline's sample).

For each class, up to ``per_class`` pixels are drawn uniformly without replacement among that
class's training pixels of every tile, skipping pixels whose cube is no-data. Labels are streamed
window by window into a sparse candidate list (row, col, code); each class's candidates are put in a
seeded random order and taken from the front, so the draw is uniform and reproducible. Features are
then read grouped by 512-px window (never a full tile); a drawn pixel that turns out to be no-data
is replaced by the next candidate of its class.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zarr

from pipeline.config import map_dtype
from pipeline.errors import PipelineError
from pipeline.io.tilestore import SHARD, iter_windows, open_store, store_grid, win_slices
from pipeline.models.features import NODATA, Normalisation, schema_mismatch
from pipeline.reference import TRAIN_FOLD

log = logging.getLogger(__name__)


@dataclass
class Candidates:
    """Training pixels of one class over all tiles, in tile then row-major order."""

    tile: list[np.ndarray] = field(default_factory=list)
    row: list[np.ndarray] = field(default_factory=list)
    col: list[np.ndarray] = field(default_factory=list)

    def concat(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.row:
            empty = np.empty(0, np.int32)
            return empty, empty, empty
        return np.concatenate(self.tile), np.concatenate(self.row), np.concatenate(self.col)


@dataclass
class PixelSample:
    """The drawn pixels: raw features, codes and provenance, grouped by class in code order."""

    features: np.ndarray  # (N, T*C) int16, t-major, not yet normalised
    labels: np.ndarray  # (N,) class codes (the map type: uint8, or uint16 above 255)
    tile: np.ndarray  # (N,) index into ``tiles``
    row: np.ndarray
    col: np.ndarray
    tiles: list[str]
    available: dict[int, int]  # training pixels per class with data (before the draw)
    counts: dict[int, int]  # pixels drawn per class


def collect_candidates(
    labels: Mapping[str, Path],
    gapfilled: Mapping[str, Path],
    codes: np.ndarray,
    split: str = "train",
    exclude_fold: int | None = None,
) -> tuple[list[str], dict[int, Candidates]]:
    """Stream each tile's ``split`` labels into per-class candidate lists.

    Pixels whose ``clear_count`` is 0 (no observation at all, hence no-data) are left out here
    already, which spares reading their features; the feature read re-checks anyway.
    ``exclude_fold``: leave out the training polygons of that fold (geometric-QA reference RFs).
    """
    tiles = sorted(labels)
    if missing := sorted(set(tiles) - set(gapfilled)):
        raise PipelineError(None, f"no gapfilled store given for tiles {', '.join(missing)}")
    known = np.zeros(np.iinfo(map_dtype(codes)).max + 1, bool)  # every value such a label store holds
    known[np.asarray(codes, dtype=np.int64)] = True
    cands = {int(c): Candidates() for c in codes}
    for ti, tile in enumerate(tiles):
        need = (split, TRAIN_FOLD) if exclude_fold is not None else (split,)
        lab = open_store(labels[tile], "reference", need)
        cube = open_store(gapfilled[tile], "gapfilled", ("reflectance",))
        grid = store_grid(cube)
        if not store_grid(lab).same_as(grid):
            raise PipelineError(labels[tile], f"grid differs from the gapfilled grid of {gapfilled[tile]}")
        arr: zarr.Array = lab[split]  # type: ignore[assignment]
        clear = cube.get("clear_count")
        for win in iter_windows(grid.height, grid.width, SHARD):
            sl = win_slices(win)
            block = np.asarray(arr[sl])
            if not block.any():
                continue
            if clear is not None:
                block = np.where(np.asarray(clear[sl]) > 0, block, 0)
            if exclude_fold is not None:
                block = np.where(np.asarray(lab[TRAIN_FOLD][sl]) == exclude_fold + 1, 0, block)
            idx = np.flatnonzero(block)
            if idx.size == 0:
                continue
            got = block.ravel()[idx]
            if not known[got].all():
                bad = sorted(set(np.unique(got[~known[got]]).tolist()))
                raise PipelineError(labels[tile], f"{split} labels hold codes {bad} not in the nomenclature")
            rows = (win.row_off + idx // win.width).astype(np.int32)
            cols = (win.col_off + idx % win.width).astype(np.int32)
            order = np.argsort(got, kind="stable")
            bounds = np.flatnonzero(np.diff(got[order])) + 1
            for part in np.split(order, bounds):
                c = cands[int(got[part[0]])]
                c.tile.append(np.full(part.size, ti, np.int32))
                c.row.append(rows[part])
                c.col.append(cols[part])
    return tiles, cands


def read_pixels(refl: zarr.Array, rows: np.ndarray, cols: np.ndarray, window: int = SHARD) -> np.ndarray:
    """Raw (k, T*C) features of the given pixels, reading one bounding box per ``window``-px window."""
    t, c = refl.shape[:2]
    out = np.empty((rows.size, t * c), dtype=refl.dtype)
    if rows.size == 0:
        return out
    keys = (rows // window).astype(np.int64) * (refl.shape[-1] // window + 1) + cols // window
    order = np.argsort(keys, kind="stable")
    bounds = np.flatnonzero(np.diff(keys[order])) + 1
    for part in np.split(order, bounds):
        r, q = rows[part], cols[part]
        r0, c0 = int(r.min()), int(q.min())
        block = np.asarray(refl[:, :, r0 : int(r.max()) + 1, c0 : int(q.max()) + 1])
        out[part] = block[:, :, r - r0, q - c0].reshape(t * c, -1).T
    return out


def balanced_sample(
    labels: Mapping[str, Path],
    gapfilled: Mapping[str, Path],
    codes: np.ndarray,
    per_class: int,
    seed: int,
    norm: Normalisation | None = None,
    split: str = "train",
    exclude_fold: int | None = None,
) -> PixelSample:
    """Draw up to ``per_class`` training pixels per class (see module doc); ``seed`` fixes the draw.

    ``norm`` (when given) is only used to check each store's bands/dates before any read.
    """
    tiles, cands = collect_candidates(labels, gapfilled, codes, split, exclude_fold)
    code_type = map_dtype(codes)
    stores = [open_store(gapfilled[t], "gapfilled", ("reflectance",)) for t in tiles]
    if norm is not None:
        for tile, grp in zip(tiles, stores, strict=True):
            if why := schema_mismatch(dict(grp.attrs), norm.bands, norm.dates, against="the percentiles'"):
                raise PipelineError(gapfilled[tile], why)
    rng = np.random.default_rng(seed)
    pools = {}
    for code in sorted(cands):
        tile, row, col = cands[code].concat()
        perm = rng.permutation(row.size)
        pools[code] = (tile[perm], row[perm], col[perm])
    cursor = dict.fromkeys(pools, 0)
    kept: dict[int, list[tuple[np.ndarray, ...]]] = {code: [] for code in pools}
    n_kept = dict.fromkeys(pools, 0)
    dropped = dict.fromkeys(pools, 0)
    while True:
        batch = []  # (code, tile, row, col) of this round's draws
        for code, (tile, row, col) in pools.items():
            need = per_class - n_kept[code]
            a = cursor[code]
            b = min(row.size, a + max(need, 0))
            if b > a:
                batch.append((code, tile[a:b], row[a:b], col[a:b]))
                cursor[code] = b
        if not batch:
            break
        b_code = np.concatenate([np.full(t.size, c, np.int64) for c, t, _, _ in batch])
        b_tile = np.concatenate([t for _, t, _, _ in batch])
        b_row = np.concatenate([r for _, _, r, _ in batch])
        b_col = np.concatenate([q for _, _, _, q in batch])
        feats = np.empty((b_row.size, int(np.prod(stores[0]["reflectance"].shape[:2]))), np.int16)
        for ti in np.unique(b_tile):
            m = np.flatnonzero(b_tile == ti)
            feats[m] = read_pixels(stores[ti]["reflectance"], b_row[m], b_col[m])  # type: ignore[arg-type]
        valid = ~np.all(feats == NODATA, axis=1)
        for code in np.unique(b_code):
            m = b_code == code
            ok = m & valid
            kept[int(code)].append((feats[ok], b_tile[ok], b_row[ok], b_col[ok]))
            n_kept[int(code)] += int(ok.sum())
            dropped[int(code)] += int((m & ~valid).sum())
    parts = [p for code in sorted(kept) for p in kept[code]]
    n_feat = len(norm.channels) if norm is not None else (parts[0][0].shape[1] if parts else 0)
    labels_out = np.concatenate(
        [np.full(n_kept[c], c, code_type) for c in sorted(kept)] or [np.empty(0, code_type)]
    )
    if parts:
        feats_out = np.concatenate([p[0] for p in parts])
        tile_out, row_out, col_out = (np.concatenate([p[i] for p in parts]) for i in (1, 2, 3))
    else:
        feats_out = np.empty((0, n_feat), np.int16)
        tile_out = row_out = col_out = np.empty(0, np.int32)
    available = {c: int(pools[c][1].size - dropped[c]) for c in pools}
    return PixelSample(feats_out, labels_out, tile_out, row_out, col_out, tiles, available, n_kept)
