"""Shared fixtures: tiny grids built on the fly, and the real samples in ../shared/data/real."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from affine import Affine
from rasterio.crs import CRS

from pipeline.io.tilestore import Grid

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


@pytest.fixture
def real_data() -> Path:
    """The folder of real Sentinel-2 samples beside the repo; skip when a clone lacks it."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real samples not found at {REAL_DATA} (only present beside the project checkout)")
    return REAL_DATA


def make_grid(width: int = 128, height: int = 96, ulx: float = 399960.0, uly: float = 4800000.0) -> Grid:
    """A 10 m UTM 31N grid on the MGRS pixel lattice."""
    return Grid(CRS.from_epsg(32631), Affine(10.0, 0.0, ulx, 0.0, -10.0, uly), width, height)


@pytest.fixture
def grid() -> Grid:
    return make_grid()


def tiny_demo_config(size: int = 192) -> dict:
    """The default config with the demo shrunk to two ``size``-px tiles, its inputs and outputs
    relative to the run folder (Snakemake runs there): the base of the end-to-end runs."""
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["run"]["workdir"] = "results"
    raw["demo"].update(out="inputs", size=size)
    tiles = raw["demo"]["tiles"]
    raw["inputs"]["tiles"] = {
        t["name"]: {"format": t["format"], "path": f"inputs/{t['name']}"} for t in tiles
    }
    raw["inputs"]["reference"] = "inputs/reference.gpkg"
    raw["inputs"]["regions"] = "inputs/regions.gpkg"
    raw["rf"]["n_estimators"] = 50
    return raw
