"""Validation metrics against scikit-learn as an independent oracle, and by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
from sklearn.metrics import cohen_kappa_score, confusion_matrix, precision_recall_fscore_support

from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.io.tilestore import add_array, create_store
from pipeline.metrics import confusion, scores, summarise, validate_tile
from tests.conftest import REPO, make_grid


def test_hand_computed_two_classes():
    # reference rows, predicted columns: 40 of class A right, 10 A->B, 5 B->A, 45 B right
    cm = np.array([[40, 10], [5, 45]])
    s = scores(cm)
    assert s["oa"] == pytest.approx(0.85)
    pe = (45 * 50 + 55 * 50) / 100**2  # column sums 45/55, row sums 50/50
    assert s["kappa"] == pytest.approx((0.85 - pe) / (1 - pe))
    assert s["precision"] == pytest.approx([40 / 45, 45 / 55])
    assert s["recall"] == pytest.approx([0.8, 0.9])


@pytest.mark.parametrize(
    ("codes", "dtype"),
    [([11, 12, 31, 51], np.uint8), ([11, 1110, 1200, 9120], np.uint16)],
    ids=["uint8", "uint16"],
)
def test_against_sklearn_with_unlabelled_and_nodata(codes, dtype):
    rng = np.random.default_rng(3)
    codes = np.array(codes, dtype=dtype)
    ref = rng.choice(np.r_[0, codes], size=5000).astype(dtype)
    pred = np.where(rng.random(5000) < 0.7, ref, rng.choice(np.r_[0, codes], size=5000)).astype(dtype)
    cm = confusion(ref, pred, codes)
    keep = (ref > 0) & (pred > 0)
    np.testing.assert_array_equal(cm, confusion_matrix(ref[keep], pred[keep], labels=codes))
    s = scores(cm)
    assert s["kappa"] == pytest.approx(cohen_kappa_score(ref[keep], pred[keep], labels=codes))
    p, r, f, _ = precision_recall_fscore_support(ref[keep], pred[keep], labels=codes, zero_division=0)
    np.testing.assert_allclose(s["precision"], p)
    np.testing.assert_allclose(s["recall"], r)
    np.testing.assert_allclose(s["f1"], f)


def test_absent_class_gives_none_not_crash():
    s = scores(np.array([[5, 0], [0, 0]]))
    assert s["recall"][1] is None and s["precision"][1] is None and s["f1"][1] is None
    assert scores(np.zeros((3, 3)))["kappa"] is None


def test_never_predicted_class_scores_f1_zero():
    # class 1 is in the reference (3 px) but never predicted: precision undefined, recall 0, F1 0
    s = scores(np.array([[5, 0], [3, 0]]))
    assert s["precision"][1] is None and s["recall"][1] == 0.0 and s["f1"][1] == 0.0


def _tile(tmp_path, cfg, truth: np.ndarray, pred: np.ndarray, name: str = "T31TCJ"):
    grid = make_grid(truth.shape[1], truth.shape[0])
    labels = tmp_path / f"{name}.zarr"
    g = create_store(labels, "reference", grid, tile=name)
    add_array(g, "train", truth.shape, "uint8", 0)
    add_array(g, "validation", truth.shape, "uint8", 0)[:] = truth
    path = tmp_path / f"{name}.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=grid.width, height=grid.height, count=1, dtype="uint8",
        crs=grid.crs, transform=grid.transform, nodata=0,
    ) as dst:  # fmt: skip
        dst.write(pred, 1)
    return path, labels


def test_validate_tile_and_summarise(tmp_path):
    cfg = load_config(REPO / "config.yaml")
    rng = np.random.default_rng(0)
    codes = cfg.class_codes
    truth = np.zeros((96, 128), np.uint8)
    truth[10:40, 10:60] = codes[0]
    truth[50:90, 70:120] = codes[4]
    pred = np.where(rng.random(truth.shape) < 0.8, truth, codes[4]).astype(np.uint8)
    pred[truth == 0] = codes[1]
    pred[0:5] = 0  # a no-data strip (not counted, reported as unmapped)
    m, lab = _tile(tmp_path, cfg, truth, pred)
    out = tmp_path / "m.json"
    validate_tile(cfg, m, lab, out)
    doc = json.loads(out.read_text())
    keep = truth > 0
    expected = confusion_matrix(truth[keep], pred[keep], labels=codes)
    np.testing.assert_array_equal(doc["confusion_pixels"], expected)
    assert doc["confusion_ha"][0][0] == pytest.approx(expected[0, 0] * 0.01)  # 10 m pixel = 0.01 ha
    assert doc["unmapped_pixels"] == 0  # the no-data strip holds no validation pixel
    assert doc["kappa"] == pytest.approx(cohen_kappa_score(truth[keep], pred[keep], labels=codes))

    empty_map, empty_lab = _tile(tmp_path, cfg, np.zeros_like(truth), pred, name="T31TDJ")
    out2 = tmp_path / "m2.json"
    validate_tile(cfg, empty_map, empty_lab, out2)
    assert json.loads(out2.read_text())["status"] == "no validation data"

    overall = tmp_path / "overall.json"
    summarise(cfg, [out, out2], overall)
    doc = json.loads(overall.read_text())
    np.testing.assert_array_equal(doc["confusion_pixels"], expected)
    assert doc["tiles"]["T31TDJ"]["status"] == "no validation data"


def test_grid_mismatch_is_a_clear_error(tmp_path):
    cfg = load_config(REPO / "config.yaml")
    truth = np.zeros((96, 128), np.uint8)
    m, _ = _tile(tmp_path, cfg, truth, truth)
    other = tmp_path / "other"
    other.mkdir()
    _, lab = _tile(other, cfg, truth[:64], truth[:64])  # same origin, 64 rows instead of 96
    with pytest.raises(PipelineError, match="differs from the reference grid"):
        validate_tile(cfg, m, lab, tmp_path / "o.json")
    assert not (tmp_path / "o.json").exists()
