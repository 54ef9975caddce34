"""Overlapping tiled inference of the networks equals one forward pass over the whole image.

With window origins on the pooling grid (512-px windows, margins rounded up to the pooling factor)
and a margin at least the network's receptive radius, no output pixel kept from a window ever sees
the window's zero padding, so the stitched map (and confidence) is the whole-image one. A margin
below the radius must differ somewhere, or the test would prove nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch

from pipeline.config import Config, validate
from pipeline.infer import predict_tile
from pipeline.models import get
from pipeline.models.features import Normalisation
from pipeline.nets import capability
from pipeline.nets.patches import index_patches, patch_inputs
from pipeline.nets.train import train_network
from pipeline.train import load_meta
from tests.test_nettrain import net_config
from tests.test_rf import BANDS, DATES, make_scene

SHARPEN = 30.0  # scales the classifier so confidences spread over many values (not all ~33 or 100)


@pytest.fixture(scope="module", params=["fgunet", "unet3", "mlp3"])
def trained(request, tmp_path_factory):
    name = request.param
    tmp = tmp_path_factory.mktemp(f"stitch_{name}")
    scene = make_scene(tmp)
    cfg = net_config(tmp, classifiers=(name,), epochs=1, steps_per_epoch=2)
    patches = {t: tmp / f"{t}.train.npz" for t in scene.labels}
    for tile, lab in scene.labels.items():
        index_patches(cfg, tile, lab, patches[tile])
    out = tmp / "models" / name
    train_network(cfg, name, scene.gapfilled, scene.labels, scene.percentiles, out, patches=patches)
    # two training steps leave the softmax nearly flat; sharpen the classifier so confidences vary
    # from pixel to pixel and any seam would show in them
    model = get(name).load(out)
    with torch.no_grad():
        model.net.head.classifier.weight.mul_(SHARPEN)
    model.save(out)
    return name, tmp, scene, cfg, out


def _with(cfg: Config, **inference) -> Config:
    raw = cfg.data
    raw["inference"] |= inference
    return Config(validate(raw))


def _whole_image(model_dir, cube):
    meta = load_meta(model_dir)
    model = get(meta["name"]).load(model_dir)
    norm = Normalisation.from_json(meta["normalisation"], BANDS, DATES)
    return model.classify_window(cube, norm)


def test_stitched_equals_whole_image(trained, tmp_path):
    name, _, scene, cfg, model_dir = trained
    model = get(name).load(model_dir)
    radius, pool = model.receptive_radius, model.pool_factor
    tile = "T31TDJ"
    whole_codes, whole_conf = _whole_image(model_dir, scene.cubes[tile])
    # 96 x 128 px tile in 64-px windows: inner window edges cross the image both ways
    exact = _with(cfg, window=64, overlap=radius, precision="fp32")
    out, conf = tmp_path / "map.tif", tmp_path / "conf.tif"
    predict_tile(exact, model_dir, scene.gapfilled[tile], out, confidence=conf)
    with rasterio.open(out) as src, rasterio.open(conf) as csrc:
        got, got_conf = src.read(1), csrc.read(1)
        assert int(src.tags()["WINDOW_MARGIN"]) == -(-radius // pool) * pool
        assert csrc.nodata == 255 and csrc.dtypes[0] == "uint8"
        assert src.tags()["PRECISION"] == "fp32"
    np.testing.assert_array_equal(got, whole_codes)
    assert len(np.unique(whole_conf[got > 0])) > 10  # the comparison below is not vacuous
    # confidence: identical up to float rounding at an exact .5 percent (none expected)
    assert np.abs(got_conf.astype(int) - whole_conf.astype(int)).max() <= 1
    assert (got_conf[got > 0] <= 100).all() and (got_conf[got == 0] == 255).all()
    if radius == 0:
        return  # pixel-wise network: any margin is exact, nothing more to show
    # a margin below the receptive radius shows seams (window borders see zero padding)
    short = _with(cfg, window=64, overlap=0, precision="fp32")
    out0 = tmp_path / "map0.tif"
    predict_tile(short, model_dir, scene.gapfilled[tile], out0, confidence=tmp_path / "c0.tif")
    with rasterio.open(tmp_path / "c0.tif") as src:
        conf0 = src.read(1)
    assert (conf0 != whole_conf).any()


def test_bf16_inference_agrees_with_fp32(trained, tmp_path):
    """bf16 autocast (the default where the CPU has it) changes classes only at near-ties."""
    if not capability.bf16_autocast("cpu"):
        pytest.skip(f"bf16 autocast does not run on this CPU ({capability.failure('bf16 autocast on cpu')})")
    name, _, scene, cfg, model_dir = trained
    tile = "T31TCJ"
    got = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / f"{precision}.tif"
        predict_tile(
            _with(cfg, window=64, overlap=32, precision=precision), model_dir, scene.gapfilled[tile], out
        )
        with rasterio.open(out) as src:
            got[precision] = src.read(1)
            assert src.tags()["PRECISION"] == precision
    data = got["fp32"] > 0
    assert ((got["bf16"] > 0) == data).all()
    differ = data & (got["fp32"] != got["bf16"])
    assert differ.mean() < 0.05
    # where the classes differ, fp32's best two logits were near a tie: within bf16's few-percent
    # rounding of the logits' size (the test nets are barely trained, so near-ties are common)
    model = get(name).load(model_dir)
    meta = load_meta(model_dir)
    norm = Normalisation.from_json(meta["normalisation"], BANDS, DATES)
    x = torch.from_numpy(patch_inputs(scene.cubes[tile], norm, model.indices))[None]
    with torch.no_grad():
        logits = model.net(x)[0]
    top2 = logits.topk(2, dim=0).values
    margin = (top2[0] - top2[1]).numpy()
    scale = logits.abs().amax(0).numpy()
    assert (margin[differ] <= 0.05 * scale[differ]).all()
    assert (margin[data & ~differ] > 0.05 * scale[data & ~differ]).mean() > 0.5  # not vacuous


def test_bf16_that_cannot_run_gives_fp32_maps(trained, tmp_path, monkeypatch, caplog):
    """Where the bf16 probe fails, ``precision: bf16`` maps in fp32 (tagged so, warned) and ``auto``
    picks fp32: the same map as ``fp32``, never a crash on a missing primitive."""
    name, _, scene, cfg, model_dir = trained
    monkeypatch.setattr(capability, "bf16_autocast", lambda kind="cpu": False)
    tile = "T31TCJ"
    got = {}
    for precision in ("fp32", "bf16", "auto"):
        out = tmp_path / f"{precision}.tif"
        caplog.clear()
        with caplog.at_level("WARNING"):
            predict_tile(
                _with(cfg, window=64, overlap=32, precision=precision), model_dir, scene.gapfilled[tile], out
            )
        with rasterio.open(out) as src:
            got[precision] = src.read(1)
            assert src.tags()["PRECISION"] == "fp32"
        warned = [r for r in caplog.records if r.levelname == "WARNING" and "fp32 instead" in r.getMessage()]
        assert len(warned) == (precision == "bf16")
    np.testing.assert_array_equal(got["bf16"], got["fp32"])
    np.testing.assert_array_equal(got["auto"], got["fp32"])
