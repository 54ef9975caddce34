"""RF training: class-balanced sampling, model folder contents, accuracy on a separable synthetic scene.

The synthetic run (two 96x128 tiles, 3 dates x 10 bands) is also used by ``test_infer.py``:
three classes with well-separated spectra in vertical stripes, a class of the nomenclature that has
no training pixel, and no-data pixels inside labelled areas, some of them with an inconsistent
``clear_count`` so the read-time no-data check is exercised too.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
import zarr

from pipeline.config import Config, validate
from pipeline.errors import PipelineError
from pipeline.io.tilestore import add_array, create_store
from pipeline.models import REGISTRY, Classifier, get
from pipeline.models.features import NODATA, Normalisation
from pipeline.models.pixel import PixelClassifier
from pipeline.sampling import balanced_sample
from pipeline.train import load_meta, train
from tests.conftest import REPO, make_grid

BANDS = ["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"]
DATES = ["2018-01-05", "2018-01-25", "2018-02-14"]
H, W = 96, 128
CLASSES = [  # code, name, colour; 53 gets no training pixel
    (11, "ASC", "#ff5500"),
    (31, "BLF", "#009c00"),
    (51, "WAT", "#0000ff"),
    (53, "GPS", "#e6e6ff"),
]
TRAINED = (11, 31, 51)


def make_config(tmp_path: Path, per_class: int = 150, window: int = 64, radius: int = 1, **rf) -> Config:
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw.pop("demo", None)
    raw["run"].update(workdir=str(tmp_path / "run"), seed=42, threads=2)
    raw["nomenclature"] = [{"code": c, "name": n, "colour": col} for c, n, col in CLASSES]
    raw["date_grid"] = {"start": DATES[0], "end": DATES[-1], "step_days": 20}
    raw["rf"] = {"n_estimators": 20, "max_depth": 20, "min_samples_split": 10, "samples_per_class": per_class}
    raw["rf"].update(rf)
    raw["inference"] = {"window": window, "regularisation_radius": radius}
    raw["classifiers"] = ["rf"]
    return Config(validate(raw))


@dataclass
class Scene:
    gapfilled: dict[str, Path]
    labels: dict[str, Path]
    percentiles: Path
    truth: dict[str, np.ndarray]  # (H, W) class code of every pixel
    cubes: dict[str, np.ndarray]  # (T, C, H, W) int16
    train: dict[str, np.ndarray]
    validation: dict[str, np.ndarray]


def class_field(tile_index: int) -> np.ndarray:
    """Vertical stripes of the three trained classes, shifted per tile."""
    cols = (np.arange(W) // 16 + tile_index) % 3
    return np.broadcast_to(np.array(TRAINED, np.uint8)[cols], (H, W)).copy()


def make_scene(tmp_path: Path, seed: int = 0, dates: list[str] = DATES) -> Scene:
    rng = np.random.default_rng(seed)
    means = {11: 800.0, 31: 2000.0, 51: 3200.0}
    out = Scene({}, {}, tmp_path / "percentiles.json", {}, {}, {}, {})
    for k, tile in enumerate(["T31TCJ", "T31TDJ"]):
        grid = make_grid(W, H, ulx=399960.0 + k * W * 10)
        truth = class_field(k)
        spectra = truth.copy()
        speckle = rng.random((H, W)) < 0.03  # isolated pixels with another class's spectrum
        spectra[speckle] = np.array(TRAINED, np.uint8)[rng.integers(0, 3, int(speckle.sum()))]
        base = np.vectorize(means.get)(spectra).astype(np.float32)
        slope = 1.0 + 0.05 * np.arange(len(BANDS), dtype=np.float32)[:, None, None]
        cube = base[None, None] * slope[None] + rng.normal(0, 250, (len(dates), len(BANDS), H, W))
        cube = cube.astype(np.int16)
        clear = np.full((H, W), len(dates), np.uint16)
        nodata = np.zeros((H, W), bool)
        nodata[10:14, :] = True  # a no-data band across every stripe
        nodata[60:70, 100:110] = True
        cube[:, :, nodata] = NODATA
        clear[nodata] = 0
        clear[60:70, 100:110] = 1  # inconsistent count: only the feature read can tell
        train_lab = np.where((np.arange(H)[:, None] < 48), truth, 0).astype(np.uint8)
        val_lab = np.where((np.arange(H)[:, None] >= 56), truth, 0).astype(np.uint8)
        train_lab[:, ::16] = 0  # some unlabelled columns
        g = create_store(tmp_path / f"g_{tile}.zarr", "gapfilled", grid, tile=tile, bands=BANDS, dates=dates)
        add_array(g, "reflectance", cube.shape, "int16", NODATA)[...] = cube
        add_array(g, "clear_count", (H, W), "uint16", 0)[...] = clear
        lab = create_store(tmp_path / f"l_{tile}.zarr", "reference", grid, tile=tile)
        add_array(lab, "train", (H, W), "uint8", 0)[...] = train_lab
        add_array(lab, "validation", (H, W), "uint8", 0)[...] = val_lab
        # model selection (networks): the training labels of rows 32-47, held out of their training
        sel_lab = np.where(np.arange(H)[:, None] >= 32, train_lab, 0).astype(np.uint8)
        add_array(lab, "selection", (H, W), "uint8", 0)[...] = sel_lab
        out.gapfilled[tile] = tmp_path / f"g_{tile}.zarr"
        out.labels[tile] = tmp_path / f"l_{tile}.zarr"
        out.truth[tile], out.cubes[tile] = truth, cube
        out.train[tile], out.validation[tile] = train_lab, val_lab
    stack = np.concatenate([c.reshape(len(dates) * len(BANDS), -1) for c in out.cubes.values()], axis=1)
    stack = np.where(stack == NODATA, np.nan, stack.astype(np.float64))
    low, high = np.nanpercentile(stack, 3, axis=1), np.nanpercentile(stack, 97, axis=1)
    channels = [f"{d}/{b}" for d in dates for b in BANDS]
    doc = {"low_percentile": 3, "high_percentile": 97, "bands": BANDS, "dates": dates, "channels": channels}
    out.percentiles.write_text(json.dumps(doc | {"low": low.tolist(), "high": high.tolist()}))
    return out


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Scene:
    return make_scene(tmp_path_factory.mktemp("scene"))


@pytest.fixture(scope="module")
def trained(scene, tmp_path_factory) -> tuple[Config, Path]:
    tmp = tmp_path_factory.mktemp("model")
    cfg = make_config(tmp)
    out = tmp / "models" / "rf"
    train(cfg, "rf", scene.gapfilled, scene.labels, scene.percentiles, out)
    return cfg, out


def _available(scene: Scene) -> dict[int, int]:
    counts = dict.fromkeys(TRAINED, 0)
    for tile, lab in scene.train.items():
        valid = ~np.all(scene.cubes[tile] == NODATA, axis=(0, 1))
        for c in TRAINED:
            counts[c] += int(((lab == c) & valid).sum())
    return counts


def test_balanced_sample_counts_and_pixels(scene):
    codes = np.array([c for c, _, _ in CLASSES], np.uint8)
    avail = _available(scene)
    per_class = min(avail.values()) + 50  # one class cannot fill its quota, for the min(n, available) rule
    small = min(avail, key=avail.get)
    s = balanced_sample(scene.labels, scene.gapfilled, codes, per_class, seed=1)
    for c in TRAINED:
        assert s.counts[c] == min(per_class, avail[c])
        assert s.available[c] == avail[c]
    assert s.counts[small] == avail[small] < per_class
    assert s.counts[53] == 0
    assert s.features.shape == (sum(s.counts.values()), len(DATES) * len(BANDS))
    # every drawn pixel is a distinct training pixel of its class, with data, and its features are its cube
    keys = set()
    for i in range(s.labels.size):
        tile = s.tiles[s.tile[i]]
        r, c = int(s.row[i]), int(s.col[i])
        assert scene.train[tile][r, c] == s.labels[i]
        np.testing.assert_array_equal(s.features[i], scene.cubes[tile][:, :, r, c].ravel())
        keys.add((tile, r, c))
    assert len(keys) == s.labels.size
    assert not np.all(s.features == NODATA, axis=1).any()
    # both tiles contribute (uniform over all tiles)
    assert set(np.unique(s.tile).tolist()) == {0, 1}


def test_balanced_sample_reproducible(scene):
    codes = np.array(TRAINED, np.uint8)
    a = balanced_sample(scene.labels, scene.gapfilled, codes, 100, seed=7)
    b = balanced_sample(scene.labels, scene.gapfilled, codes, 100, seed=7)
    c = balanced_sample(scene.labels, scene.gapfilled, codes, 100, seed=8)
    for f in ("features", "labels", "tile", "row", "col"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.row, c.row)


def test_sample_skips_nodata_with_inconsistent_clear_count(scene):
    """Pixels 60:70 x 100:110 have clear_count 1 but all-no-data cubes: drawn, then replaced."""
    codes = np.array(TRAINED, np.uint8)
    s = balanced_sample(scene.labels, scene.gapfilled, codes, 10_000, seed=3)  # take everything
    assert s.counts == _available(scene)
    inside = (s.row >= 60) & (s.row < 70) & (s.col >= 100) & (s.col < 110)
    assert not inside.any()


def test_train_writes_model_folder(scene, trained):
    cfg, out = trained
    assert sorted(p.name for p in out.iterdir()) == ["forest.npz", "model.json"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp left
    meta = load_meta(out)
    assert meta["name"] == "rf"
    assert meta["classes"]["codes"] == list(TRAINED)
    assert meta["classes"]["without_training_pixels"] == [53]
    assert [c["code"] for c in meta["classes"]["nomenclature"]] == [c for c, _, _ in CLASSES]
    assert meta["features"]["bands"] == BANDS and meta["features"]["dates"] == DATES
    assert meta["features"]["channels"][:2] == ["2018-01-05/B2", "2018-01-05/B3"]
    assert meta["features"]["channels"][10] == "2018-01-25/B2"
    perc = json.loads(scene.percentiles.read_text())
    for k in ("low", "high"):  # the float32 values actually applied (pipeline.stats.Percentiles)
        np.testing.assert_array_equal(np.float32(meta["normalisation"][k]), np.float32(perc[k]))
    assert meta["normalisation"]["low_percentile"] == 3 and meta["normalisation"]["high_percentile"] == 97
    assert meta["samples"]["counts"] == {"11": 150, "31": 150, "51": 150, "53": 0}
    assert meta["params"]["n_estimators"] == 20 and meta["params"]["max_depth"] == 20
    assert meta["params"]["min_samples_split"] == 10
    assert meta["config_digest"] == cfg.digest
    assert meta["package_version"]
    assert meta["timing_s"]["fit"] >= 0


def test_rf_accuracy_on_validation_pixels(scene, trained):
    _, out = trained
    meta = load_meta(out)
    model = get("rf").load(out)
    norm = Normalisation.from_json(meta["normalisation"], BANDS, DATES)
    hits = total = 0
    for tile, val in scene.validation.items():
        cube = scene.cubes[tile]
        m = (val > 0) & ~np.all(cube == NODATA, axis=(0, 1))
        x = norm.apply(cube[:, :, m].reshape(len(DATES) * len(BANDS), -1).T)
        pred = model.predict(x)
        hits += int((pred == val[m]).sum())
        total += int(m.sum())
    assert total > 1000
    assert hits / total > 0.9  # chance is 1/3


def test_training_reproducible(scene, trained, tmp_path):
    cfg, out = trained
    out2 = tmp_path / "rf2"
    train(cfg, "rf", scene.gapfilled, scene.labels, scene.percentiles, out2)
    a, b = get("rf").load(out), get("rf").load(out2)
    x = np.random.default_rng(0).random((40_000, len(DATES) * len(BANDS)), dtype=np.float32)
    one = a.predict_proba(x)
    a.set_threads(2)
    b.set_threads(2)
    # bit-identical across models, thread counts and row chunking (fixed tree summation order)
    np.testing.assert_array_equal(one, a.predict_proba(x))
    np.testing.assert_array_equal(one, b.predict_proba(x))
    np.testing.assert_array_equal(one[123:9000], b.predict_proba(x[123:9000]))


def test_retrain_replaces_folder_atomically(scene, tmp_path):
    cfg = make_config(tmp_path, per_class=30)
    out = tmp_path / "rf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    train(cfg, "rf", scene.gapfilled, scene.labels, scene.percentiles, out)
    assert sorted(p.name for p in out.iterdir()) == ["forest.npz", "model.json"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_unknown_model_name_lists_known(scene, tmp_path):
    cfg = make_config(tmp_path)
    known = "fgunet, fgunet_rf, lstm3, mlp3, rf, tsfgunet, unet3"
    with pytest.raises(PipelineError, match=f"unknown model .svm.; known models: {known}"):
        train(cfg, "svm", scene.gapfilled, scene.labels, scene.percentiles, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_percentiles_schema_mismatch(scene, tmp_path):
    doc = json.loads(scene.percentiles.read_text())
    doc["dates"] = ["2018-01-05", "2018-01-25", "2018-02-15"]
    doc["channels"] = [f"{d}/{b}" for d in doc["dates"] for b in BANDS]
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(PipelineError, match="dates differ from the percentiles'"):
        train(make_config(tmp_path), "rf", scene.gapfilled, scene.labels, bad, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_labels_with_unknown_code(scene, tmp_path):
    cfg = make_config(tmp_path)
    grid = make_grid(W, H)
    lab = create_store(tmp_path / "l.zarr", "reference", grid, tile="T31TCJ")
    arr = np.zeros((H, W), np.uint8)
    arr[5, 5] = 99
    add_array(lab, "train", (H, W), "uint8", 0)[...] = arr
    with pytest.raises(PipelineError, match=r"codes \[99\] not in the nomenclature"):
        train(cfg, "rf", {"T31TCJ": scene.gapfilled["T31TCJ"]}, {"T31TCJ": tmp_path / "l.zarr"},
              scene.percentiles, tmp_path / "m")  # fmt: skip


def test_registry_protocol():
    rf = get("rf")
    assert REGISTRY["rf"] is rf and rf.name == "rf" and issubclass(rf, PixelClassifier)
    fitted = rf(n_estimators=2).fit(np.eye(4, dtype=np.float32), np.array([1, 1, 2, 2]))
    assert isinstance(fitted, Classifier)  # runtime protocol check: every member present
    np.testing.assert_array_equal(fitted.classes_, [1, 2])


def test_reference_rf_leaves_its_fold_out(scene, tmp_path):
    labels = {}
    for tile, src in scene.labels.items():
        labels[tile] = tmp_path / src.name
        shutil.copytree(src, labels[tile])
        g = zarr.open_group(str(labels[tile]), mode="r+")
        fold = np.where(scene.train[tile] > 0, np.where(np.arange(W)[None, :] < W // 2, 1, 2), 0)
        add_array(g, "train_fold", (H, W), "uint8", 0)[...] = fold.astype(np.uint8)
    codes = np.array([c for c, _, _ in CLASSES], np.uint8)
    s = balanced_sample(labels, scene.gapfilled, codes, 10_000, seed=1, exclude_fold=0)
    assert s.labels.size > 0 and (s.col >= W // 2).all()  # fold 0 (left half) never sampled
    cfg = make_config(tmp_path)
    out = tmp_path / "rfref0"
    train(cfg, "rf", scene.gapfilled, labels, scene.percentiles, out, fold=0)
    assert load_meta(out)["samples"]["excluded_fold"] == 0
    with pytest.raises(PipelineError, match="lacks array 'train_fold'"):
        train(cfg, "rf", scene.gapfilled, scene.labels, scene.percentiles, tmp_path / "x", fold=1)
    with pytest.raises(PipelineError, match="fold does not apply to training fgunet"):
        train(cfg, "fgunet", scene.gapfilled, labels, scene.percentiles, tmp_path / "y", fold=1)
