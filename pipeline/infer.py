"""``landcover predict``: map one tile with a trained model into a class-map COG and a confidence COG.

The tile is processed in ``inference.window`` windows (512 px, on the store's shard grid), each read
with a margin: pixel-wise models (RF) need the regularisation radius around them, networks the
``inference.overlap`` (seed §3.4: 16 px), rounded up to the network's pooling factor so window
origins stay on the pooling grid. The margin is cut off after classification and each window is
written as soon as it is done, so memory does not grow with the tile.

Exactness: for RF the result equals regularising the whole-tile map (the vote only looks ``radius``
px away). For a network, when the margin is at least its receptive radius, the stitched map equals
one forward pass over the whole image (tests/test_stitching.py); docs/architecture.md says what the
paper's 16 px leaves. Everything about the model's inputs is checked against ``model.json`` (and the
network's weights) before any compute, so a wrong cube fails in a second with a one-line error.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from pathlib import Path

import numba
import numpy as np
from tqdm import tqdm

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.io.cog import (
    class_map_writer,
    confidence_writer,
    margin_layers,
    margin_writer,
    probability_writer,
)
from pipeline.io.tilestore import Window, iter_windows, open_store, padded, store_grid, win_slices
from pipeline.models import Classifier, get
from pipeline.models.features import Normalisation, schema_mismatch
from pipeline.parallel import read_ahead
from pipeline.regularise import majority
from pipeline.train import load_meta

log = logging.getLogger(__name__)


def predict_tile(
    cfg: Config,
    model_dir: Path,
    gapfilled: Path,
    out: Path,
    confidence: Path | None = None,
    probabilities: Path | None = None,
    margin_layer: Path | None = None,
) -> None:
    """Classify the gapfilled store ``gapfilled`` with the model in ``model_dir`` into ``out`` (COG).

    ``confidence`` (optional) receives the probability of the mapped class in % (uint8, nodata 255);
    ``probabilities`` every class's, one band per nomenclature class (a class the model has not
    learnt: 0), and ``margin_layer`` the gap between the two most probable classes (the uncertainty
    layer; both before RF's majority-vote regularisation), from the same pass.
    """
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
    model.set_threads(threads)
    how = model.map_settings(cfg, meta, model_dir)  # checks the model against model.json first
    size = int(cfg["inference"]["window"])
    grid = store_grid(group)
    tile = str(group.attrs.get("tile", gapfilled.stem))
    tags = {"MODEL": str(meta["name"]), "MODEL_DIR": str(model_dir), "TILE": tile}
    tags |= {"CONFIG_DIGEST": cfg.digest, "REGULARISATION_RADIUS": str(how.radius)}
    tags |= {"WINDOW_MARGIN": str(how.margin), "PRECISION": how.precision}
    margin = how.margin
    t0 = time.perf_counter()
    wins = list(iter_windows(grid.height, grid.width, size))
    with ExitStack() as stack:
        sink = stack.enter_context(class_map_writer(out, grid, cfg.classes, extra_tags=tags, threads=threads))
        conf_sink = (
            stack.enter_context(confidence_writer(confidence, grid, extra_tags=tags, threads=threads))
            if confidence
            else None
        )

        want = probabilities is not None or margin_layer is not None
        proba_sink = (
            stack.enter_context(
                probability_writer(probabilities, grid, cfg.classes, extra_tags=tags, threads=threads)
            )
            if probabilities
            else None
        )
        margin_sink = (
            stack.enter_context(margin_writer(margin_layer, grid, extra_tags=tags, threads=threads))
            if margin_layer
            else None
        )
        # the model's classes -> the nomenclature's bands
        band_of = [cfg.class_codes.tolist().index(int(c)) for c in model.classes_] if want else []

        def read(win: Window) -> np.ndarray:
            big, _ = padded(win, margin, grid.height, grid.width)
            return np.asarray(refl[(slice(None), slice(None), *win_slices(big))])

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))  # eq.-2 pass
        windows = read_ahead(wins, read)  # the next window decodes while this one is classified
        for win, cube in tqdm(
            windows, total=len(wins), desc=f"predict {tile}", unit="win", leave=False, disable=None
        ):
            _, inner = padded(win, margin, grid.height, grid.width)
            codes, conf, *extra = model.classify_window(cube, norm, probabilities=want)
            if extra:
                every = np.zeros((len(cfg.classes), *codes.shape))
                every[band_of] = extra[0]
                every[:, np.isnan(extra[0][0])] = np.nan
                pct, gap = margin_layers(every)
                if proba_sink is not None:
                    proba_sink.write(win, pct[:, inner[0], inner[1]])
                if margin_sink is not None:
                    margin_sink.write(win, gap[inner])
            if how.radius:
                codes = majority(codes, how.radius, nodata=0, threads=threads)
            sink.write(win, codes[inner])
            if conf_sink is not None:
                conf_sink.write(win, conf[inner])
    log.info(
        "predicted %s (%d windows, margin %d px) in %.1f s", tile, len(wins), margin, time.perf_counter() - t0
    )


def classify(model: Classifier, norm: Normalisation, cube: np.ndarray) -> np.ndarray:
    """(T, C, H, W) raw cube -> (H, W) class codes (the map type); no-data pixels are 0, never predicted."""
    return model.classify_window(cube, norm)[0]
