"""``landcover train``: fit a registered classifier on all tiles and write its model folder.

The stage hands over to the model's family (:meth:`pipeline.models.Classifier.train_stage`); what
lives here is the part of ``model.json`` every family shares.

The folder holds the fitted model plus ``model.json``, which makes it self-sufficient for
prediction: the feature schema (bands, dates, channel names), the eq.-2 normalisation values, the
class codes, and provenance (sample counts, parameters, config digest, version, timing). The whole
folder appears at once (written under a temporary name, then renamed), so a half-trained model is
never picked up by ``landcover predict``; under Snakemake the receipt ``models/<name>.trained.json``
(:func:`write_receipt`) follows it, and a failed retrain leaves the previous folder in place.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline import __version__
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.io.atomic import write_json
from pipeline.models import derive_seed, get, module_of
from pipeline.models.features import Normalisation

log = logging.getLogger(__name__)

META = "model.json"


def train(
    cfg: Config,
    name: str,
    gapfilled: Mapping[str, Path],
    labels: Mapping[str, Path],
    percentiles: Path,
    out_dir: Path,
    **kw: Any,
) -> None:
    """Train model ``name`` (registry) on the training labels of every tile into ``out_dir``.

    ``kw`` are the family's own inputs, refused by a model they do not apply to: ``fold`` (leave that
    fold of training polygons out: the geometric QA's pixel-wise reference models), ``patches`` and
    ``checkpoints`` (networks).
    """
    get(name).train_stage(cfg, gapfilled, labels, percentiles, out_dir, **kw)


def model_meta(
    cfg: Config,
    name: str,
    model: Any,
    norm: Normalisation,
    sample: Any,
    per_class: int,
    empty: list[int],
    percentiles: Path,
) -> dict[str, Any]:
    """Everything prediction and provenance need about a fitted model (``model.json``)."""
    return base_meta(cfg, name, model.classes_, norm, empty, percentiles) | {
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
    cfg: Config, name: str, codes: Any, norm: Normalisation, empty: list[int], percentiles: Path
) -> dict[str, Any]:
    """The part of ``model.json`` every model shares: classes, feature schema, normalisation, provenance."""
    return {
        "name": name,
        "model_class": f"{module_of(name)}:{name}",
        "classes": {
            "codes": [int(c) for c in codes],
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
        "created": _now(),
    }


def write_receipt(model_dir: Path, receipt: Path) -> None:
    """Say that ``model_dir`` holds a finished model: its ``model.json`` digest, written last.

    The receipt, not the folder, is what Snakemake tracks, so a rerun that fails (or is killed)
    leaves the previous folder and the maps made from it untouched; only the receipt is missing,
    and the next run trains again."""
    meta = Path(model_dir) / META
    digest = hashlib.sha256(meta.read_bytes()).hexdigest()
    write_json(receipt, {"model_dir": str(model_dir), "model_json_sha256": digest, "created": _now()})


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def load_meta(model_dir: Path) -> dict[str, Any]:
    """Read a model folder's ``model.json``; a missing or broken one is a :class:`PipelineError`."""
    path = Path(model_dir) / META
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(path, "model metadata not found (train the model first)") from None
    except json.JSONDecodeError as exc:
        raise PipelineError(path, f"not valid JSON ({exc})") from exc
