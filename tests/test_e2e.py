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
