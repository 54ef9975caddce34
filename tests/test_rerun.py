"""What makes a job rerun after a config change (pipeline/rerun.py): every setting is accounted
for, each job's digest moves with the settings it reads and with nothing else, and each stage,
run with a config that records what is read, reads no section it does not declare."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import cli
from pipeline.config import Config, load_config, validate
from pipeline.rerun import NO_EFFECT, REPORT_ONLY, STAGE_SETTINGS, family, settings_digest, stage_settings
from tests.conftest import REPO


def _leaves(node: dict, prefix: str = "") -> list[str]:
    """Dotted paths of the schema's settings (an open mapping such as inputs.tiles is one leaf)."""
    props = node.get("properties")
    if not props:
        return [prefix]
    out: list[str] = []
    for key, sub in props.items():
        out += _leaves(sub, f"{prefix}.{key}" if prefix else key)
    return out


def _covers(declared: str, leaf: str) -> bool:
    declared = declared.split(".{tile}")[0]
    return leaf == declared or leaf.startswith(declared + ".")


def test_every_setting_is_read_by_a_stage_or_declared_without_effect():
    schema = json.loads((REPO / "workflow/schema/config.schema.json").read_text())
    declared = [p for k, paths in STAGE_SETTINGS.items() if k != "report" for p in paths]
    declared += [*NO_EFFECT, *REPORT_ONLY]
    missing = [leaf for leaf in _leaves(schema) if not any(_covers(d, leaf) for d in declared)]
    assert not missing, f"settings no stage declares (pipeline/rerun.py): {missing}"
    assert STAGE_SETTINGS["report"] == ("",), "the report shows the whole config"


@pytest.fixture(scope="module")
def cfg() -> Config:
    return load_config(REPO / "config.yaml")


def _changed(cfg: Config, path: str, value: Any) -> Config:
    data = copy.deepcopy(cfg.data)
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node[p]
    node[last] = value
    return Config(validate(data))


@pytest.mark.parametrize(
    ("path", "value", "moves"),
    [
        # hand-made table: which jobs of the default run must rerun after this one change
        ("nets.epochs", 7, {("train", "fgunet")}),
        ("nets.patch_stride", 16, {("patches", None), ("train", "fgunet")}),  # its index is an input too
        ("nets.patch_size", 32, {("patches", None), ("train", "fgunet")}),
        (
            "rf.n_estimators",
            40,
            {("train", "rf"), ("train", "rf-s43"), ("train", "fgunet_rf"), ("train_reference", None)},
        ),  # fmt: skip
        ("inference.overlap", 24, {("predict", "fgunet"), ("predict", "fgunet_rf")}),
        (
            "inference.regularisation_radius",
            2,
            {("predict", "rf"), ("predict", "rf-s43"), ("predict", "rfref0")},
        ),
        ("inference.precision", "bf16", {("predict", "fgunet")}),
        ("qa.corner_distance", 4, {("qa", None)}),
        ("qa.references", 3, {("qa", None), ("split", None)}),
        ("normalisation.low_percentile", 2, {("percentiles", None)}),
        ("date_grid.step_days", 10, {("gapfill", None)}),
        (
            "run.seed",
            7,
            {
                ("train", "rf"),
                ("train", "fgunet"),
                ("train", "fgunet_rf"),
                ("split", None),
                ("train_reference", None),
                ("summarise", None),  # the intervals' bootstrap draws
                ("compare", None),
                ("design", None),  # the accuracy sample's draw
            },
        ),  # fmt: skip
        ("validation.bootstrap", 200, {("summarise", None), ("compare", None)}),  # not the split
        ("accuracy.target_se", 0.02, {("design", None)}),
        ("accuracy.interpreter_error", 0.1, {("interpret", None)}),
        ("inputs.labelled_sample", "my.gpkg", {("estimate", None)}),
        ("resources.train_network.nodes", 2, {("train", "fgunet")}),
        ("run.threads", 1, set()),
        ("nets.keep_checkpoints", 5, set()),
        ("resources.predict.mem_mb", 9000, set()),
    ],
)
def test_a_digest_moves_with_the_settings_its_job_reads_and_nothing_else(cfg, path, value, moves):
    jobs = [("train", m) for m in ("rf", "rf-s43", "fgunet", "fgunet_rf")]
    jobs += [("predict", m) for m in ("rf", "rf-s43", "rfref0", "fgunet", "fgunet_rf")]
    jobs += [(s, None) for s in ("ingest", "gapfill", "histogram", "percentiles", "validity", "split",
                                  "rasterise", "patches", "train_reference", "validate", "summarise",
                                  "compare", "qa", "design", "interpret", "estimate")]  # fmt: skip
    new = _changed(cfg, path, value)
    moved = {
        (stage, model)
        for stage, model in jobs
        if settings_digest(cfg, stage, "T31TCJ", model) != settings_digest(new, stage, "T31TCJ", model)
    }
    assert moved == moves
    assert settings_digest(cfg, "report") != settings_digest(new, "report")  # the report shows it all


