"""The STAC catalogue: read back by pystac, every asset href resolving, relative (the run folder
copied elsewhere still resolves), classes, projection and provenance filled in."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pystac
import pytest
import shapely
import yaml
from rasterio.windows import Window

from pipeline.catalogue import build_catalogue
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.io.cog import cog_writer, confidence_writer, margin_writer, write_class_map
from pipeline.layout import Layout
from pipeline.mosaic import TileLayers, mosaic_classifier
from pipeline.regions import regions_stage
from pipeline.vector import vector_product
from tests.conftest import tiny_demo_config
from tests.test_mosaic import UTM31, _grid


@pytest.fixture
def run(tmp_path):
    """Two tiles' maps of rf, the mosaic, regions, vector product and a report, made by the stages."""
    raw = tiny_demo_config()
    del raw["demo"]
    raw["run"]["workdir"] = str(tmp_path / "run")
    raw["classifiers"] = ["rf"]
    raw.setdefault("inference", {})["probabilities"] = True  # the uncertainty layers travel too
    regions = tmp_path / "run" / "regions.gpkg"
    regions.parent.mkdir(parents=True)
    polys = [shapely.box(300000, 4999000, 300400, 5000100), shapely.box(300400, 4999000, 301000, 5000100)]
    gpd.GeoDataFrame({"id": ["A", "B"]}, geometry=polys, crs=UTM31).to_file(regions)
    raw["inputs"].update(regions=str(regions), region_name_field=None)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "c.yaml")
    lay = Layout(cfg.workdir)
    codes = [c.code for c in cfg.classes]
    for i, t in enumerate(cfg.tiles):
        g = _grid(300000 + i * 400, 5000000, 50, 40)
        lab = np.full((40, 50), codes[i], np.uint8)
        lab[10:20, 10:30] = codes[5]
        write_class_map(lay.class_map("rf", t), g, cfg.classes, lab)
        with confidence_writer(lay.confidence("rf", t), g) as sink:
            sink.write(Window(0, 0, 50, 40), np.full((40, 50), 70, np.uint8))
        with cog_writer(lay.validity(t), g, "uint16", nodata=None, resampling="AVERAGE") as sink:
            sink.write(Window(0, 0, 50, 40), np.full((40, 50), 9, np.uint16))
        with margin_writer(lay.margin("rf", t), g) as sink:
            sink.write(Window(0, 0, 50, 40), np.full((40, 50), 35, np.uint8))
    tiles = [
        TileLayers(t, lay.class_map("rf", t), lay.confidence("rf", t), lay.validity(t), lay.margin("rf", t))
        for t in cfg.tiles
    ]
    mosaic_classifier(cfg, "rf", tiles, lay.mosaic_dir("rf"))
    regions_stage(cfg, lay.mosaic_dir("rf"), lay.mosaic("rf", "regions"), lay.mosaic("rf", "regions_layer"))
    vector_product(cfg, lay.mosaic_dir("rf"), lay.vector_dir("rf"))
    lay.report().parent.mkdir(parents=True)
    lay.report().write_text("<html></html>")
    return cfg, lay


def _assets(collection: pystac.Collection) -> dict[str, dict[str, pystac.Asset]]:
    return {item.id: item.get_assets() for item in collection.get_items()}


def test_the_catalogue_reads_back_and_every_asset_resolves(run, tmp_path):
    cfg, lay = run
    out = build_catalogue(cfg, lay.catalogue().parent)
    assert out == lay.catalogue()
    col = pystac.Collection.from_file(str(out))
    assert col.id == "landcover" and col.license == "other"
    items = _assets(col)
    assert sorted(items) == ["national", "tile-T31TCJ", "tile-T31TDJ"]
    national = items["national"]
    want = {
        "rf_classes",
        "rf_confidence",
        "rf_clear",
        "rf_margin",
        "rf_areas",
        "rf_regions",
        "rf_regions_layer",
        "qa_report",
    }
    assert want <= set(national) and any(k.startswith("rf_vector_") for k in national)
    for assets in items.values():
        for key, asset in assets.items():
            href = Path(asset.get_absolute_href())
            assert lay.workdir.resolve() in href.parents and href.exists(), (key, href)
    # relative links and hrefs only: no path of this machine in any file
    for f in lay.catalogue().parent.rglob("*.json"):
        assert str(tmp_path) not in f.read_text(), f
    # classes with names and colours, the grid, the provenance
    item = col.get_item("tile-T31TCJ")
    assert {"rf_classes", "rf_confidence", "rf_margin", "clear"} <= set(item.assets)
    classes = item.assets["rf_classes"].extra_fields["classification:classes"]
    assert classes[0] == {
        "value": 0,
        "name": "nodata",
        "description": "no data / not classified",
        "nodata": True,
    }
    first = cfg.classes[0]
    assert classes[1] == {"value": first.code, "name": first.name, "description": first.label,
                          "color_hint": first.colour[1:].upper()}  # fmt: skip
    assert item.properties["proj:code"] == "EPSG:32631" and item.properties["proj:shape"] == [40, 50]
    assert item.properties["landcover:config_digest"] == cfg.digest
    assert "processing:software" in item.properties
    assert col.get_item("national").properties["proj:shape"] == [40, 90]


def test_the_run_folder_copied_elsewhere_still_resolves(run, tmp_path):
    cfg, lay = run
    build_catalogue(cfg, lay.catalogue().parent)
    web = tmp_path / "www" / "landcover-2018"
    shutil.copytree(lay.workdir, web)
    col = pystac.Collection.from_file(str(web / "catalog" / "collection.json"))
    for assets in _assets(col).values():
        for asset in assets.values():
            href = asset.get_absolute_href()
            assert href.startswith(str(web)) and os.path.exists(href), href
    links = json.loads((web / "catalog" / "collection.json").read_text())["links"]
    assert all(not link["href"].startswith("/") for link in links)


def test_a_missing_product_is_named(run):
    cfg, lay = run
    lay.mosaic("rf", "areas").unlink()
    with pytest.raises(PipelineError, match=r"areas.csv: the rf area table is missing"):
        build_catalogue(cfg, lay.catalogue().parent)
    assert not lay.catalogue().parent.exists()
