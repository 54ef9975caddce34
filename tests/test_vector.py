"""The vector product: sieve and polygons against GDAL's own command-line tools, per-polygon
statistics by hand, gap-free simplification, one file per region, QGIS style, nothing partial."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine

from pipeline.errors import PipelineError
from pipeline.io.cog import write_class_map
from pipeline.mosaic import build_mosaic
from pipeline.vector import mmu_pixels, qml, vector_product, vectorise_part
from tests.test_mosaic import UTM31, _grid, _tile

TR = Affine(10, 0, 500000, 0, -10, 5000000)


def _noisy(shape=(60, 80), seed=3) -> np.ndarray:
    """Blocks of classes 1-4 sprinkled with 1-3 px specks (what the sieve is for)."""
    rng = np.random.default_rng(seed)
    base = np.repeat(np.repeat(rng.integers(1, 5, (6, 8)), 10, axis=0), 10, axis=1).astype(np.uint8)
    specks = rng.random(shape) < 0.04
    base[specks] = rng.integers(1, 5, specks.sum())
    base[:3, :5] = 0  # a no-data corner
    return base


def _gdal(tool: str) -> str:
    exe = shutil.which(tool)
    if exe is None and os.environ.get("LANDCOVER_REQUIRE_GDAL_CLI") == "1":
        pytest.fail(
            f"LANDCOVER_REQUIRE_GDAL_CLI=1 but no {tool} on PATH (apt-get install gdal-bin python3-gdal)"
        )
    if exe is None:
        pytest.skip(f"{tool} not installed (Debian: apt-get install gdal-bin python3-gdal; .ci/run does)")
    return exe


def test_sieve_and_polygons_match_gdal_command_line_tools(tmp_path):
    """The same raster through gdal_sieve.py + gdal_polygonize.py and through vectorise_part
    (unsimplified): the same polygons, class by class."""
    sieve_cli, poly_cli = _gdal("gdal_sieve.py"), _gdal("gdal_polygonize.py")
    classes = _noisy()
    src = tmp_path / "in.tif"
    profile = {"driver": "GTiff", "width": 80, "height": 60, "count": 1, "dtype": "uint8", "crs": UTM31}
    with rasterio.open(src, "w", **profile, transform=TR, nodata=0) as dst:
        dst.write(classes, 1)
    subprocess.run([sieve_cli, "-q", "-st", "5", "-4", str(src), str(tmp_path / "sieved.tif")], check=True)
    subprocess.run(
        [
            poly_cli,
            "-q",
            str(tmp_path / "sieved.tif"),
            "-f",
            "GPKG",
            str(tmp_path / "gdal.gpkg"),
            "gdal",
            "code",
        ],
        check=True,
    )
    ref = gpd.read_file(tmp_path / "gdal.gpkg")
    ref = ref[ref.code > 0]
    inside = np.ones(classes.shape, bool)
    conf = np.full(classes.shape, 50, np.uint8)
    geoms, cols = vectorise_part(classes, conf, inside, np.full(classes.shape, 100.0), TR, 5, 4, 0.0)
    assert len(geoms) == len(ref)
    for code in range(1, 5):
        ours = shapely.union_all([g for g, c in zip(geoms, cols["class_code"], strict=True) if c == code])
        theirs = shapely.union_all(ref[ref.code == code].geometry.to_numpy())
        assert ours.symmetric_difference(theirs).area == 0, code
    # the sieve left no patch below 5 px, and the pixels add up
    assert cols["pixels"].min() >= 5 and cols["pixels"].sum() == (classes > 0).sum()


def test_per_polygon_statistics_by_hand():
    classes = np.ones((10, 10), np.uint8)
    classes[4:6, 4:6] = 2  # 4 px: below the 5 px unit, merged into the class-1 field around it
    classes[:, 8:] = 3  # a 20 px field of class 3, kept
    conf = np.full((10, 10), 60, np.uint8)
    conf[:, :5] = 90
    conf[0, 0] = 255  # no confidence there: left out of the mean
    areas = np.full((10, 10), 100.0)
    geoms, cols = vectorise_part(classes, conf, np.ones((10, 10), bool), areas, TR, 5, 4, 0.0)
    by_code = {int(c): i for i, c in enumerate(cols["class_code"])}
    one, three = by_code[1], by_code[3]
    assert cols["pixels"][one] == 80 and cols["class_share"][one] == pytest.approx(76 / 80)
    # class-1 polygon: columns 0-4 (49 px at 90 after the no-data one; 4 of them class 2) and 5-7 at 60
    assert cols["mean_confidence"][one] == pytest.approx(round((49 * 90 + 30 * 60) / 79, 1))
    assert cols["area_ha"][three] == pytest.approx(0.2) and cols["class_share"][three] == 1.0
    assert geoms[three].equals(shapely.box(500080, 4999900, 500100, 5000000))


def test_simplified_polygons_stay_edge_to_edge():
    classes = _noisy(seed=5)
    inside = np.ones(classes.shape, bool)
    conf = np.full(classes.shape, 50, np.uint8)
    raw, _ = vectorise_part(classes, conf, inside, np.full(classes.shape, 100.0), TR, 5, 4, 0.0)
    simple, _ = vectorise_part(classes, conf, inside, np.full(classes.shape, 100.0), TR, 5, 4, 15.0)
    assert sum(shapely.get_num_coordinates(g) for g in simple) < sum(
        shapely.get_num_coordinates(g) for g in raw
    )
    assert all(g.is_valid for g in simple)
    union = shapely.union_all(simple)
    # no overlap (the areas add up to the union) and no gap (the outer border is kept: same union)
    assert sum(g.area for g in simple) == pytest.approx(union.area, rel=1e-9)
    assert union.symmetric_difference(shapely.union_all(raw)).area == pytest.approx(0, abs=1e-6)


def test_mmu_in_pixels():
    assert mmu_pixels(0.1, _grid(0, 0, 1, 1)) == 10 and mmu_pixels(0, _grid(0, 0, 1, 1)) == 1


@pytest.fixture
def run(tmp_path):
    """A config, a two-region layer, and a one-tile mosaic under the run's layout."""
    import yaml

    from pipeline.config import load_config
    from pipeline.layout import Layout
    from tests.conftest import tiny_demo_config

    raw = tiny_demo_config()
    del raw["demo"]
    raw["run"]["workdir"] = str(tmp_path / "w")
    regions = tmp_path / "regions.gpkg"
    polys = [shapely.box(0, 0, 330, 600), shapely.box(330, 0, 800, 600)]
    gpd.GeoDataFrame({"id": ["2A", "75/01"], "name": ["West", "East"]}, geometry=polys, crs=UTM31).to_file(
        regions
    )
    raw["inputs"].update(regions=str(regions), region_name_field="name")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "c.yaml")
    lay = Layout(cfg.workdir)
    codes = np.array([c.code for c in cfg.classes])
    classes = codes[_noisy() % len(codes)]
    classes[:3, :5] = 0
    layers = _tile(tmp_path, "T31AAA", _grid(0, 600, 80, 60), classes.astype(np.uint8))
    d = lay.mosaic_dir("rf")
    build_mosaic([layers], cfg.classes, d / "classes.tif", d / "confidence.tif", d / "clear.tif")
    return cfg, lay