def test_an_extra_seed_model_depends_on_its_own_seed(cfg):
    assert stage_settings(cfg, "train", model="rf")["run.seed"] == cfg.seed
    assert stage_settings(cfg, "train", model="rf-s43")["run.seed"] == 43
    assert stage_settings(cfg, "train", model="fgunet-s44")["run.seed"] == 44
    # run.seed moves the base models only: rf-s43 keeps its seed, and its labels come through split
    assert settings_digest(cfg, "train", model="rf-s43") == settings_digest(
        _changed(cfg, "run.seed", 7), "train", model="rf-s43"
    )
    assert [family(m) for m in ("rf", "rfref2", "fgunet-s43", "mlp3", "fgunet_rf-s43")] == [
        "pixel", "pixel", "network", "network", "hybrid",
    ]  # fmt: skip


def test_a_tile_depends_on_its_own_entry(cfg):
    data = copy.deepcopy(cfg.data)
    data["demo"]["tiles"][1]["format"] = "sen2cor"  # the demo writes what the inputs say
    other = _changed(Config(data), "inputs.tiles.T31TDJ.format", "sen2cor")
    assert settings_digest(cfg, "ingest", "T31TCJ") == settings_digest(other, "ingest", "T31TCJ")
    assert settings_digest(cfg, "ingest", "T31TDJ") != settings_digest(other, "ingest", "T31TDJ")
    with pytest.raises(ValueError, match="needs its tile"):
        stage_settings(cfg, "ingest")


# --- each stage reads no section it does not declare ------------------------------------------------


class _Recording(dict):
    """A config mapping that notes every key path read (``nets.epochs``), nested mappings too.
    Iterating or copying a mapping counts as reading all of it."""

    def __init__(self, data: dict, seen: set[str], prefix: str = "") -> None:
        super().__init__(data)
        self._seen, self._prefix = seen, prefix

    def _wrap(self, key: str, value: Any) -> Any:
        path = f"{self._prefix}{key}"
        self._seen.add(path)
        return _Recording(value, self._seen, path + ".") if isinstance(value, dict) else value

    def __getitem__(self, key: str) -> Any:
        return self._wrap(key, super().__getitem__(key))

    def get(self, key: str, default: Any = None) -> Any:
        return self._wrap(key, super().get(key, default)) if key in self else default

    def _all(self) -> None:
        self._seen.add(self._prefix.rstrip(".") or "*")

    def __iter__(self):
        self._all()
        return super().__iter__()

    def items(self):
        self._all()
        return super().items()

    def values(self):
        self._all()
        return super().values()

    def keys(self):
        self._all()
        return super().keys()

    def __deepcopy__(self, memo):
        self._all()
        return copy.deepcopy(dict(super().items()), memo)


