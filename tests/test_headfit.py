"""nets.head_refit (pipeline.nets.headfit): the last layer refitted on frozen features.

Oracles: scikit-learn's own probabilities on the standardised features (the folding of the
standardisation into the layer's weights is ours); the same logistic regression refitted here on
the saved network's features of the same pixel sample; a training without the refit, which must
differ from the refitted one in the last layer only.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from pipeline.config import validate
from pipeline.errors import PipelineError
from pipeline.io.tilestore import SHARD
from pipeline.models import get
from pipeline.models.pixel import training_sample
from pipeline.nets.features import network_features
from pipeline.nets.headfit import ABSENT_LOGIT, capped, fit_linear_head
from pipeline.nets.patches import index_patches
from pipeline.nets.weights import WEIGHTS
from pipeline.sampling import PixelSample
from pipeline.train import load_meta, train
from tests.test_hybrid import _norm
from tests.test_nettrain import net_config
from tests.test_rf import make_scene


def test_the_layer_computes_the_fitted_regression_on_raw_features():
    rng = np.random.default_rng(0)
    codes = np.array([11, 22, 33, 44], np.uint8)  # 44 has no pixel
    y = rng.choice([11, 22, 33], 600)
    centre = {11: (0, 0, 5), 22: (3, 1, 5), 33: (0, 3, 6)}
    x = np.array([centre[c] for c in y]) * [1.0, 1.0, 40.0] + rng.normal(0, [1, 1, 30], (600, 3))
    x = np.c_[x, rng.normal(1e3, 200, 600)].astype(np.float32)  # a feature on another scale
    w, b = fit_linear_head(x, y, codes)
    logits = x.astype(np.float64) @ w.T + b
    proba = np.exp(logits - logits.max(1, keepdims=True))
    proba /= proba.sum(1, keepdims=True)
    mu, sd = x.mean(0, dtype=np.float64), x.std(0, dtype=np.float64) + 1e-6
    oracle = LogisticRegression(max_iter=2000).fit((x - mu) / sd, y).predict_proba((x - mu) / sd)
    np.testing.assert_allclose(proba[:, :3], oracle, atol=1e-6)
    assert (b[3] == ABSENT_LOGIT) and not w[3].any() and proba[:, 3].max() < 1e-30
    assert (proba[:, :3].argmax(1) == oracle.argmax(1)).all()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same FG-UNET trained twice from one seed, without and with the refit."""
    tmp = tmp_path_factory.mktemp("headfit")
    scene = make_scene(tmp)
    out = {}
    for refit in (False, True):
        cfg = net_config(tmp, head_refit=refit)
        patches = {t: tmp / "patches" / f"{t}.train.npz" for t in scene.labels}
        if not refit:
            for tile, lab in scene.labels.items():
                index_patches(cfg, tile, lab, patches[tile])
        out[refit] = tmp / ("refit" if refit else "plain") / "fgunet"
        train(cfg, "fgunet", scene.gapfilled, scene.labels, scene.percentiles, out[refit], patches=patches)
    return cfg, scene, out


def _state(model_dir):
    return torch.load(model_dir / WEIGHTS, weights_only=True)["state_dict"]