def test_one_geopackage_per_region_with_its_qgis_style(run):
    cfg, lay = run
    index = vector_product(cfg, lay.mosaic_dir("rf"), lay.vector_dir("rf"))
    out = lay.vector_dir("rf")
    assert [p["name"] for p in index["parts"]] == ["2A", "75_01"]  # ids made file names
    assert index["mmu_pixels"] == 10
    assert json.loads((out / "index.json").read_text()) == index
    west, east = (gpd.read_file(out / f"{n}.gpkg", layer="landcover") for n in ("2A", "75_01"))
    assert set(west.region_id) == {"2A"} and set(east.region_id) == {"75_01"}
    # the two regions' polygons meet along x = 330 m (pixel edge 330 is not one: centres decide),
    # without overlap, and together hold every mapped pixel
    both = [*west.geometry, *east.geometry]
    union = shapely.union_all(both)
    assert sum(g.area for g in both) == pytest.approx(union.area, rel=1e-9)
    mapped = (rasterio.open(lay.mosaic("rf")).read(1) > 0).sum()
    assert west.pixels.sum() + east.pixels.sum() == mapped
    assert union.area == pytest.approx(mapped * 100.0, rel=1e-9)
    assert set(west.class_name) <= {c.name for c in cfg.classes}
    with sqlite3.connect(out / "2A.gpkg") as con:
        (name, style, default), *_ = con.execute(
            "SELECT f_table_name, styleQML, useAsDefault FROM layer_styles"
        )
    assert name == "landcover" and default == 1 and style == qml(cfg.classes)
    assert (out / "2A.qml").read_text() == style
    c = cfg.classes[0]
    assert f'value="{c.code}"' in style and "{},{},{},255".format(*c.rgb) in style


