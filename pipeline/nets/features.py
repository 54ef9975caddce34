"""A trained network's penultimate features at chosen pixels, computed window by window as the map
computes them: what ``fgunet_rf`` classifies with its forest and ``nets.head_refit`` refits the last
layer on. Its own module so both can use it without importing each other."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.io.tilestore import iter_windows, open_store, padded, store_grid, win_slices
from pipeline.models.features import Normalisation


def network_features(
    net: Any,  # a NetClassifier (penultimate_window)
    norm: Normalisation,
    gapfilled: Mapping[str, Path],
    sample: Any,
    window: int,
    margin: int,
) -> np.ndarray:
    """(N, F) float32 penultimate features of the sample's pixels, in sample order.

    Only windows holding sampled pixels are computed, each read with ``margin`` px around it (the
    window grid of mapping, so a pixel's features are those its map would use).
    """
    out: np.ndarray | None = None
    for ti, tile in enumerate(sample.tiles):
        at = np.flatnonzero(sample.tile == ti)
        if not at.size:
            continue
        group = open_store(gapfilled[tile], "gapfilled", ("reflectance",))
        refl, grid = group["reflectance"], store_grid(group)
        wins = list(iter_windows(grid.height, grid.width, window))  # row-major, as the key below
        key = (sample.row[at] // window) * -(-grid.width // window) + sample.col[at] // window
        for k in tqdm(np.unique(key), desc=f"features {tile}", unit="win", leave=False, disable=None):
            win = wins[int(k)]
            big, inner = padded(win, margin, grid.height, grid.width)
            cube = np.asarray(refl[(slice(None), slice(None), *win_slices(big))])
            f = net.penultimate_window(cube, norm)[:, inner[0], inner[1]]
            m = at[key == k]
            if out is None:
                out = np.empty((sample.row.size, f.shape[0]), np.float32)
            out[m] = f[:, sample.row[m] - win.row_off, sample.col[m] - win.col_off].T
    if out is None:
        raise PipelineError(None, "no sampled pixel to compute network features for")
    return out