def _undeclared(seen: set[str], key: str) -> list[str]:
    """The settings read that neither the stage's declaration, NO_EFFECT nor file placement covers."""
    leaves = {p for p in seen if not any(q.startswith(p + ".") for q in seen)}  # drop the walk to them
    placement = {"run.workdir", "inputs.tiles", "inputs.reference", "demo.out"}  # where files are
    ok = [*STAGE_SETTINGS[key], *NO_EFFECT]
    return sorted(
        p
        for p in leaves
        if p not in placement
        and not (p.startswith("inputs.tiles.") and p.endswith(".path"))
        and not any(_covers(d.replace("{tile}", p.split(".")[2] if p.count(".") > 1 else ""), p) for d in ok)
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A tiny demo run's inputs up to the label stores, made by the stages themselves."""
    from tests.conftest import tiny_demo_config

    work = tmp_path_factory.mktemp("rerun")
    raw = tiny_demo_config(size=96)
    raw["classifiers"] = ["rf", "fgunet", "fgunet_rf"]
    raw["qa"]["references"] = 2
    raw["rf"].update(n_estimators=5, samples_per_class=50)
    raw["nets"].update(
        unet_filters=[4, 8, 8],
        mlp_filters=[8, 8, 8],
        patch_size=32,
        batch_size=2,
        epochs=1,
        steps_per_epoch=2,
        warmup_epochs=1,
        selection_patches=2,
        min_class_positions=1,
        head_refit=True,  # the refit's reads are checked too
    )
    (work / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return work


STAGES: list[tuple[str, str, list[str]]] = [
    # (STAGE_SETTINGS key, command, arguments): in the order of the chain
    ("demo", "demo", []),
    ("ingest", "ingest", ["--tile", "T31TCJ"]),
    ("ingest", "ingest", ["--tile", "T31TDJ"]),
    ("gapfill", "gapfill", ["--tile", "T31TCJ"]),
    ("gapfill", "gapfill", ["--tile", "T31TDJ"]),
    ("histogram", "histogram", ["--tile", "T31TCJ"]),
    ("histogram", "histogram", ["--tile", "T31TDJ"]),
    ("percentiles", "percentiles", []),
    ("validity", "validity", ["--tile", "T31TCJ"]),
    ("split", "split", []),
    ("rasterise", "rasterise", ["--tile", "T31TCJ"]),
    ("rasterise", "rasterise", ["--tile", "T31TDJ"]),
    ("patches", "patches", ["--tile", "T31TCJ"]),
    ("patches", "patches", ["--tile", "T31TDJ"]),
    ("train:pixel", "train", ["--model", "rf"]),
    ("train:pixel", "train", ["--model", "rf", "--fold", "0", "--out", "results/models/rfref0"]),
    ("train:pixel", "train", ["--model", "rf", "--fold", "1", "--out", "results/models/rfref1"]),
    ("train:network", "train", ["--model", "fgunet"]),
    ("train:hybrid", "train", ["--model", "fgunet_rf"]),
    *(
        ("predict:" + family(m), "predict", ["--model", m, "--tile", "T31TCJ"])
        for m in ("rf", "rfref0", "rfref1", "fgunet", "fgunet_rf")
    ),  # fmt: skip
    ("validate", "validate", ["--model", "rf", "--tile", "T31TCJ"]),
    ("summarise", "summarise", ["--model", "rf", "results/metrics/rf/T31TCJ.json"]),
    ("compare", "compare", ["results/metrics/rf/overall.json"]),
    ("qa", "qa", ["--tile", "T31TCJ"]),
    ("predict:pixel", "predict", ["--model", "rf", "--tile", "T31TDJ"]),
    ("validity", "validity", ["--tile", "T31TDJ"]),
    ("mosaic", "mosaic", ["--model", "rf"]),
    ("regions", "regions", ["--model", "rf"]),
]


def test_each_stage_reads_only_the_sections_it_declares(tiny_run, monkeypatch):
    monkeypatch.chdir(tiny_run)
    seen: set[str] = set()

    def recording_config(path):
        cfg = load_config(path)
        _ = cfg.digest  # provenance, not a setting: computed before recording starts
        cfg._data = _Recording(cfg.data, seen)
        return cfg

    monkeypatch.setattr(cli, "load_config", recording_config)
    undeclared = {}
    for key, command, args in STAGES:
        seen.clear()
        assert cli.main([command, "--config", "config.yaml", *args]) == 0, (command, args)
        assert "*" not in seen, f"{command} iterated the whole config"
        if extra := _undeclared(seen, key):
            undeclared[f"{command} {' '.join(args)}"] = extra
    assert not undeclared, f"stages read settings pipeline/rerun.py does not declare: {undeclared}"


def test_a_newly_declared_setting_at_its_default_reruns_nothing(cfg, monkeypatch):
    """Upgrading the chain must not rerun every workdir because a stage now declares one more
    setting that keeps the old behaviour; a value away from (or back to) its default does count."""
    from pipeline import rerun

    cfg = _changed(cfg, "nets.head_refit", False)  # its default (the demo's config.yaml turns it on)
    before = settings_digest(cfg, "train", model="fgunet")
    declared = tuple(p for p in STAGE_SETTINGS["train:network"] if p != "nets.head_refit")
    monkeypatch.setitem(rerun.STAGE_SETTINGS, "train:network", declared)
    assert settings_digest(cfg, "train", model="fgunet") == before  # head_refit is at its default
    monkeypatch.undo()
    on = _changed(cfg, "nets.head_refit", True)
    assert settings_digest(on, "train", model="fgunet") != before
    assert settings_digest(_changed(on, "nets.head_refit", False), "train", model="fgunet") == before
    # the same inside a declared subtree: a new rf setting at its default leaves rf's digest alone
    older = copy.deepcopy(cfg.data)
    del older["rf"]["samples_per_class"]  # as if the key did not exist yet (cfg holds its default)
    assert cfg["rf"]["samples_per_class"] == 2000
    assert settings_digest(Config(older), "train", model="rf") == settings_digest(cfg, "train", model="rf")
    older["rf"]["n_estimators"] = 10
    assert settings_digest(Config(older), "train", model="rf") != settings_digest(cfg, "train", model="rf")
