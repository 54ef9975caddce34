"""Which config values each stage's outputs depend on: what makes Snakemake rerun a job after a
config change, and only that job.

Every rule passes :func:`settings_digest` of its stage as a ``params:`` value, which Snakemake's
``params`` rerun trigger compares with the value recorded when the output was made. A change to
``nets.epochs`` thus retrains the networks (and, through their newer model folders, remaps their
tiles), and leaves ingest, gapfill and RF alone; an unchanged config changes no digest.

The declarations are checked two ways (``tests/test_rerun.py``): every leaf of the config schema is
read by some stage or listed in :data:`NO_EFFECT` / :data:`REPORT_ONLY`, and each stage, run with
a config that records every key read, reads nothing it does not declare. A stage that starts
reading a new setting must add it here, or its outputs go stale silently.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.layout import Layout
from pipeline.models import HYBRIDS, is_network

# The settings read by each stage (dotted paths into the validated config; a path names its whole
# subtree; "{tile}" is the job's tile). Families differ where their code does: ``train:pixel`` is
# RF (and the QA's reference RFs), ``train:network`` the seed's networks, ``train:hybrid`` FG-UNET
# features + RF. Files a stage reads (products, label stores, models) are Snakemake inputs, not here.
STAGE_SETTINGS: dict[str, tuple[str, ...]] = {
    "demo": ("demo", "nomenclature"),
    "ingest": ("inputs.tiles.{tile}.format", "inputs.tiles.{tile}.cube"),
    "gapfill": ("date_grid",),
    "histogram": (),
    "percentiles": ("normalisation",),
    "validity": (),
    # polygons -> tiles, train / selection / validation and the QA's folds, all from the run seed
    "split": (
        "inputs.reference",
        "inputs.class_field",
        "inputs.tiles",
        "nomenclature",
        "reference",
        "qa.references",
        "run.seed",
    ),  # fmt: skip
    "rasterise": ("nomenclature",),  # the label stores' type (uint8, or uint16 above code 255)
    "patches": (
        "nets.patch_size",
        "nets.patch_stride",
        "nets.min_labelled",
        "nets.min_class_positions",
        "nomenclature",
    ),  # fmt: skip
    "train:pixel": ("rf", "nomenclature", "run.seed"),
    "train:network": (
        *(
            f"nets.{k}"
            for k in (
                "groups",
                "unet_filters",
                "mlp_filters",
                "dropout",
                "lstm_hidden",
                "indices",
                "patch_size",
                "patch_stride",
                "min_labelled",
                "min_class_positions",
                "allow_undrawn_classes",
                "class_weights",
                "max_class_weight",
                "batch_size",
                "epochs",
                "steps_per_epoch",
                "warmup_epochs",
                "learning_rate",
                "lr_schedule",
                "augment",
                "selection_patches",
                "device",
                "precision",
                "init_from",
                "head_refit",
                "weight_init",
                "unet_aux_loss",
            )
        ),
        # nodes x tasks: the global batch and the warm-up's learning-rate scaling (eq. 3)
        "resources.train_network.nodes",
        "resources.train_network.tasks_per_node",
        "rf.samples_per_class",  # the pixel sample of nets.head_refit
        "nomenclature",
        "run.seed",
    ),  # fmt: skip
    "train:hybrid": ("rf", "inference.window", "nomenclature", "run.seed"),
    "predict:pixel": ("inference.window", "inference.regularisation_radius", "nomenclature"),
    "predict:network": ("inference.window", "inference.overlap", "inference.precision", "nomenclature"),
    "predict:hybrid": ("inference.window", "inference.overlap", "nomenclature"),
    "validate": ("nomenclature",),
    "summarise": ("nomenclature", "validation.bootstrap", "run.seed"),  # the intervals' draws
    "compare": ("classifiers", "nomenclature", "validation.bootstrap", "run.seed"),
    "qa": ("qa", "classifiers", "nomenclature"),
    "mosaic": ("mosaic.crs", "mosaic.resolution", "nomenclature"),
    "vector": (
        "vector",
        "inputs.regions",
        "inputs.region_id_field",
        "inputs.region_name_field",
        "nomenclature",
    ),  # fmt: skip
    "regions": (
        "inputs.regions",
        "inputs.region_id_field",
        "inputs.region_name_field",
        "mosaic.few_clear",
        "nomenclature",
    ),  # fmt: skip
    "design": (
        *(
            f"accuracy.{k}"
            for k in ("design_on", "target_se", "users_accuracy", "min_per_class", "max_points")
        ),
        "classifiers",  # the first one is the default design_on
        "nomenclature",
        "run.seed",
    ),  # fmt: skip
    "interpret": ("accuracy.interpreter_error", "demo.seed", "nomenclature"),
    "suggest": ("inference.suggest_points", "inference.suggest_spacing", "mosaic.crs", "nomenclature"),
    "estimate": ("accuracy.allow_unlabelled", "inputs.labelled_sample", "classifiers", "nomenclature"),
    "report": ("",),  # the whole config: the report shows it
    "catalogue": ("",),  # the whole config: its digest is in every item
}

# Settings that change how a job runs, never what it writes: no job reruns for them.
NO_EFFECT: tuple[str, ...] = (
    "run.workdir",  # every path moves with it: a new workdir is a new run
    "run.threads",
    "run.seeds",  # adds or drops the extra seeds' models; each one's own seed is in its digest
    "accuracy.enabled",  # adds or drops the accuracy-sample jobs
    "inference.probabilities",  # adds or drops the probability / margin layers and the suggestions
    "resources",  # except train_network's nodes and tasks, above
    "dask",
    "nets.keep_checkpoints",
)
# Read only by the stages that depend on the whole config: the QA report (it shows it) and the STAC
# catalogue (its items record its digest).
REPORT_ONLY: tuple[str, ...] = ("report", "catalogue")


def family(model: str) -> str:
    """``pixel``, ``network`` or ``hybrid``: whose code trains and maps ``model`` (``rf-s43`` -> rf's)."""
    classifier = Layout.split_seed_model(model)[0]
    if classifier in HYBRIDS:
        return "hybrid"
    return "network" if is_network(classifier) else "pixel"


def stage_key(stage: str, model: str | None = None) -> str:
    """The :data:`STAGE_SETTINGS` entry of a job: ``train`` and ``predict`` depend on the family."""
    if stage == "train_reference":
        return "train:pixel"
    if stage in ("train", "predict"):
        if model is None:
            raise ValueError(f"stage {stage} needs its model")
        return f"{stage}:{family(model)}"
    return stage


def _lookup(data: dict[str, Any], path: str) -> Any:
    node: Any = data
    for part in filter(None, path.split(".")):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def stage_settings(cfg: Config, stage: str, tile: str | None = None, model: str | None = None) -> dict:
    """The values one job's outputs depend on, by dotted path (the job's own seed for ``run.seed``)."""
    key = stage_key(stage, model)
    if key not in STAGE_SETTINGS:
        raise PipelineError(None, f"no declared settings for stage {stage!r}")
    out: dict[str, Any] = {}
    for path in STAGE_SETTINGS[key]:
        if "{tile}" in path:
            if tile is None:
                raise ValueError(f"stage {stage} needs its tile")
            path = path.format(tile=tile)
        out[path] = _lookup(cfg.data, path)
    if "run.seed" in out and model is not None:
        seed = Layout.split_seed_model(model)[1]
        out["run.seed"] = cfg.seed if seed is None else seed
    return out


@functools.cache
def _schema() -> dict[str, Any]:
    from pipeline.config import _schema as load

    return load()


def _schema_node(path: str) -> dict[str, Any]:
    node = _schema()
    for part in filter(None, path.split(".")):
        node = node.get("properties", {}).get(part, {})
    return node


def _at_default(value: Any, node: dict[str, Any]) -> bool:
    """A setting (not a section) holding its schema default."""
    return not isinstance(value, dict) and "default" in node and value == node["default"]


def _without_defaults(value: Any, node: dict[str, Any]) -> Any:
    """``value`` with every setting that holds its schema default left out, recursively."""
    if not isinstance(value, dict) or "properties" not in node:
        return value
    subs = {key: node["properties"].get(key, {}) for key in value}
    return {k: _without_defaults(v, subs[k]) for k, v in value.items() if not _at_default(v, subs[k])}


def settings_digest(cfg: Config, stage: str, tile: str | None = None, model: str | None = None) -> str:
    """A short hash of :func:`stage_settings`: the rule's ``params:`` value that Snakemake compares.

    Settings at their schema default are left out, so a setting added to the schema (and declared
    here) with a default that keeps the old behaviour does not rerun every existing workdir; any
    value set away from, or back to, its default still changes the digest.
    """
    values = {}
    for path, value in stage_settings(cfg, stage, tile, model).items():
        node = _schema_node(path)
        if not _at_default(value, node):
            values[path] = _without_defaults(value, node)
    blob = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
