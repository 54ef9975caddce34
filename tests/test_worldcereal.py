"""The whole chain on real data it has never seen: the WorldCereal patch (Flanders, 64 x 64 px, 72
dates) as a netCDF cube, with its LPIS crop types recoded to land cover, through Snakemake."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import h5py
import numpy as np
import pytest
import rasterio
import yaml
from affine import Affine
from rasterio.features import shapes
from shapely.geometry import shape
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import cohen_kappa_score

from pipeline.config import load_config
from pipeline.io.tilestore import open_store
from pipeline.layout import Layout
from tests.conftest import REPO
from tests.l2a_synth import WORLDCEREAL

pytestmark = [pytest.mark.e2e, pytest.mark.real]
LABELS = "OUTPUT_POLY-110_10m_0000280849BAC91C_32631_2018-08-01_2019-11-30.nc"
# the patch's crop types (CT) and its land cover (LC): every crop type is annual cropland (LC 11)
# but grassland 9120 (LC 13); CT 0 is LC 99, no crop-type label (checked on the data below)
CROPLAND = (1110, 1200, 1500, 1510, 5100, 8100)


def _labels(real: Path) -> tuple[np.ndarray, np.ndarray, Affine]:
    with h5py.File(real / WORLDCEREAL / LABELS) as f:
        x, y = f["x"][:], f["y"][:]
        return (
            f["CT"][:].astype(np.int32),
            f["LC"][:].astype(np.int32),
            Affine(10, 0, x[0] - 5, 0, -10, y[0] + 5),
        )


def _polygons(ct: np.ndarray, transform: Affine, out: Path) -> Path:
    """The LPIS parcels back as polygons: one per connected patch of one crop type (CT 0 included,
    for the chain to leave out)."""
    rows = [
        {"code": int(v), "geometry": shape(g)} for g, v in shapes(ct, transform=transform, connectivity=4)
    ]
    gpd.GeoDataFrame(rows, geometry=[r.pop("geometry") for r in rows], crs="EPSG:32631").to_file(out)
    return out


def _run(work: Path, real: Path, change) -> Path:
    """The chain on the cube with the LPIS polygons, from a config with the demo dropped."""
    ct, _, transform = _labels(real)
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    del raw["demo"]
    raw["run"]["workdir"] = "results"
    raw["inputs"] = {
        "tiles": {"T31UES": {"format": "cube", "path": str(real / WORLDCEREAL)}},
        "reference": str(_polygons(ct, transform, work / "lpis.gpkg")),
        "class_field": "code",
    }
    raw["date_grid"] = {"start": "2018-10-01", "end": "2019-09-06", "step_days": 20}  # 18 dates
    raw["classifiers"] = ["rf"]
    raw["rf"]["n_estimators"] = 50
    raw["qa"]["references"] = 2
    change(raw)
    (work / "my.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "2",
           "--configfile", "my.yaml"]  # fmt: skip
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return work


@pytest.fixture(scope="module")
def run(tmp_path_factory, real_data_module) -> Path:
    """Land cover: the crop types recoded to annual cropland and grassland, CT 0 left out."""
    ct, lc, _ = _labels(real_data_module)
    assert (lc[np.isin(ct, CROPLAND)] == 11).all() and (lc[ct == 9120] == 13).all()
    assert (lc[ct == 0] == 99).all()

    def land_cover(raw: dict) -> None:
        raw["nomenclature"] = [
            {"code": 11, "name": "ACR", "label": "Annual cropland", "colour": "#ffaa00"},
            {"code": 13, "name": "GRA", "label": "Grassland", "colour": "#55ff00"},
        ]
        raw["reference"].update(ignore_codes=[0], remap={str(c): 11 for c in CROPLAND} | {"9120": 13})

    return _run(tmp_path_factory.mktemp("worldcereal"), real_data_module, land_cover)


@pytest.fixture(scope="module")
def crops(tmp_path_factory, real_data_module) -> Path:
    """The crop types themselves (codes 1110-9120: uint16 maps), mapped by RF and a small FG-UNET."""

    def crop_types(raw: dict) -> None:
        rng = np.random.default_rng(0)
        raw["nomenclature"] = [
            {"code": c, "name": f"C{c}", "label": f"WorldCereal crop type {c}",
             "colour": "#" + "".join(f"{v:02x}" for v in rng.integers(0, 256, 3))}
            for c in (*CROPLAND, 9120)
        ]  # fmt: skip
        raw["reference"]["ignore_codes"] = [0]
        raw["classifiers"] = ["rf", "fgunet"]
        raw["nets"].update(
            groups=6, unet_filters=[8, 16, 32], patch_size=32, batch_size=4, epochs=1, steps_per_epoch=4,
            warmup_epochs=1, selection_patches=4, min_class_positions=1, allow_undrawn_classes=True,
        )  # fmt: skip

    return _run(tmp_path_factory.mktemp("crops"), real_data_module, crop_types)


@pytest.fixture(scope="module")
def real_data_module() -> Path:
    from tests.conftest import REAL_DATA

    if not REAL_DATA.is_dir():
        pytest.skip(f"real samples not found at {REAL_DATA} (only present beside the project checkout)")
    return REAL_DATA


def test_the_chain_maps_the_cube_with_recoded_labels(run, real_data_module):
    cfg = load_config(run / "my.yaml")
    lay = Layout(run / cfg.workdir)
    # the store holds the cube's 72 dates, imported
    store = open_store(lay.ingest("T31UES"), "ingest", ("reflectance", "valid"))
    assert store.attrs["format"] == "cube" and len(store.attrs["dates"]) == 72
    # labels: the polygons' crop types recoded to land cover, CT 0 left out, pixel for pixel = LC
    ct, lc, _ = _labels(real_data_module)
    labels = open_store(lay.labels("T31UES"), "reference", ("train", "validation"))
    train, val = labels["train"][:], labels["validation"][:]
    assert not ((train > 0) & (val > 0)).any()
    np.testing.assert_array_equal(np.maximum(train, val), np.where(ct == 0, 0, lc))
    # a map of both classes, scored on the validation parcels
    with rasterio.open(lay.class_map("rf", "T31UES")) as src:
        classes = np.unique(src.read(1))
        assert set(classes) <= {0, 11, 13} and {11, 13} <= set(classes)
        assert src.crs.to_epsg() == 32631 and src.transform.c == 574680
    overall = json.loads(lay.overall_metrics("rf").read_text())
    assert overall["n_pixels"] == int((val > 0).sum()) > 300
    # as good as scikit-learn's forest on the same gapfilled features and training pixels (the
    # patch is hard: parcels of two classes that look alike, split by parcel; kappa ~0.1-0.2)
    cube = open_store(lay.gapfilled("T31UES"), "gapfilled", ("reflectance",))["reflectance"][:]
    x = cube.reshape(-1, cube.shape[2] * cube.shape[3]).T
    y_train, y_val = train.ravel(), val.ravel()
    kappas = []
    for seed in range(3):
        forest = RandomForestClassifier(100, random_state=seed, n_jobs=2, class_weight="balanced")
        forest.fit(x[y_train > 0], y_train[y_train > 0])
        kappas.append(cohen_kappa_score(y_val[y_val > 0], forest.predict(x[y_val > 0])))
    assert overall["kappa"] >= np.mean(kappas) - 0.1, (overall["kappa"], kappas)
    # the report says what was left out and recoded, and that 64 px are too few for the corner QA
    html = lay.report().read_text()
    assert "left out: " in html and "of code 0 (reference.ignore_codes)" in html
    assert "1110-&gt;11" in html and "9120-&gt;13" in html
    qa = json.loads(lay.qa("T31UES").read_text())
    assert qa["warnings"] and "too few corners" in qa["warnings"][0]


def test_crop_type_codes_above_255_are_mapped_in_uint16(crops, real_data_module):
    cfg = load_config(crops / "my.yaml")
    lay = Layout(crops / cfg.workdir)
    ct, _, _ = _labels(real_data_module)
    labels = open_store(lay.labels("T31UES"), "reference", ("train", "validation"))
    train, val = labels["train"][:], labels["validation"][:]
    assert train.dtype == np.uint16
    np.testing.assert_array_equal(np.maximum(train, val), ct)  # the codes as they are, CT 0 = none
    for model in ("rf", "fgunet"):
        with rasterio.open(lay.class_map(model, "T31UES")) as src:
            assert src.dtypes[0] == "uint16"
            values = set(np.unique(src.read(1)).tolist())
            assert values <= {0, *CROPLAND, 9120} and values - {0}, (model, values)
            if model == "rf":  # the two big classes are mapped (4 network steps only test the path)
                assert {1110, 9120} <= values, values
            cmap = src.colormap(1)
            for c in cfg.classes:
                assert cmap[c.code] == (*c.rgb, 255)
        overall = json.loads(lay.overall_metrics(model).read_text())
        assert set(overall["per_class"]) == {c.name for c in cfg.classes}
        assert overall["n_pixels"] == int((val > 0).sum())
    html = lay.report().read_text()
    assert "C1110" in html and "C9120" in html
