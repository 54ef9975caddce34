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
from pipeline.io.cog import CONFIDENCE_NODATA, class_map_writer, confidence_writer
from pipeline.io.tilestore import Window, iter_windows, open_store, padded, store_grid, win_slices
from pipeline.models import Classifier, get
from pipeline.models.features import Normalisation, nodata_mask, schema_mismatch
from pipeline.parallel import read_ahead
from pipeline.regularise import majority
from pipeline.train import load_meta

log = logging.getLogger(__name__)


def predict_tile(
    cfg: Config, model_dir: Path, gapfilled: Path, out: Path, confidence: Path | None = None
) -> None:
    """Classify the gapfilled store ``gapfilled`` with the model in ``model_dir`` into ``out`` (COG).

    ``confidence`` (optional) receives the probability of the mapped class in % (uint8, nodata 255).
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
    precision = "fp32"
    if not model.pixelwise:
        check_network(model, meta, model_dir)
        precision = model.set_precision(cfg["inference"]["precision"])  # type: ignore[attr-defined]
    threads = cfg.threads()
    if hasattr(model, "set_threads"):
        model.set_threads(threads)

    inf = cfg["inference"]
    size = int(inf["window"])
    if model.pixelwise:
        radius, margin = int(inf["regularisation_radius"]), int(inf["regularisation_radius"])
    else:
        pool = model.pool_factor  # type: ignore[attr-defined]
        radius, margin = 0, -(-int(inf["overlap"]) // pool) * pool
        if size % pool:
            raise PipelineError(
                None, f"inference.window {size} is not a multiple of the pooling factor {pool}"
            )
    grid = store_grid(group)
    tile = str(group.attrs.get("tile", gapfilled.stem))
    tags = {"MODEL": str(meta["name"]), "MODEL_DIR": str(model_dir), "TILE": tile}
    tags |= {"CONFIG_DIGEST": cfg.digest, "REGULARISATION_RADIUS": str(radius), "WINDOW_MARGIN": str(margin)}
    tags["PRECISION"] = precision
    t0 = time.perf_counter()
    wins = list(iter_windows(grid.height, grid.width, size))
    with ExitStack() as stack:
        sink = stack.enter_context(class_map_writer(out, grid, cfg.classes, extra_tags=tags, threads=threads))
        conf_sink = (
            stack.enter_context(confidence_writer(confidence, grid, extra_tags=tags, threads=threads))
            if confidence
            else None
        )

        def read(win: Window) -> np.ndarray:
            big, _ = padded(win, margin, grid.height, grid.width)
            return np.asarray(refl[(slice(None), slice(None), *win_slices(big))])

        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))  # eq.-2 pass
        windows = read_ahead(wins, read)  # the next window decodes while this one is classified
        for win, cube in tqdm(
            windows, total=len(wins), desc=f"predict {tile}", unit="win", leave=False, disable=None
        ):
            _, inner = padded(win, margin, grid.height, grid.width)
            codes, conf = classify_window(model, norm, cube)
            if radius:
                codes = majority(codes, radius, nodata=0, threads=threads)
            sink.write(win, codes[inner])
            if conf_sink is not None:
                conf_sink.write(win, conf[inner])
    log.info(
        "predicted %s (%d windows, margin %d px) in %.1f s", tile, len(wins), margin, time.perf_counter() - t0
    )


def classify_window(
    model: Classifier, norm: Normalisation, cube: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(T, C, H, W) raw cube -> (H, W) class codes (0 = no data) and confidence in % (255 = no data)."""
    if not model.pixelwise:
        return model.classify_window(cube, norm)  # type: ignore[attr-defined]
    t, c, h, w = cube.shape
    codes = np.zeros(h * w, np.uint8)
    conf = np.full(h * w, CONFIDENCE_NODATA, np.uint8)
    idx = np.flatnonzero(~nodata_mask(cube))
    if idx.size:
        # gather only pixels with data, t-major channels (same layout as pixel_features)
        x = norm.apply(np.ascontiguousarray(cube.reshape(t * c, h * w)[:, idx].T))
        proba = model.predict_proba(x)
        best = proba.argmax(1)
        codes[idx] = model.classes_[best]
        conf[idx] = np.rint(proba[np.arange(best.size), best] * 100)
    return codes.reshape(h, w), conf.reshape(h, w)


def classify(model: Classifier, norm: Normalisation, cube: np.ndarray) -> np.ndarray:
    """(T, C, H, W) raw cube -> (H, W) uint8 class codes; no-data pixels are 0 and never predicted."""
    return classify_window(model, norm, cube)[0]


def check_network(model: Classifier, meta: dict, model_dir: Path) -> None:
    """The weights must agree with ``model.json`` on classes and input channels (before any compute)."""
    feats = meta["features"]
    codes = [int(c) for c in meta["classes"]["codes"]]
    if [int(c) for c in model.classes_] != codes:
        raise PipelineError(
            model_dir, f"weights' classes {list(model.classes_)} differ from model.json's {codes}"
        )
    spec = model.spec  # type: ignore[attr-defined]
    n_channels = len(feats.get("network_channels", feats["channels"]))
    if spec.in_channels * spec.groups != n_channels:
        raise PipelineError(
            model_dir,
            f"weights expect {spec.in_channels * spec.groups} input channels,"
            f" model.json describes {n_channels}",
        )
    if list(model.indices) != list(feats.get("indices", [])):  # type: ignore[attr-defined]
        raise PipelineError(model_dir, "weights' spectral indices differ from model.json's")
