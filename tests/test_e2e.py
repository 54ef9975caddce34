"""The whole chain under Snakemake on a tiny demo country (2 tiles), as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml

from pipeline.config import load_config
from pipeline.layout import Layout
from pipeline.models import NETWORKS
from tests.conftest import REPO

pytestmark = pytest.mark.e2e


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]
    cmd += ["--directory", str(workdir), "--cores", "2", *args]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("e2e")
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["run"]["workdir"] = "results"
    raw["demo"].update(out="inputs", size=192)
    tiles = raw["demo"]["tiles"]
    raw["inputs"]["tiles"] = {
        t["name"]: {"format": t["format"], "path": f"inputs/{t['name']}"} for t in tiles
    }
    raw["inputs"]["reference"] = "inputs/reference.gpkg"
    raw["rf"]["n_estimators"] = 50
    raw["qa"]["references"] = 3
    # every network of the family through the same targets as RF, small enough for CI
    raw["classifiers"] = ["rf", *NETWORKS]
    raw["nets"].update(
        unet_filters=[8, 16, 32], mlp_filters=[32, 16, 16], lstm_hidden=16, patch_size=32,
        batch_size=4, epochs=2, steps_per_epoch=6, warmup_epochs=1, validation_patches=8,
    )  # fmt: skip
    (work / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    proc = _snakemake(work)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return work


def test_maps_validity_and_metrics(run):
    cfg = load_config(run / "config.yaml")
    lay = Layout(run / cfg.workdir)
    for tile in cfg.tiles:
        with rasterio.open(lay.class_map("rf", tile)) as src:
            assert src.dtypes[0] == "uint8" and src.nodata == 0
            assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
            cmap = src.colormap(1)
            for c in cfg.classes:
                assert cmap[c.code][:3] == c.rgb
            data = src.read(1)
            assert set(np.unique(data)) <= {0, *cfg.class_codes.tolist()}
            assert len(np.unique(data)) >= 5
        with rasterio.open(lay.validity(tile)) as src:
            assert src.read(1).max() > 0
    overall = json.loads(lay.overall_metrics("rf").read_text())
    chance_oa = 1 / len(cfg.classes)
    assert overall["kappa"] > 0.5, overall["kappa"]  # well above chance (kappa 0)
    assert overall["oa"] > 3 * chance_oa


def test_networks_map_every_tile_and_are_compared(run):
    cfg = load_config(run / "config.yaml")
    lay = Layout(run / cfg.workdir)
    for name in cfg["classifiers"]:
        for tile in cfg.tiles:
            with (
                rasterio.open(lay.class_map(name, tile)) as m,
                rasterio.open(lay.confidence(name, tile)) as c,
            ):
                codes, conf = m.read(1), c.read(1)
                assert m.tags()["MODEL"] == name
                assert c.nodata == 255 and c.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
            assert set(np.unique(codes)) <= {0, *cfg.class_codes.tolist()}
            assert ((conf == 255) == (codes == 0)).all()  # confidence exactly where there is a class
            assert conf[codes > 0].max() <= 100
        doc = json.loads(lay.overall_metrics(name).read_text())
        assert doc["model"] == name and doc["n_pixels"] > 0
    table = lay.comparison("md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| classifier"))
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    assert set(cfg["classifiers"]) <= set(rows), table
    assert "kappa T31TCJ" in header
    csv_head = lay.comparison("csv").read_text().splitlines()[0]
    assert csv_head.startswith("classifier,OA,kappa")
    # the training curves exist for every network
    for name in NETWORKS:
        assert (lay.model_dir(name) / "training.png").stat().st_size > 0


def test_geometric_qa_per_tile(run):
    cfg = load_config(run / "config.yaml")
    lay = Layout(run / cfg.workdir)
    for tile in cfg.tiles:
        doc = json.loads(lay.qa(tile).read_text())
        assert len(doc["references"]) == 3 and all(r["corners"] > 0 for r in doc["references"])
        rr = doc["reference_vs_reference"]
        assert 0 < rr["mean"] <= 1 and len(rr["pairs"]) == 6
        assert set(doc["models"]) == set(cfg["classifiers"])
        for m in doc["models"].values():
            assert m["mean"] is None or 0 <= m["mean"] <= 1


def test_one_tile_target_rebuilds_only_that_tile(run):
    cfg = load_config(run / "config.yaml")
    lay = Layout(run / cfg.workdir)
    first, second = cfg.tiles[:2]
    target = lay.class_map("rf", first)
    other_mtime = lay.class_map("rf", second).stat().st_mtime_ns
    target.unlink()
    proc = _snakemake(run, str(target.relative_to(run)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "rule predict" in log and log.count("rule ") == 1, log[-3000:]
    assert target.exists()
    assert lay.class_map("rf", second).stat().st_mtime_ns == other_mtime
