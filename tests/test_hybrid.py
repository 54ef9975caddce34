"""fgunet_rf (pipeline.nets.hybrid): the trained FG-UNET's penultimate features, classified by the RF.

Oracles: the features the hybrid trains on are the network's penultimate activations computed in
one whole-tile pass (windowing changes nothing); applying the network's last layer to those
activations gives its logits; a saved and reloaded hybrid maps the same classes and confidences.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import rasterio
import torch

from pipeline.config import validate
from pipeline.errors import PipelineError
from pipeline.infer import predict_tile
from pipeline.models import HYBRIDS, derive_seed, get
from pipeline.models.features import Normalisation
from pipeline.nets.arch import ARCHS, NetSpec, build
from pipeline.nets.features import network_features
from pipeline.nets.hybrid import network_beside
from pipeline.nets.patches import index_patches
from pipeline.nets.weights import WEIGHTS
from pipeline.sampling import balanced_sample
from pipeline.train import load_meta, train
from tests.test_nettrain import net_config
from tests.test_rf import make_scene


@pytest.mark.parametrize("arch", ARCHS)
def test_penultimate_is_what_the_last_layer_reads(arch):
    torch.manual_seed(0)
    net = build(NetSpec(arch, 3, 2, 4, unet_filters=(4, 8, 16), mlp_filters=(8, 6), lstm_hidden=5)).eval()
    x = torch.randn(2, 6, 16, 16)
    if arch in ("lstm3", "tsfgunet"):
        assert not net.has_penultimate
        with pytest.raises(ValueError, match="recurrent head"):
            net.penultimate(x)
        return
    with torch.no_grad():
        f = net.penultimate(x)
        assert f.shape == (2, 2 * net.features.out_channels, 16, 16)
        torch.testing.assert_close(net.head.classifier(f), net(x), rtol=1e-5, atol=1e-5)
        # group g's block is the shared extractor on group g's channels
        torch.testing.assert_close(f[:, net.features.out_channels :], net.features(x[:, 3:]))


def _norm(meta):
    return Normalisation.from_json(
        meta["normalisation"], meta["features"]["bands"], meta["features"]["dates"]
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hybrid")
    scene = make_scene(tmp)
    cfg = net_config(tmp, classifiers=("fgunet", "fgunet_rf"))
    lay_models = tmp / "run" / "models"
    patches = {t: tmp / "patches" / f"{t}.train.npz" for t in scene.labels}
    for tile, lab in scene.labels.items():
        index_patches(cfg, tile, lab, patches[tile])
    common = (cfg, scene.gapfilled, scene.labels, scene.percentiles)
    train(*common[:1], "fgunet", *common[1:], lay_models / "fgunet", patches=patches)
    train(*common[:1], "fgunet_rf", *common[1:], lay_models / "fgunet_rf")
    return tmp, scene, cfg, lay_models


def test_features_are_the_networks_penultimate_activations(trained):
    """Per-window features (64-px windows, receptive-radius margin) equal one whole-tile pass."""
    _, scene, cfg, models = trained
    hybrid = get("fgunet_rf").load(models / "fgunet_rf")
    meta = load_meta(models / "fgunet")
    norm = Normalisation.from_json(
        meta["normalisation"], meta["features"]["bands"], meta["features"]["dates"]
    )
    sample = balanced_sample(
        scene.labels, scene.gapfilled, cfg.class_codes, 40, derive_seed(cfg.seed, "x"), norm
    )
    got = network_features(hybrid.net, norm, scene.gapfilled, sample, 64, hybrid.margin())
    cut = network_features(hybrid.net, norm, scene.gapfilled, sample, 64, 0)  # no margin: seams
    assert not np.allclose(got, cut, rtol=1e-5, atol=1e-5)
    net = hybrid.net.net
    assert got.shape == (sample.row.size, net.spec.groups * net.features.out_channels)
    for ti, tile in enumerate(sample.tiles):
        whole = hybrid.net.penultimate_window(scene.cubes[tile], norm)  # (F, H, W), one pass
        at = sample.tile == ti
        np.testing.assert_allclose(got[at], whole[:, sample.row[at], sample.col[at]].T, rtol=1e-5, atol=1e-5)


def test_hybrid_maps_through_the_predict_stage_and_round_trips(trained):
    tmp, scene, cfg, models = trained
    out = models / "fgunet_rf"
    meta = load_meta(out)
    assert meta["name"] == "fgunet_rf" and meta["network"]["name"] == "fgunet"
    net = get("fgunet").load(models / "fgunet").net
    assert meta["features"]["forest_features"] == net.spec.groups * net.features.out_channels
    assert (out / WEIGHTS).read_bytes() == (models / "fgunet" / WEIGHTS).read_bytes()  # a copy
    # trained on the plain RF's pixels: same draw, same counts
    assert meta["samples"]["seed"] == derive_seed(cfg.seed, "sampling")
    tile = "T31TCJ"
    predict_tile(cfg, out, scene.gapfilled[tile], tmp / "h.tif", confidence=tmp / "hc.tif")
    with rasterio.open(tmp / "h.tif") as src, rasterio.open(tmp / "hc.tif") as conf:
        pred, confidence = src.read(1), conf.read(1)
        assert src.tags()["MODEL"] == "fgunet_rf" and src.tags()["REGULARISATION_RADIUS"] == "0"
    truth = scene.truth[tile]
    labelled = np.isin(truth, [11, 31, 51])
    assert (pred[labelled] == truth[labelled]).mean() > 0.8  # separable stripes: the RF gets them
    # the folder maps on its own: load it again, classify the whole tile in one window
    model = get("fgunet_rf").load(out)
    norm = Normalisation.from_json(
        meta["normalisation"], meta["features"]["bands"], meta["features"]["dates"]
    )
    codes, conf = model.classify_window(scene.cubes[tile], norm)
    np.testing.assert_array_equal(codes, pred)
    np.testing.assert_array_equal(conf, confidence)


def test_hybrid_needs_its_network(tmp_path, trained):
    _, scene, cfg, models = trained
    raw = json.loads(json.dumps(cfg.data))
    raw["classifiers"] = ["rf", "fgunet_rf"]
    with pytest.raises(PipelineError, match="fgunet_rf reads the trained fgunet's features; add fgunet"):
        validate(raw)
    with pytest.raises(PipelineError, match="model.json.*train the model first"):
        train(
            cfg,
            "fgunet_rf",
            scene.gapfilled,
            scene.labels,
            scene.percentiles,
            tmp_path / "models" / "fgunet_rf",
        )
    assert not (tmp_path / "models" / "fgunet_rf").exists()
    with pytest.raises(PipelineError, match="checkpoints does not apply to training fgunet_rf"):
        train(cfg, "fgunet_rf", scene.gapfilled, scene.labels, scene.percentiles, tmp_path / "m",
              checkpoints=tmp_path / "c")  # fmt: skip
    assert network_beside(models / "fgunet_rf-s7", "fgunet") == models / "fgunet-s7"
    assert HYBRIDS["fgunet_rf"] == "fgunet"
