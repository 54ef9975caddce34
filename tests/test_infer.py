"""Tile prediction: windowed predict + regularise equals the whole-map result, schema checks first."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import rasterio
import yaml

from pipeline.errors import PipelineError
from pipeline.infer import classify, predict_tile
from pipeline.io.tilestore import add_array, create_store
from pipeline.models import get
from pipeline.models.features import NODATA, Normalisation
from pipeline.regularise import majority
from pipeline.train import load_meta, train
from tests.conftest import make_grid
from tests.test_rf import BANDS, DATES, TRAINED, H, W, make_config, make_scene


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("infer")
    scene = make_scene(tmp)
    cfg = make_config(tmp)
    model_dir = tmp / "rf"
    train(cfg, "rf", scene.gapfilled, scene.labels, scene.percentiles, model_dir)
    return tmp, scene, model_dir


def _whole_map(model_dir, cube, radius):
    """Reference: classify the whole tile at once, then regularise the whole map."""
    meta = load_meta(model_dir)
    model = get("rf").load(model_dir)
    norm = Normalisation.from_json(meta["normalisation"], BANDS, DATES)
    raw = classify(model, norm, cube)
    return raw, majority(raw, radius) if radius else raw


@pytest.mark.parametrize(("window", "radius"), [(64, 1), (64, 2), (128, 0)])
def test_windowed_equals_whole_map(setup, tmp_path, window, radius):
    tmp, scene, model_dir = setup
    cfg = make_config(tmp_path, window=window, radius=radius)
    tile = "T31TDJ"
    out = tmp_path / "maps" / f"{tile}.tif"
    predict_tile(cfg, model_dir, scene.gapfilled[tile], out)
    raw, expected = _whole_map(model_dir, scene.cubes[tile], radius)
    with rasterio.open(out) as src:
        got = src.read(1)
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.nodata == 0 and src.dtypes[0] == "uint8"
        assert src.crs == make_grid().crs
        assert src.transform.almost_equals(make_grid(W, H, ulx=399960.0 + W * 10).transform)
        assert src.colormap(1)[51][:3] == (0, 0, 255)
        assert src.tags()["MODEL"] == "rf"
    np.testing.assert_array_equal(got, expected)
    if radius:
        assert (raw != expected).any()  # the vote did change something: the equality is not vacuous
    nodata = np.all(scene.cubes[tile] == NODATA, axis=(0, 1))
    assert (got[nodata] == 0).all()
    assert (got[~nodata] > 0).all()
    assert set(np.unique(got[~nodata]).tolist()) <= set(TRAINED)
    # the map is right where it should be (separable classes, regularised)
    assert (got[~nodata] == scene.truth[tile][~nodata]).mean() > 0.9
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def _store_like(tmp_path, scene, tile, dates=DATES, bands=BANDS):
    src = scene.cubes[tile]
    t = len(dates)
    cube = np.resize(src, (t, len(bands), H, W)).astype(np.int16)
    g = create_store(tmp_path / "odd.zarr", "gapfilled", make_grid(W, H), tile=tile, bands=bands, dates=dates)
    add_array(g, "reflectance", cube.shape, "int16", NODATA)[...] = cube
    add_array(g, "clear_count", (H, W), "uint16", 0)[...] = 1
    return tmp_path / "odd.zarr"


def _no_model_load(monkeypatch):
    """Fail the test if the model would be loaded: checks must come before any compute."""

    def boom(*a, **k):
        raise AssertionError("model loaded before the schema check")

    monkeypatch.setattr(get("rf"), "load", classmethod(boom))


def test_date_mismatch_fails_before_compute(setup, tmp_path, monkeypatch):
    tmp, scene, model_dir = setup
    odd = _store_like(tmp_path, scene, "T31TCJ", dates=DATES[:2])
    _no_model_load(monkeypatch)
    out = tmp_path / "m.tif"
    with pytest.raises(PipelineError, match=r"odd\.zarr: dates differ from model .*rf's \(2 vs 3 dates"):
        predict_tile(make_config(tmp_path), model_dir, odd, out)
    assert not out.exists()


def test_band_mismatch(setup, tmp_path, monkeypatch):
    tmp, scene, model_dir = setup
    odd = _store_like(tmp_path, scene, "T31TCJ", bands=[*BANDS[:-1], "B1"])
    _no_model_load(monkeypatch)
    with pytest.raises(PipelineError, match=r"odd\.zarr: bands .*'B1'.* differ from model"):
        predict_tile(make_config(tmp_path), model_dir, odd, tmp_path / "m.tif")


def test_model_classes_outside_nomenclature(setup, tmp_path, monkeypatch):
    tmp, scene, model_dir = setup
    other = tmp_path / "rf"
    shutil.copytree(model_dir, other)
    meta = json.loads((other / "model.json").read_text())
    meta["classes"]["codes"] = [*TRAINED, 77]
    (other / "model.json").write_text(json.dumps(meta))
    _no_model_load(monkeypatch)
    with pytest.raises(PipelineError, match=r"rf: model classes \[77\] are not in the config's nomenclature"):
        predict_tile(make_config(tmp_path), other, scene.gapfilled["T31TCJ"], tmp_path / "m.tif")


def test_missing_model(setup, tmp_path):
    _, scene, _ = setup
    with pytest.raises(PipelineError, match="model metadata not found"):
        predict_tile(make_config(tmp_path), tmp_path / "nope", scene.gapfilled["T31TCJ"], tmp_path / "m.tif")


def test_cli_predict_and_validity(setup, tmp_path):
    """The CLI stages call these functions with the run layout's paths."""
    from pipeline.cli import main

    tmp, scene, model_dir = setup
    cfg = make_config(tmp_path)
    cfg_path = tmp_path / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.data))
    out = tmp_path / "map.tif"
    src = str(scene.gapfilled["T31TCJ"])
    args = ["predict", "-c", str(cfg_path), "--tile", "T31TCJ", "--model-dir", str(model_dir), "--src", src]
    assert main([*args, "--out", str(out)]) == 0
    validity = ["validity", "-c", str(cfg_path), "--tile", "T31TCJ", "--src", src]
    assert main([*validity, "--out", str(tmp_path / "v.tif")]) == 0
    with rasterio.open(tmp_path / "v.tif") as v, rasterio.open(out) as m:
        assert v.shape == m.shape == (H, W)


