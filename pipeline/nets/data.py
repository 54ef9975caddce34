"""Training data of the networks: every tile's cube, labels and patch positions, read per patch.

Also the checks on what the sampler can draw (every class with training pixels must be drawable)
and the pixel counts behind the eq.-4 weights.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.config import Config, map_dtype
from pipeline.errors import PipelineError
from pipeline.io.tilestore import iter_windows, open_store, store_grid, win_slices
from pipeline.models.features import NODATA, Normalisation, nodata_mask, schema_mismatch
from pipeline.nets.distributed import World, tile_holders
from pipeline.nets.patches import ClassFirstSampler, PatchIndex, PatchRef, read_patches, selection_index_path
from pipeline.nets.settings import NetSettings
from pipeline.reference import SELECTION, training_labels

log = logging.getLogger(__name__)


class PatchData:
    """Every tile's gapfilled cube, labels and patch positions, opened lazily (zarr reads per patch)."""

    def __init__(
        self,
        gapfilled: Mapping[str, Path],
        labels: Mapping[str, Path],
        patches: Mapping[str, Path],
        norm: Normalisation,
        size: int,
    ) -> None:
        self.norm, self.size = norm, size
        self.refl: dict[str, Any] = {}
        self.labels: dict[str, Any] = {}
        self.train_index: dict[str, PatchIndex] = {}
        self.select_index: dict[str, PatchIndex] = {}
        # label codes are uint8, or uint16 for a nomenclature above 255 (pipeline.config.map_dtype)
        self.code_dtype = np.dtype(np.uint8)
        for tile, path in gapfilled.items():
            group = open_store(path, "gapfilled", ("reflectance",))
            if why := schema_mismatch(dict(group.attrs), norm.bands, norm.dates, against="the percentiles'"):
                raise PipelineError(path, why)
            ref = open_store(labels[tile], "reference", ("train", SELECTION))
            if not store_grid(ref).same_as(store_grid(group)):
                raise PipelineError(labels[tile], f"label grid differs from the gapfilled store {path}")
            self.refl[tile] = group["reflectance"]
            self.labels[tile] = {"train": training_labels(ref), SELECTION: ref[SELECTION]}
            self.code_dtype = np.promote_types(self.code_dtype, ref["train"].dtype)
            self.train_index[tile] = _load_index(patches[tile], size)
            self.select_index[tile] = _load_index(selection_index_path(patches[tile]), size)

    def digest(self) -> str:
        """A fingerprint of every tile's train/selection patch positions (changes with the labels)."""
        h = hashlib.sha256()
        for tile in sorted(self.train_index):
            h.update(tile.encode())
            for idx in (self.train_index[tile], self.select_index[tile]):
                for arr in (idx.rows, idx.cols, idx.class_codes, idx.class_offsets, idx.class_members):
                    h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()[:16]

    def class_counts(self, codes: np.ndarray, world: World | None = None) -> np.ndarray:
        """Training pixels per class over all tiles (streamed by window), for the eq.-4 weights.

        With several processes each counts the tiles it holds and the counts are summed.
        """
        world = world or World()
        holders = tile_holders(list(self.labels), world.size)
        top = np.iinfo(map_dtype(codes)).max + 1  # every value a label store of these codes holds
        counts = np.zeros(top, np.int64)
        for tile, ref in self.labels.items():
            if holders[tile][0] != world.rank:
                continue
            arr = ref["train"]
            for win in iter_windows(*arr.shape):
                counts += np.bincount(np.asarray(arr[win_slices(win)]).ravel(), minlength=top)[:top]
        if world.size > 1:
            total = torch.from_numpy(counts)
            dist.all_reduce(total)
            counts = total.numpy()
        return counts[np.asarray(codes, dtype=np.int64)]

    def read(self, refs: Sequence[PatchRef], split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """(n, T, C, N, N) raw patches and (n, N, N) label codes, in the order of ``refs``."""
        t, c = self.refl[refs[0].tile].shape[:2]
        x = np.empty((len(refs), t, c, self.size, self.size), np.int16)
        y = np.empty((len(refs), self.size, self.size), self.code_dtype)
        for tile in dict.fromkeys(r.tile for r in refs):
            at = [i for i, r in enumerate(refs) if r.tile == tile]
            x[at], y[at] = read_patches(
                self.refl[tile], self.labels[tile][split], [refs[i] for i in at], self.size
            )
        # a labelled pixel without any observation has nothing to learn from (as in the RF sample)
        empty = x[:, 0, 0] == NODATA
        if empty.any():
            empty[empty] = np.all(x.transpose(0, 3, 4, 1, 2)[empty] == NODATA, axis=(1, 2))
            y[empty] = 0
        return x, y

    def read_in_context(
        self, ref: PatchRef, split: str, margin: int
    ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """One patch with ``margin`` px of its tile around it (clipped at the tile's edges): the raw
        (T, C, h, w) window, the patch's (N, N) labels, and the patch's offset in the window.

        A network then sees the patch as the mapping stage does (with its context, not zero padding
        where the patch is cut out), so scores on it agree with the map's.
        """
        refl = self.refl[ref.tile]
        h, w = refl.shape[-2:]
        r0, c0 = max(0, ref.row - margin), max(0, ref.col - margin)
        r1, c1 = min(h, ref.row + self.size + margin), min(w, ref.col + self.size + margin)
        x = np.asarray(refl[:, :, r0:r1, c0:c1])
        rows, cols = slice(ref.row, ref.row + self.size), slice(ref.col, ref.col + self.size)
        y = np.array(self.labels[ref.tile][split][rows, cols], dtype=self.code_dtype)
        off = (ref.row - r0, ref.col - c0)
        inner = x[:, :, off[0] : off[0] + self.size, off[1] : off[1] + self.size]
        y[nodata_mask(inner)] = 0  # no observation: nothing to score (as in read)
        return x, y, off

    def read_labels(self, refs: Sequence[PatchRef], split: str = "train") -> np.ndarray:
        """(n, N, N) label codes of ``refs`` without their reflectance (for pixel statistics)."""
        y = np.empty((len(refs), self.size, self.size), self.code_dtype)
        for i, r in enumerate(refs):
            y[i] = self.labels[r.tile][split][r.row : r.row + self.size, r.col : r.col + self.size]
        return y

    def selection_refs(self, n: int, seed: int) -> list[PatchRef]:
        """Up to ``n`` fixed model-selection patches, uniform over every tile's selection positions."""
        pool = [
            PatchRef(tile, int(r), int(c), 0)
            for tile, idx in self.select_index.items()
            for r, c in zip(idx.rows, idx.cols, strict=True)
        ]
        if len(pool) <= n:
            return pool
        pick = np.sort(np.random.default_rng(seed).choice(len(pool), n, replace=False))
        return [pool[i] for i in pick]


def _load_index(path: Path, size: int) -> PatchIndex:
    index = PatchIndex.load(path)
    if index.size != size:
        raise PipelineError(
            path, f"patch positions are for {index.size}-px patches, nets.patch_size is {size}"
        )
    return index


def check_drawable(
    cfg: Config, sampler: ClassFirstSampler, counts: np.ndarray, s: NetSettings, where: Path | None
) -> None:
    """Stop when a class with training pixels can never be drawn, unless the config accepts it.

    Such a class reaches the network only as a bystander in other classes' patches, or not at all,
    and the map lacks it without any sign but a log line. A class without any training pixel is
    left out as by every classifier (a warning): no sampler can help there.
    """
    drawn = set(sampler.classes.tolist())
    codes = [int(c) for c in cfg.class_codes]
    no_px = [c for c, n in zip(codes, counts, strict=True) if n == 0]
    if no_px:
        log.warning("classes without training pixels (never a target): %s", cfg.named(no_px))
    undrawn = [c for c, n in zip(codes, counts, strict=True) if n > 0 and c not in drawn]
    if not undrawn:
        return
    msg = (
        f"classes with training pixels in no {s.patch_size}x{s.patch_size}-px patch position of any tile,"
        f" so never drawn for training: {cfg.named(undrawn)}"
    )
    if not s.allow_undrawn_classes:
        raise PipelineError(
            where, msg + " (lower nets.patch_size, add reference polygons, or set nets.allow_undrawn_classes)"
        )
    log.warning("%s; trained anyway (nets.allow_undrawn_classes)", msg)


def sampled_pixels(
    data: PatchData, sampler: ClassFirstSampler, codes: np.ndarray, seed: int, n: int = 2048
) -> np.ndarray:
    """Labelled training pixels per class in ``n`` patches drawn as training draws them.

    The class-first sampler already shows rare classes far more often than their share of the
    tiles; eq. 4 on these counts corrects only what the sampler leaves (one rebalancing, not two).
    Every process draws the same patches from ``seed``, so all get the same weights.
    """
    refs = sampler.draw(n, np.random.default_rng(seed))
    codes = np.asarray(codes, dtype=np.int64)
    seen = np.bincount(data.read_labels(refs).ravel(), minlength=int(codes.max(initial=0)) + 1)
    return seen[codes]


def code_lut(codes: np.ndarray) -> np.ndarray:
    """Class code -> class index (-1 elsewhere), over every value of the codes' map type."""
    lut = np.full(np.iinfo(map_dtype(codes)).max + 1, -1, np.int64)
    lut[np.asarray(codes, dtype=np.int64)] = np.arange(len(codes))
    return lut
