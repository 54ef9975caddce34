"""The pixel-wise family (RF): trained on a class-balanced pixel sample, mapped pixel by pixel.

:class:`PixelClassifier` is the stage side every pixel model shares: ``train_stage`` draws the
sample (:func:`pipeline.sampling.balanced_sample`), fits and writes the model folder;
``classify_window`` gathers the pixels with data into (N, F) features in the training layout and
maps them. A subclass brings only the estimator: ``from_config``, ``fit``, ``predict_proba``,
``save``/``load``, ``params``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.config import map_dtype
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path
from pipeline.models import MapSettings, derive_seed, refuse_options
from pipeline.models.features import Normalisation, nodata_mask

log = logging.getLogger(__name__)

CONFIDENCE_NODATA = 255


class PixelClassifier:
    """Stage methods of a pixel-wise estimator (see the module docstring)."""

    name: ClassVar[str]
    classes_: np.ndarray

    # ---- the estimator, per subclass
    @classmethod
    def from_config(cls, cfg: Any) -> PixelClassifier:
        raise NotImplementedError

    def fit(self, features: np.ndarray, labels: np.ndarray) -> PixelClassifier:
        raise NotImplementedError

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def save(self, directory: Path) -> None:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        raise NotImplementedError

    def set_threads(self, n: int) -> None:
        """Threads for predict (the node mapping a tile may differ from the one that trained)."""

    # ---- the stages
    @classmethod
    def train_stage(
        cls,
        cfg: Any,
        gapfilled: Mapping[str, Path],
        labels: Mapping[str, Path],
        percentiles: Path,
        out_dir: Path,
        *,
        fold: int | None = None,
        **kw: Any,
    ) -> None:
        """Sample the training labels of every tile (all but ``fold``, for the geometric QA's
        reference models), fit, and write the model folder at once."""
        from pipeline.train import META, model_meta

        refuse_options(cls.name, kw)
        norm = Normalisation.from_percentiles(percentiles)
        t0 = time.perf_counter()
        sample, seed, per_class, empty = training_sample(cfg, labels, gapfilled, norm, fold)
        t_sample = time.perf_counter() - t0

        model = cls.from_config(cfg)
        t1 = time.perf_counter()
        model.fit(norm.apply(sample.features), sample.labels)
        t_fit = time.perf_counter() - t1
        log.info("fitted %s in %.1f s", cls.name, t_fit)

        meta = model_meta(cfg, cls.name, model, norm, sample, per_class, empty, percentiles)
        meta["timing_s"] = {"sampling": round(t_sample, 3), "fit": round(t_fit, 3)}
        meta["samples"]["seed"] = seed
        if fold is not None:
            meta["samples"]["excluded_fold"] = fold
        with atomic_path(out_dir) as tmp:
            tmp.mkdir()
            model.save(tmp)
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")

    def map_settings(self, cfg: Any, meta: dict[str, Any], model_dir: Path) -> MapSettings:
        """Each window is read with the regularisation radius around it (the vote looks that far)."""
        radius = int(cfg["inference"]["regularisation_radius"])
        return MapSettings(margin=radius, radius=radius)

    def classify_window(
        self, cube: np.ndarray, norm: Normalisation, probabilities: bool = False
    ) -> tuple[np.ndarray, ...]:
        """(T, C, H, W) raw cube -> (H, W) class codes (0 = no data) and confidence in % (255 = no
        data); with ``probabilities``, also the (K, H, W) class probabilities (NaN = no data)."""
        t, c, h, w = cube.shape
        flat = cube.reshape(t * c, h * w)  # t-major channels: the layout of the training sample
        return map_pixels(
            lambda idx: self.predict_proba(norm.apply(np.ascontiguousarray(flat[:, idx].T))),
            self.classes_,
            ~nodata_mask(cube),
            probabilities=probabilities,
        )


def training_sample(
    cfg: Any,
    labels: Mapping[str, Path],
    gapfilled: Mapping[str, Path],
    norm: Normalisation,
    fold: int | None = None,
) -> tuple[Any, int, int, list[int]]:
    """The class-balanced pixel sample every pixel classifier trains on (RF, and ``fgunet_rf`` on
    the same pixels): ``(sample, seed, samples per class, codes without any training pixel)``.

    ``fold``: leave that fold of training polygons out (the geometric QA's reference models). Fewer
    than 2 classes with pixels is an error naming the labels.
    """
    from pipeline.sampling import balanced_sample

    per_class = int(cfg["rf"]["samples_per_class"])
    seed = derive_seed(cfg.seed, "sampling" if fold is None else f"sampling/fold{fold}")
    sample = balanced_sample(labels, gapfilled, cfg.class_codes, per_class, seed, norm, exclude_fold=fold)
    empty = [c for c in cfg.class_codes.tolist() if sample.counts.get(c, 0) == 0]
    if empty:
        log.warning("classes without training pixels (left out of the model): %s", cfg.named(empty))
    short = {c: n for c, n in sample.counts.items() if 0 < n < per_class}
    if short:
        log.info("classes with fewer than %d training pixels: %s", per_class, cfg.named(short))
    present = sorted(c for c, n in sample.counts.items() if n > 0)
    if len(present) < 2:
        raise PipelineError(
            next(iter(labels.values()), None), f"need training pixels of at least 2 classes, found {present}"
        )
    log.info("sampled %d pixels of %d classes", sample.labels.size, len(present))
    return sample, seed, per_class, empty


def map_pixels(
    proba_of: Callable[[np.ndarray], np.ndarray],
    classes: np.ndarray,
    valid: np.ndarray,
    chunk: int = 1 << 16,
    probabilities: bool = False,
) -> tuple[np.ndarray, ...]:
    """Class codes and confidence (%) of the ``valid`` pixels of an (H, W) window, from
    ``proba_of(flat pixel indices) -> (n, K)`` probabilities; elsewhere 0 and 255 (no data). With
    ``probabilities``, also the (K, H, W) probabilities (NaN where no data).

    Pixels go in chunks, so the (n, F) features a model reads never exceed ``chunk`` rows.
    """
    h, w = valid.shape
    codes = np.zeros(h * w, map_dtype(classes))
    conf = np.full(h * w, CONFIDENCE_NODATA, np.uint8)
    every = np.full((len(classes), h * w), np.nan) if probabilities else None
    idx = np.flatnonzero(valid)
    for a in range(0, idx.size, chunk):
        part = idx[a : a + chunk]
        proba = proba_of(part)
        best = proba.argmax(1)
        codes[part] = classes[best]
        conf[part] = np.rint(proba[np.arange(best.size), best] * 100)
        if every is not None:
            every[:, part] = proba.T
    out = (codes.reshape(h, w), conf.reshape(h, w))
    return out if every is None else (*out, every.reshape(len(classes), h, w))
