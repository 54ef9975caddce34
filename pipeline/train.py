"""``landcover train``: fit a registered classifier on all tiles and write its model folder.

The folder holds the fitted model plus ``model.json``, which makes it self-sufficient for
prediction: the feature schema (bands, dates, channel names), the eq.-2 normalisation values, the
class codes, and provenance (sample counts, parameters, config digest, version, timing). The whole
folder appears at once (written under a temporary name, then renamed), so a half-trained model is
never picked up by Snakemake or by ``landcover predict``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path
from pipeline.models import Classifier, derive_seed, get
from pipeline.models.features import Normalisation
from pipeline.sampling import balanced_sample

log = logging.getLogger(__name__)

META = "model.json"


def train(
    cfg: Config,
    name: str,
    gapfilled: Mapping[str, Path],
    labels: Mapping[str, Path],
    percentiles: Path,
    out_dir: Path,
    fold: int | None = None,
    **patch_kw: Any,
) -> None:
    """Train model ``name`` (registry) on the training labels of every tile into ``out_dir``.

    ``fold``: leave that fold of training polygons out (the geometric QA's reference RFs; pixel-wise
    models only). ``patch_kw`` (patch index files, checkpoint folder) go to patch models' own stage.
    """
    model_cls = get(name)
    if fold is not None and not model_cls.pixelwise:
        raise PipelineError(None, f"--fold trains a pixel-wise reference model, not {name}")
    if not model_cls.pixelwise:
        # patch models (FG-UNET, ...) bring their own sampler/training loop with the same signature
        model_cls.train_stage(cfg, gapfilled, labels, percentiles, out_dir, **patch_kw)  # type: ignore[attr-defined]
        return
    norm = Normalisation.from_percentiles(percentiles)
    t0 = time.perf_counter()
    per_class = int(cfg["rf"]["samples_per_class"])
    seed = derive_seed(cfg.seed, "sampling" if fold is None else f"sampling/fold{fold}")
    sample = balanced_sample(labels, gapfilled, cfg.class_codes, per_class, seed, norm, exclude_fold=fold)
    names = {c.code: c.name for c in cfg.classes}
    empty = [c for c in cfg.class_codes.tolist() if sample.counts.get(c, 0) == 0]
    if empty:
        log.warning("classes without training pixels (left out of the model): %s", _named(empty, names))
    short = {c: n for c, n in sample.counts.items() if 0 < n < per_class}
    if short:
        log.info("classes with fewer than %d training pixels: %s", per_class, _named(list(short), names))
    present = sorted(c for c, n in sample.counts.items() if n > 0)
    if len(present) < 2:
        raise PipelineError(
            next(iter(labels.values()), None), f"need training pixels of at least 2 classes, found {present}"
        )
    t_sample = time.perf_counter() - t0
    log.info("sampled %d pixels of %d classes in %.1f s", sample.labels.size, len(present), t_sample)

    model: Classifier = model_cls.from_config(cfg)
    t1 = time.perf_counter()
    model.fit(norm.apply(sample.features), sample.labels)
    t_fit = time.perf_counter() - t1
    log.info("fitted %s in %.1f s", name, t_fit)

    meta = model_meta(cfg, name, model, norm, sample, per_class, empty, percentiles)
    meta["timing_s"] = {"sampling": round(t_sample, 3), "fit": round(t_fit, 3)}
    meta["samples"]["seed"] = seed
    if fold is not None:
        meta["samples"]["excluded_fold"] = fold
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        model.save(tmp)
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")


def model_meta(
    cfg: Config,
    name: str,
    model: Classifier,
    norm: Normalisation,
    sample: Any,
    per_class: int,
    empty: list[int],
    percentiles: Path,
) -> dict[str, Any]:
    """Everything prediction and provenance need about a fitted model (``model.json``)."""
    return base_meta(cfg, name, model, norm, empty, percentiles) | {
        "samples": {
            "split": "train",
            "per_class_target": per_class,
            "counts": {str(c): int(n) for c, n in sorted(sample.counts.items())},
            "available": {str(c): int(n) for c, n in sorted(sample.available.items())},
            "tiles": sample.tiles,
            "seed": derive_seed(cfg.seed, "sampling"),
        },
        "params": model.params(),
    }


def base_meta(
    cfg: Config, name: str, model: Classifier, norm: Normalisation, empty: list[int], percentiles: Path
) -> dict[str, Any]:
    """The part of ``model.json`` every model shares: classes, feature schema, normalisation, provenance."""
    return {
        "name": name,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "classes": {
            "codes": [int(c) for c in model.classes_],
            "without_training_pixels": empty,
            "nomenclature": [
                {"code": c.code, "name": c.name, "label": c.label, "colour": c.colour} for c in cfg.classes
            ],
        },
        "features": {
            "bands": list(norm.bands),
            "dates": list(norm.dates),
            "channels": norm.channels,
            "order": "t-major: channel = t * n_bands + band",
            "input_nodata": -10000,
        },
        "normalisation": {**norm.to_json(), "source": str(percentiles)},
        "config_digest": cfg.digest,
        "package_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def load_meta(model_dir: Path) -> dict[str, Any]:
    """Read a model folder's ``model.json``; a missing or broken one is a :class:`PipelineError`."""
    path = Path(model_dir) / META
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(path, "model metadata not found (train the model first)") from None
    except json.JSONDecodeError as exc:
        raise PipelineError(path, f"not valid JSON ({exc})") from exc


def _named(codes: list[int], names: dict[int, str]) -> str:
    return ", ".join(f"{names.get(int(c), '?')} ({int(c)})" for c in codes)