def test_only_the_last_layer_changes_and_it_is_the_refit(pair):
    cfg, scene, out = pair
    plain, refit = _state(out[False]), _state(out[True])
    head = {"head.classifier.weight", "head.classifier.bias"}
    assert plain.keys() == refit.keys() and head <= plain.keys()
    for k in plain.keys() - head:
        assert torch.equal(plain[k], refit[k]), k
    assert not torch.equal(plain["head.classifier.weight"], refit["head.classifier.weight"])
    # oracle: the regression refitted here on the saved network's features of the same sample
    meta = load_meta(out[True])
    norm = _norm(meta)
    net = get("fgunet").load(out[True])
    sample, *_ = training_sample(cfg, scene.labels, scene.gapfilled, norm)
    margin = net.spec.pool_aligned(net.receptive_radius)
    x = network_features(net, norm, scene.gapfilled, sample, SHARD, margin)
    w, b = fit_linear_head(x, sample.labels, cfg.class_codes)
    torch.testing.assert_close(refit["head.classifier.weight"].flatten(1).double(), torch.from_numpy(w),
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    torch.testing.assert_close(
        refit["head.classifier.bias"].double(), torch.from_numpy(b), rtol=1e-4, atol=1e-3
    )
    done = meta["training"]["head_refit"]
    assert done["pixels"] == sample.labels.size and done["features"] == x.shape[1]
    assert load_meta(out[False])["training"]["head_refit"] is None
    assert json.loads((out[True] / "model.json").read_text())["training"]["kept_epoch"] >= 1


def test_a_finished_training_is_refitted_from_its_checkpoints_not_retrained(pair, tmp_path, caplog):
    """Turning head_refit on after a run: the train job resumes at the last epoch and refits."""
    cfg, scene, out = pair
    cfg = net_config(out[False].parent.parent, head_refit=True)
    patches = {t: out[False].parent.parent / "patches" / f"{t}.train.npz" for t in scene.labels}
    dst = tmp_path / "fgunet"
    with caplog.at_level("INFO"):
        train(cfg, "fgunet", scene.gapfilled, scene.labels, scene.percentiles, dst, patches=patches,
              checkpoints=out[False].with_name("fgunet.checkpoints"))  # fmt: skip
    assert "resuming fgunet" in caplog.text and "refitted" in caplog.text
    refit, again = _state(out[True]), _state(dst)
    for k in refit:
        torch.testing.assert_close(again[k], refit[k], rtol=1e-5, atol=1e-5)


def test_refit_is_refused_for_a_network_without_a_linear_last_layer(tmp_path):
    raw = net_config(tmp_path, classifiers=("fgunet", "lstm3")).data
    raw["nets"]["head_refit"] = True
    with pytest.raises(PipelineError, match="head_refit.*lstm3"):
        validate(json.loads(json.dumps(raw)))


def _sample(per_class: dict[int, int]) -> PixelSample:
    labels = np.concatenate([np.full(n, c, np.uint8) for c, n in per_class.items()])
    n = labels.size
    return PixelSample(
        features=np.arange(n * 3, dtype=np.int16).reshape(n, 3),
        labels=labels,
        tile=np.arange(n) % 2,
        row=np.arange(n) + 100,
        col=np.arange(n) + 200,
        tiles=["A", "B"],
        available=dict(per_class),
        counts=dict(per_class),
    )


def test_the_refit_sample_is_capped_per_class_and_keeps_its_pixels_aligned():
    s = _sample({11: 2, 12: 7, 31: 4})
    c = capped(s, 4, seed=3)
    assert c.counts == {11: 2, 12: 4, 31: 4}
    assert [int((c.labels == k).sum()) for k in (11, 12, 31)] == [2, 4, 4]
    # every kept pixel is the same pixel of the original (features, tile, row and col move together)
    i = c.row - 100
    np.testing.assert_array_equal(s.features[i], c.features)
    np.testing.assert_array_equal(s.labels[i], c.labels)
    np.testing.assert_array_equal(s.tile[i], c.tile)
    np.testing.assert_array_equal(s.col[i], c.col)
    assert np.all(np.diff(i) > 0)  # order kept, no pixel twice
    assert set(i[c.labels == 12]) <= set(range(2, 9))
    # seeded: the same draw again; another seed, another draw of class 12
    np.testing.assert_array_equal(capped(s, 4, seed=3).row, c.row)
    assert any(not np.array_equal(capped(s, 4, seed=k).row, c.row) for k in range(4, 10))
    # within the cap: the sample itself (the demo's refit is unchanged)
    assert capped(s, 7, seed=3) is s
