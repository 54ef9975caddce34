"""Config: the default file validates, defaults fill in, and wrong types / ranges fail in one line."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, load_config, validate
from pipeline.errors import PipelineError
from tests.conftest import REPO


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_default_config_is_valid_and_complete(raw):
    cfg = load_config(REPO / "config.yaml")
    seed_classes = "CUF DUF ICU RSF ASC AWC IGL ORC VIN BLF COF NGL WOM BDS BRO GPS WAT"  # seed §2.2
    assert [c.name for c in cfg.classes] == seed_classes.split()
    assert cfg.date_grid[0] == cfg.date_grid.dtype.type("2018-01-10")
    assert (cfg.date_grid[1:] - cfg.date_grid[:-1] == 20).all()
    assert cfg.date_grid[-1] <= cfg.date_grid.dtype.type("2018-12-31")
    # the networks' temporal groups split the grid evenly (6 groups of 3 dates x 10 bands)
    assert len(cfg.date_grid) == 18 and len(cfg.date_grid) % cfg["nets"]["groups"] == 0
    assert set(cfg["classifiers"]) == {"rf", "fgunet"}


def test_defaults_are_filled(raw):
    del raw["rf"]["max_depth"]
    out = validate(raw)
    assert out["rf"]["max_depth"] == 20
    assert "max_depth" not in raw["rf"], "validate must not mutate its input"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("rf", "n_estimators"), "many", "'rf/n_estimators'"),
        (("rf", "n_estimators"), 0, "'rf/n_estimators'"),
        (("date_grid", "step_days"), 0, "'date_grid/step_days'"),
        (("reference", "train_ratio"), 1.5, "'reference/train_ratio'"),
        (("inference", "window"), 500, "'inference/window'"),
        (("classifiers",), ["svm"], "'classifiers/0'"),
        (("date_grid", "start"), "2018-13-45", "'date_grid/start'"),
    ],
)
def test_wrong_values_fail_with_their_path(raw, path, value, expected):
    bad = copy.deepcopy(raw)
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(PipelineError) as err:
        validate(bad, "my.yaml")
    msg = str(err.value)
    assert msg.startswith("my.yaml: invalid config at ") and expected in msg
    assert "\n" not in msg


def test_unknown_key_is_rejected(raw):
    raw["rf"]["n_trees"] = 10
    with pytest.raises(PipelineError, match="n_trees"):
        validate(raw)


def test_semantic_checks(raw):
    dup = copy.deepcopy(raw)
    dup["nomenclature"][1]["code"] = dup["nomenclature"][0]["code"]
    with pytest.raises(PipelineError, match="duplicate class codes"):
        validate(dup)
    rev = copy.deepcopy(raw)
    rev["date_grid"]["end"] = "2017-01-01"
    with pytest.raises(PipelineError, match="end is before start"):
        validate(rev)
    pct = copy.deepcopy(raw)
    pct["normalisation"] = {"low_percentile": 97, "high_percentile": 3}
    with pytest.raises(PipelineError, match="low_percentile"):
        validate(pct)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    with pytest.raises(PipelineError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(PipelineError, match="mapping"):
        load_config(scalar)


def test_yaml_is_parsed_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("run: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_config(evil)


@pytest.mark.parametrize("overlay", ["profiles/paper.yaml", "bench/demo_year2.yaml"])
def test_overlays_validate_and_stay_in_their_workdir(raw, overlay):
    """The documented `--configfile config.yaml <overlay>` runs: Snakemake merges the overlay over the
    main config key by key; the result must validate, and every file it writes or reads as input
    must be under its own workdir (an overlay that wrote into results/demo would clobber the demo)."""
    from snakemake.utils import update_config

    merged = copy.deepcopy(raw)
    update_config(merged, yaml.safe_load((REPO / overlay).read_text()))
    cfg = validate(merged, overlay)
    work = cfg["run"]["workdir"]
    assert work != raw["run"]["workdir"]
    paths = [
        cfg["demo"]["out"],
        cfg["inputs"]["reference"],
        cfg["inputs"]["regions"],
        *(t["path"] for t in cfg["inputs"]["tiles"].values()),
    ]
    assert all(p.startswith(work + "/") for p in paths), paths


def _demo_with(raw, **inputs):
    """The default (demo) config with its inputs section changed."""
    raw = copy.deepcopy(raw)
    raw["inputs"].update(inputs)
    return raw


def test_a_demo_config_refuses_tiles_the_demo_does_not_write(raw):
    """The demo section plus a user's tile is the merged `--configfile config.yaml my.yaml`: refused
    before any work, naming the tile and the remedy, rather than mapping the demo beside it."""
    own = {"T32ULU": {"format": "sen2cor", "path": "/data/T32ULU"}}
    with pytest.raises(PipelineError) as err:
        validate(_demo_with(raw, tiles={**raw["inputs"]["tiles"], **own}), "my.yaml")
    assert str(err.value) == (
        "my.yaml: invalid config at 'inputs/tiles': T32ULU not in the demo: section's tiles "
        "(T31TCJ, T31TDJ), which would be generated and mapped beside them; drop the demo: section "
        "to map your own data, and give your config file alone (--configfile my.yaml, without config.yaml)"
    )
    moved = {**raw["inputs"]["tiles"], "T31TDJ": {"format": "theia", "path": "/data/T31TDJ"}}
    want = "'inputs/tiles/T31TDJ': the demo writes this tile as theia products in "
    with pytest.raises(PipelineError, match=want + "results/demo/inputs/T31TDJ, not theia in /data/T31TDJ"):
        validate(_demo_with(raw, tiles=moved))
    want = "'inputs/reference': the demo writes its reference as results/demo/inputs/reference.gpkg, "
    with pytest.raises(PipelineError, match=want + "not /data/lpis.gpkg"):
        validate(_demo_with(raw, reference="/data/lpis.gpkg"))
    want = "'inputs/regions': the demo writes its regions as results/demo/inputs/regions.gpkg, "
    with pytest.raises(PipelineError, match=want + "not /data/departements.gpkg"):
        validate(_demo_with(raw, regions="/data/departements.gpkg"))
    assert validate(_demo_with(raw, regions=None))["inputs"]["regions"] is None  # no regions: fine


def test_a_demo_straddling_two_zones_needs_the_national_crs(raw):
    two = copy.deepcopy(raw)
    two["demo"]["tiles"][0]["epsg"] = 32630
    with pytest.raises(
        PipelineError, match=r"'mosaic/crs': the demo's tiles are in 2 CRSs \(EPSG:32630, EPSG:32631\)"
    ):
        validate(two)
    two["mosaic"] = {"crs": "EPSG:32631"}
    assert validate(two)["mosaic"]["crs"] == "EPSG:32631"
    # a subset of the demo's tiles, or the same paths spelt differently, is still the demo
    one = {"T31TCJ": {"format": "theia", "path": "./results/demo/inputs/T31TCJ/"}}
    assert list(validate(_demo_with(raw, tiles=one))["inputs"]["tiles"]) == ["T31TCJ"]


def _snakemake_dry_run(cwd, *args):
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-n", "--cores", "all"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_readme_own_data_recipe_leaves_the_demo_out(raw, tmp_path):
    """README "Your own data", literally: copy config.yaml, drop `demo:`, list your tiles and
    reference, `snakemake --cores all --configfile my.yaml` from the folder that holds the
    repository's config.yaml. Nothing of the demo is scheduled; only the user's tile is mapped."""
    from pipeline.demo import generate

    # the user's data: one small Theia tile and its reference, made by the generator elsewhere
    maker = copy.deepcopy(raw)
    maker["demo"].update(out=str(tmp_path / "own"), size=64, tiles=[{"name": "T31TEJ"}])
    maker["inputs"].update(
        tiles={"T31TEJ": {"format": "theia", "path": str(tmp_path / "own" / "T31TEJ")}},
        reference=str(tmp_path / "own" / "reference.gpkg"),
        regions=str(tmp_path / "own" / "regions.gpkg"),
    )
    generate(Config(validate(maker)))
    shutil.copy(REPO / "config.yaml", tmp_path / "config.yaml")  # the repository root's default
    mine = copy.deepcopy(raw)
    del mine["demo"]
    mine["run"]["workdir"] = "mine"
    mine["inputs"] = {**maker["inputs"], "class_field": "code"}
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(mine, sort_keys=False))

    proc = _snakemake_dry_run(tmp_path, "--configfile", "my.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = re.findall(r"^rule (\w+):", proc.stdout, flags=re.M)
    assert "ingest" in jobs and "demo" not in jobs
    assert "tile=T31TEJ" in proc.stdout
    assert not re.search(r"T31TCJ|T31TDJ|results/demo", proc.stdout + proc.stderr)
    assert "extended by additional config" not in proc.stdout + proc.stderr
    # naming config.yaml before one's own file merges the demo in: refused in one line, nothing run
    mixed = _snakemake_dry_run(tmp_path, "--configfile", "config.yaml", "my.yaml")
    assert mixed.returncode != 0
    assert "T31TEJ not in the demo: section's tiles (T31TCJ, T31TDJ)" in mixed.stdout + mixed.stderr
    assert not (tmp_path / "mine").exists() and not (tmp_path / "results").exists()