def test_probability_and_margin_layers_come_from_the_same_pass(setup, tmp_path):
    """With probabilities: one band per nomenclature class (0 for the classes the model never
    learnt), the model's own probabilities (predict_proba, an independent call) in %, the margin of
    the two largest, and the class map unchanged."""
    tmp, scene, model_dir = setup
    cfg = make_config(tmp_path, window=64, radius=0)
    tile = "T31TDJ"
    out, proba, gap = tmp_path / "m.tif", tmp_path / "p.tif", tmp_path / "g.tif"
    predict_tile(cfg, model_dir, scene.gapfilled[tile], out, probabilities=proba, margin_layer=gap)
    plain = tmp_path / "plain.tif"
    predict_tile(cfg, model_dir, scene.gapfilled[tile], plain)
    meta = load_meta(model_dir)
    model = get("rf").load(model_dir)
    norm = Normalisation.from_json(meta["normalisation"], BANDS, DATES)
    cube = scene.cubes[tile]
    t, c, h, w = cube.shape
    valid = ~np.all(cube == NODATA, axis=(0, 1))
    feats = norm.apply(np.ascontiguousarray(cube.reshape(t * c, h * w)[:, valid.ravel()].T))
    expected = model.predict_proba(feats)  # (n, K model classes)
    codes = cfg.class_codes.tolist()
    with (
        rasterio.open(out) as m,
        rasterio.open(plain) as p0,
        rasterio.open(proba) as p,
        rasterio.open(gap) as g,
    ):
        np.testing.assert_array_equal(m.read(1), p0.read(1))
        assert p.count == len(codes) and p.descriptions[0] == f"{codes[0]} {cfg.classes[0].name}"
        bands = p.read()
        for k, code in enumerate(model.classes_):
            got = bands[codes.index(int(code))][valid]
            np.testing.assert_array_equal(got, np.rint(expected[:, k] * 100).astype(np.uint8))
        never = [i for i, code in enumerate(codes) if code not in model.classes_.tolist()]
        assert never and (bands[never][:, valid] == 0).all()
        assert (bands[:, ~valid] == 255).all()
        top = np.sort(expected, 1)
        np.testing.assert_array_equal(
            g.read(1)[valid], np.rint((top[:, -1] - top[:, -2]) * 100).astype(np.uint8)
        )
        assert (g.read(1)[~valid] == 255).all() and g.colormap(1)[0][:3] == (255, 0, 0)