def test_without_regions_the_mosaic_is_cut_in_blocks(run, tmp_path):
    import yaml

    from pipeline.config import load_config

    cfg, lay = run
    raw = yaml.safe_load((tmp_path / "c.yaml").read_text())
    raw["inputs"]["regions"] = None
    raw["vector"] = {"block_px": 256, "simplify_m": 0}
    (tmp_path / "c2.yaml").write_text(yaml.safe_dump(raw))
    index = vector_product(load_config(tmp_path / "c2.yaml"), lay.mosaic_dir("rf"), tmp_path / "vec")
    assert [p["name"] for p in index["parts"]] == ["block_000_000"]


def test_a_failed_run_leaves_the_previous_product_and_no_partial_one(run, monkeypatch):
    import pipeline.vector as vector

    cfg, lay = run
    vector_product(cfg, lay.mosaic_dir("rf"), lay.vector_dir("rf"))
    before = sorted(p.name for p in lay.vector_dir("rf").iterdir())
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    real = vector._write_part
    monkeypatch.setattr(vector, "_write_part", flaky)
    with pytest.raises(PipelineError, match="vector/rf: disk full .* nothing was written"):
        vector_product(cfg, lay.mosaic_dir("rf"), lay.vector_dir("rf"))
    assert sorted(p.name for p in lay.vector_dir("rf").iterdir()) == before
    assert [p.name for p in lay.vector_dir("rf").parent.iterdir()] == ["rf"]  # no staging left


def test_a_missing_mosaic_is_named(run, tmp_path):
    cfg, _ = run
    with pytest.raises(PipelineError, match="nowhere/classes.tif: the national mosaic is missing"):
        vector_product(cfg, Path("nowhere"), tmp_path / "v")


def test_sieve_writes_what_write_class_map_reads(tmp_path):
    """A class map written by the chain and vectorised: codes above 255 (uint16 maps) survive."""
    from pipeline.config import ClassDef

    classes = [ClassDef(300, "A", "a", "#102030"), ClassDef(1200, "B", "b", "#405060")]
    lab = np.full((20, 20), 300, np.uint16)
    lab[:, 10:] = 1200
    write_class_map(tmp_path / "m.tif", _grid(0, 200, 20, 20), classes, lab)
    with rasterio.open(tmp_path / "m.tif") as src:
        arr = src.read(1)
    geoms, cols = vectorise_part(arr, np.zeros_like(arr, np.uint8), arr > 0, np.ones(arr.shape), TR, 5, 4, 0)
    assert sorted(cols["class_code"].tolist()) == [300, 1200]
