"""``landcover predict``: map one tile with a trained model, regularise, write a class-map COG.

The tile is processed in ``inference.window`` windows read with a halo of the regularisation radius:
pixels are classified (no-data pixels -> 0, never predicted), majority-regularised on the haloed
window, and the halo cut off. Because the classifier is pixel-wise and the vote only looks ``radius``
px away, the result equals regularising the whole-tile map (the tile edge behaves as OTB's, where
outside pixels do not vote). Everything about the model's inputs is checked against ``model.json``
before any compute, so a wrong cube fails in a second with a one-line error.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.io.cog import class_map_writer
from pipeline.io.tilestore import iter_windows, open_store, padded, store_grid, win_slices
from pipeline.models import Classifier, get
from pipeline.models.features import Normalisation, nodata_mask, schema_mismatch
from pipeline.regularise import majority
from pipeline.train import load_meta

log = logging.getLogger(__name__)


def predict_tile(cfg: Config, model_dir: Path, gapfilled: Path, out: Path) -> None:
    """Classify the gapfilled tile store ``gapfilled`` with the model in ``model_dir`` into ``out`` (COG)."""
    model_dir, gapfilled = Path(model_dir), Path(gapfilled)
    meta = load_meta(model_dir)
    group = open_store(gapfilled, "gapfilled", ("reflectance",))
    feats = meta["features"]
    norm = Normalisation.from_json(meta["normalisation"], feats["bands"], feats["dates"])
    if why := schema_mismatch(dict(group.attrs), norm.bands, norm.dates, against=f"model {model_dir}'s"):
        raise PipelineError(gapfilled, why)
    refl = group["reflectance"]
    if tuple(refl.shape[:2]) != (len(norm.dates), len(norm.bands)):
        raise PipelineError(
            gapfilled,
            f"reflectance shape {refl.shape} does not match its {len(norm.dates)} dates"
            f" x {len(norm.bands)} bands",
        )
    codes = [int(c) for c in meta["classes"]["codes"]]
    if unknown := sorted(set(codes) - set(cfg.class_codes.tolist())):
        raise PipelineError(model_dir, f"model classes {unknown} are not in the config's nomenclature")
    model = get(meta["name"], model_dir).load(model_dir)
    threads = cfg.threads()
    if hasattr(model, "set_threads"):
        model.set_threads(threads)

    inf = cfg["inference"]
    size, radius = int(inf["window"]), int(inf["regularisation_radius"])
    grid = store_grid(group)
    tile = str(group.attrs.get("tile", gapfilled.stem))
    tags = {"MODEL": str(meta["name"]), "MODEL_DIR": str(model_dir), "TILE": tile}
    tags |= {"CONFIG_DIGEST": cfg.digest, "REGULARISATION_RADIUS": str(radius)}
    t0 = time.perf_counter()
    wins = list(iter_windows(grid.height, grid.width, size))
    with class_map_writer(out, grid, cfg.classes, extra_tags=tags, threads=threads) as sink:
        for win in tqdm(wins, desc=f"predict {tile}", unit="win", leave=False):
            big, inner = padded(win, radius, grid.height, grid.width)
            cube = np.asarray(refl[(slice(None), slice(None), *win_slices(big))])
            raw = classify(model, norm, cube)
            sink.write(win, majority(raw, radius, nodata=0, threads=threads)[inner] if radius else raw[inner])
    log.info("predicted %s (%d windows) in %.1f s", tile, len(wins), time.perf_counter() - t0)


def classify(model: Classifier, norm: Normalisation, cube: np.ndarray) -> np.ndarray:
    """(T, C, H, W) raw cube -> (H, W) uint8 class codes; no-data pixels are 0 and never predicted."""
    t, c, h, w = cube.shape
    out = np.zeros(h * w, np.uint8)
    idx = np.flatnonzero(~nodata_mask(cube))
    if idx.size:
        # gather only pixels with data, t-major channels (same layout as pixel_features)
        x = norm.apply(np.ascontiguousarray(cube.reshape(t * c, h * w)[:, idx].T))
        out[idx] = model.predict(x)  # class codes; no (N, K) probabilities needed for the map
    return out.reshape(h, w)
