"""Network training: eq. 3 warm-up, eq. 1/4 loss, checkpoints, exact resume, bad-input stops.

The run is the separable synthetic scene of ``test_rf.py`` (two tiles, 3 dates x 10 bands, three
classes in stripes) with a tiny FG-UNET, so a whole training takes a few seconds.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import yaml
import zarr

import pipeline.nets.train as nettrain
from pipeline.config import Config, validate
from pipeline.errors import PipelineError
from pipeline.infer import predict_tile
from pipeline.models import NETWORKS, get
from pipeline.nets.arch import ARCHS
from pipeline.nets.checkpoints import latest_checkpoint
from pipeline.nets.classifier import NetClassifier
from pipeline.nets.loss import class_weights, weighted_sparse_ce
from pipeline.nets.patches import index_patches
from pipeline.nets.settings import epoch_lr, warmup_lr
from pipeline.nets.train import train_network
from pipeline.nets.weights import WEIGHTS, load_weights
from pipeline.train import load_meta
from tests.test_rf import make_config, make_scene

TINY = {
    "groups": 3,
    "unet_filters": [4, 8, 16],
    "mlp_filters": [16, 8, 8],
    "lstm_hidden": 8,
    "patch_size": 32,
    "patch_stride": 8,
    "batch_size": 4,
    "epochs": 2,
    "steps_per_epoch": 3,
    "warmup_epochs": 1,
    "selection_patches": 4,
    "device": "cpu",
    "precision": "fp32",  # the same arithmetic on every CI CPU; bf16 training has its own tests
}


def net_config(tmp_path, classifiers=("fgunet",), **nets) -> Config:
    raw = make_config(tmp_path).data
    raw["classifiers"] = ["rf", *classifiers]
    raw["nets"] = TINY | nets
    return Config(validate(json.loads(json.dumps(raw))))


# --- eq. 3 ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "expected"),
    [
        (1, [1e-3] * 7),
        # lr/4 * (3/5 i + 1): 2.5e-4, 4e-4, 5.5e-4, 7e-4, 8.5e-4, then 1e-3
        (4, [2.5e-4, 4e-4, 5.5e-4, 7e-4, 8.5e-4, 1e-3, 1e-3]),
        # the paper's 11 nodes: lr/11 * (2 i + 1)
        (11, [1e-3 / 11 * (2 * i + 1) for i in range(5)] + [1e-3, 1e-3]),
    ],
)
def test_warmup_eq3(nodes, expected):
    got = [warmup_lr(1e-3, nodes, 5, i) for i in range(7)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_warmup_reaches_base_at_w_and_is_off_without_warmup():
    for nodes in (2, 3, 8, 64):
        assert warmup_lr(1e-3, nodes, 5, 0) == pytest.approx(1e-3 / nodes)
        # eq. 3 at i = w gives lr exactly: the rate is continuous where warm-up ends
        assert 1e-3 / nodes * ((nodes - 1) / 5 * 5 + 1) == pytest.approx(1e-3)
        assert warmup_lr(1e-3, nodes, 0, 0) == 1e-3
    with pytest.raises(ValueError):
        warmup_lr(1e-3, 0, 5, 0)


def test_cosine_schedule_after_the_warmup():
    # by hand, 7 epochs with w = 2 on 4 nodes: eq. 3 for epochs 0-1 (lr/4, lr/4 * 2.5), then
    # lr * (0.05 + 0.95 * (1 + cos(pi p)) / 2) at p = 0, .2, .4, .6, .8
    cos = [1.0, 0.809017, 0.309017, -0.309017, -0.809017]
    expected = [2.5e-4, 6.25e-4] + [1e-3 * (0.05 + 0.95 * (1 + c) / 2) for c in cos]
    got = [epoch_lr(1e-3, 4, 2, e, 7, "cosine") for e in range(7)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(got[-1], 1.407e-4, rtol=1e-3)
    assert [epoch_lr(1e-3, 4, 2, e, 7, "constant") for e in range(7)] == [
        warmup_lr(1e-3, 4, 2, e) for e in range(7)
    ]
    with pytest.raises(ValueError, match="lr_schedule"):
        epoch_lr(1e-3, 1, 0, 0, 3, "step")


# --- eq. 1 and 4 ----------------------------------------------------------------------------------


def test_class_weights_eq4():
    np.testing.assert_allclose(class_weights(np.array([10, 0, 30])), [4.0, 0.0, 4.0 / 3.0])


def test_loss_hand_computed_value():
    logits = torch.zeros(1, 2, 1, 2)
    logits[0, 1, 0, 0] = math.log(3.0)  # p = (1/4, 3/4) at the labelled pixel
    target = torch.tensor([[[1, -1]]])
    w = torch.tensor([1.0, 2.0])
    # -w_1 log(3/4), averaged over both pixels (the unlabelled one counts 0)
    assert weighted_sparse_ce(logits, target, w).item() == pytest.approx(-2.0 * math.log(0.75) / 2)


def test_unlabelled_pixels_contribute_exactly_zero():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 8, 8, generator=g, requires_grad=True)
    target = torch.randint(0, 5, (2, 8, 8), generator=g)
    unlabelled = torch.rand(2, 8, 8, generator=g) < 0.6
    target[unlabelled] = -1
    w = torch.rand(5, generator=g) + 0.5
    loss = weighted_sparse_ce(logits, target, w)
    loss.backward()
    grad = logits.grad.permute(0, 2, 3, 1)
    assert torch.all(grad[unlabelled] == 0)  # exactly zero, not merely small
    assert torch.all(grad[~unlabelled].abs().sum(-1) > 0)
    # anything (even -inf log-probabilities) at unlabelled pixels leaves the loss unchanged
    wild = logits.detach().clone()
    wild.permute(0, 2, 3, 1)[unlabelled] = torch.tensor([1e4, -1e4, 0.0, 3.0, -7.0])
    assert weighted_sparse_ce(wild, target, w).item() == pytest.approx(loss.item(), rel=1e-6)
    none = torch.full_like(target, -1)
    zero = weighted_sparse_ce(logits, none, w)
    assert zero.item() == 0.0
    logits.grad = None
    zero.backward()
    assert torch.all(logits.grad == 0)


# --- whole training runs ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nets")
    scene = make_scene(tmp)
    patches = {}
    cfg = net_config(tmp)
    for tile, lab in scene.labels.items():
        patches[tile] = tmp / "patches" / f"{tile}.train.npz"
        index_patches(cfg, tile, lab, patches[tile])
    return tmp, scene, patches


def _train(cfg, scene, patches, out, name="fgunet"):
    train_network(cfg, name, scene.gapfilled, scene.labels, scene.percentiles, out, patches=patches)


def _weights(model_dir):
    return load_weights(model_dir / WEIGHTS)["state_dict"]


def _same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(run):
    tmp, scene, patches = run
    cfg = net_config(tmp / "a")
    out = tmp / "a" / "models" / "fgunet"
    _train(cfg, scene, patches, out)
    return cfg, out


def test_model_folder(uninterrupted):
    cfg, out = uninterrupted
    meta = load_meta(out)
    assert meta["name"] == "fgunet"
    assert meta["classes"]["codes"] == [int(c) for c in cfg.class_codes]
    assert meta["features"]["groups"] == 3 and meta["features"]["channels_per_group"] == 10
    hist = meta["training"]["history"]
    assert [h["epoch"] for h in hist] == [1, 2]
    assert hist[0]["lr"] == pytest.approx(1e-3)  # one process: eq. 3 is the base rate
    assert all(0 <= h["sel_oa"] <= 1 for h in hist)
    assert 1 <= meta["training"]["kept_epoch"] <= 2
    assert (out / "training.png").stat().st_size > 0
    assert (out / "history.csv").read_text().splitlines()[0].startswith("epoch,lr,train_loss")
    # the weights file holds no code: it loads under weights_only=True
    blob = torch.load(out / WEIGHTS, weights_only=True)
    assert blob["arch"] == "fgunet" and blob["codes"] == meta["classes"]["codes"]
    model = get("fgunet").load(out)
    assert model.classes_.tolist() == meta["classes"]["codes"]
    assert latest_checkpoint(out.with_name("fgunet.checkpoints")).name == "epoch_0002.pt"


# --- nets.precision (bf16 training) ----------------------------------------------------------------


def _logit_dtypes(monkeypatch) -> list:
    seen = []
    real = nettrain.weighted_sparse_ce

    def spy(logits, *a, **k):
        seen.append(logits.dtype)
        return real(logits, *a, **k)

    monkeypatch.setattr(nettrain, "weighted_sparse_ce", spy)
    return seen


def test_bf16_training_that_cannot_run_trains_in_fp32_and_says_so(run, tmp_path, monkeypatch, caplog):
    """The documented path on hardware without bf16: a warning, fp32 maths, and the record says fp32."""
    from pipeline.nets import capability

    _, scene, patches = run
    monkeypatch.setattr(capability, "bf16_autocast", lambda kind="cpu": False)
    dtypes = _logit_dtypes(monkeypatch)
    out = tmp_path / "models" / "fgunet"
    with caplog.at_level("WARNING", logger="pipeline.nets.capability"):
        _train(net_config(tmp_path, epochs=1, precision="bf16"), scene, patches, out)
    assert any(
        "nets.precision bf16" in r.getMessage() and "training in fp32" in r.getMessage()
        for r in caplog.records
    )
    meta = load_meta(out)["training"]
    assert meta["precision_used"] == "fp32" and meta["history"][0]["precision"] == "fp32"
    rows = list(csv.DictReader((out / "history.csv").read_text().splitlines()))
    assert rows[0]["precision"] == "fp32" and float(rows[0]["cpu_seconds"]) > 0
    assert set(dtypes) == {torch.float32}
    monkeypatch.setattr(capability, "native_bf16", lambda device="cpu": False)
    assert capability.choose_precision("auto", "cpu", training=True) == "fp32"


def test_bf16_training_runs_bf16_maths_on_fp32_weights(run, tmp_path, monkeypatch):
    from pipeline.nets import capability

    if not capability.bf16_autocast("cpu"):
        pytest.skip(f"bf16 autocast does not run on this CPU ({capability.failure('bf16 autocast on cpu')})")
    _, scene, patches = run
    dtypes = _logit_dtypes(monkeypatch)
    out = tmp_path / "models" / "fgunet"
    _train(net_config(tmp_path, epochs=1, precision="bf16"), scene, patches, out)
    meta = load_meta(out)["training"]
    assert meta["precision_used"] == "bf16" and meta["precision"] == "bf16"
    assert dtypes[:3] == [torch.bfloat16] * 3  # the 3 training steps; selection scoring is fp32
    assert all(v.dtype == torch.float32 for v in _weights(out).values())  # master weights stay fp32
    assert np.isfinite(meta["history"][0]["train_loss"])


# --- nets.init_from (fine-tuning, seed §6) ----------------------------------------------------------


def test_fine_tune_starts_exactly_from_the_given_model(run, uninterrupted):
    """With a learning rate of 1e-12 a training run cannot move the weights measurably: the model
    folder then holds the starting model's weights, whereas a training from scratch starts far away.
    Provenance names the starting model and its file's digest (hashlib here, independently)."""
    tmp, scene, patches = run
    _, start = uninterrupted
    cfg = net_config(tmp / "ft", epochs=1, learning_rate=1e-12, init_from=str(start))
    out = tmp / "ft" / "models" / "fgunet"
    _train(cfg, scene, patches, out)
    got, want = _weights(out), _weights(start)
    assert got.keys() == want.keys()
    assert max((got[k].float() - want[k].float()).abs().max().item() for k in got) < 1e-8
    scratch = tmp / "ft0" / "models" / "fgunet"
    _train(net_config(tmp / "ft0", epochs=1, learning_rate=1e-12), scene, patches, scratch)
    assert max((_weights(scratch)[k].float() - want[k].float()).abs().max().item() for k in want) > 1e-3
    prov = load_meta(out)["training"]["init_from"]
    assert prov["model"] == str(start.resolve()) and prov["name"] == "fgunet"
    assert prov["weights_sha256"] == hashlib.sha256((start / WEIGHTS).read_bytes()).hexdigest()[:16]
    assert load_meta(scratch)["training"]["init_from"] is None


def test_weight_init_reaches_the_training(run):
    """``nets.weight_init: he`` starts from zero biases (unmoved at a learning rate of 1e-12), the
    default from torch's uniform ones; the default leaves the checkpoints' identity as it was."""
    from pipeline.nets.checkpoints import training_identity
    from pipeline.nets.settings import NetSettings

    tmp, scene, patches = run
    biases = {}
    for how in ("he", "torch"):
        out = tmp / f"init-{how}" / "models" / "fgunet"
        _train(
            net_config(tmp / f"init-{how}", epochs=1, learning_rate=1e-12, weight_init=how),
            scene,
            patches,
            out,
        )
        w = _weights(out)
        biases[how] = max(w[k].float().abs().max().item() for k in w if k.endswith(".bias"))
    assert biases["he"] < 1e-8 < 1e-3 < biases["torch"]
    ident = {
        h: training_identity(NetSettings.from_config(net_config(tmp, weight_init=h)), 1, 1)
        for h in ("torch", "he")
    }
    assert "weight_init" not in ident["torch"] and ident["he"]["weight_init"] == "he"


def test_unet_aux_loss_trains_the_branch_and_resumes_exactly(run, uninterrupted, monkeypatch):
    """``nets.unet_aux_loss`` changes the training (same seed, draws and dropout: only the loss
    differs), keeps the model as it was built (the branch classifier is not in the weights file),
    and its classifier travels in the checkpoints: killed after epoch 1 and started again, the run
    ends with the uninterrupted run's weights. Off (0), the identity is what it was before."""
    from pipeline.nets.checkpoints import training_identity
    from pipeline.nets.settings import NetSettings

    tmp, scene, patches = run
    cfg = net_config(tmp / "aux-a", unet_aux_loss=0.5)
    whole = tmp / "aux-a" / "models" / "fgunet"
    _train(cfg, scene, patches, whole)
    got, plain = _weights(whole), _weights(uninterrupted[1])
    assert got.keys() == plain.keys() and all(got[k].shape == plain[k].shape for k in got)
    assert not _same_weights(got, plain)
    blob = load_weights(latest_checkpoint(whole.with_name("fgunet.checkpoints")))
    assert set(blob["branch_state_dict"]) == {"weight", "bias"}

    out = tmp / "aux-b" / "models" / "fgunet"
    cfg = net_config(tmp / "aux-b", unet_aux_loss=0.5)
    _killed_after_epoch_one(monkeypatch, lambda: _train(cfg, scene, patches, out))
    _train(cfg, scene, patches, out)
    assert _same_weights(_weights(out), got)
    # the kept epoch may be the first: the last epoch's weights tell whether epoch 2 resumed right
    last = load_weights(latest_checkpoint(out.with_name("fgunet.checkpoints")))
    assert last["epoch"] == blob["epoch"] == 2
    assert _same_weights(last["state_dict"], blob["state_dict"])
    assert _same_weights(last["branch_state_dict"], blob["branch_state_dict"])
    ident = {
        w: training_identity(NetSettings.from_config(net_config(tmp, unet_aux_loss=w)), 1, 1) for w in (0, 1)
    }
    assert "unet_aux_loss" not in ident[0] and ident[1]["unet_aux_loss"] == 1.0


def _damaged(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    data = (dst / WEIGHTS).read_bytes()
    (dst / WEIGHTS).write_bytes(data[: len(data) // 2])
    return dst


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "mlp3"}, "it is a fgunet, this run trains a mlp3"),
        ({"nets": {"groups": 1}}, "temporal groups differ"),
        (
            {"nets": {"unet_filters": [4, 8, 32]}},
            r"nets.unet_filters: \[4, 8, 16\] in the model vs \[4, 8, 32\]",
        ),
        ({"nets": {"indices": ["ndvi"]}}, "spectral indices differ"),
        ({"drop_class": 53}, r"classes differ \(not in this run: 53 GPS\)"),
        ({"folder": "missing"}, "no model folder here"),
        ({"folder": "damaged"}, "not a loadable weights file"),
    ],
)
def test_fine_tune_refuses_an_incompatible_model_before_anything(
    run, uninterrupted, tmp_path, change, message
):
    """One line naming the file and the difference; no checkpoint, no model folder written."""
    _, scene, patches = run
    _, start = uninterrupted
    folder = start
    if change.get("folder") == "missing":
        folder = tmp_path / "nowhere"
    elif change.get("folder") == "damaged":
        folder = _damaged(start, tmp_path / "damaged")
    cfg = net_config(tmp_path, **({"init_from": str(folder)} | change.get("nets", {})))
    if code := change.get("drop_class"):
        raw = cfg.data
        raw["nomenclature"] = [c for c in raw["nomenclature"] if c["code"] != code]
        cfg = Config(validate(json.loads(json.dumps(raw))))
    out = tmp_path / "models" / change.get("name", "fgunet")
    with pytest.raises(PipelineError, match=message) as err:
        _train(cfg, scene, patches, out, name=change.get("name", "fgunet"))
    assert str(folder) in str(err.value) and "\n" not in str(err.value)
    assert not out.exists() and not out.with_name(f"{out.name}.checkpoints").exists()


def test_fine_tune_does_not_resume_a_checkpoint_from_scratch(run, uninterrupted, tmp_path):
    """A checkpoint written by a training from scratch is not the start of a fine-tune."""
    tmp, scene, patches = run
    out = tmp_path / "models" / "fgunet"
    _train(net_config(tmp_path, epochs=1), scene, patches, out)
    shutil.rmtree(out)
    with pytest.raises(PipelineError, match="starting weights"):
        _train(
            net_config(tmp_path, epochs=2, init_from=str(tmp / "a" / "models" / "fgunet")),
            scene,
            patches,
            out,
        )


def test_init_from_mapping_names_networks_of_the_run(tmp_path):
    with pytest.raises(PipelineError, match="nets/init_from.*unet3 not among"):
        net_config(tmp_path, init_from={"unet3": "x"})
    cfg = net_config(tmp_path, classifiers=("fgunet", "mlp3"), init_from={"mlp3": "last/mlp3"})
    from pipeline.nets.settings import NetSettings

    s = NetSettings.from_config(cfg)
    assert s.init_folder("mlp3") == Path("last/mlp3") and s.init_folder("fgunet") is None


def _killed_after_epoch_one(monkeypatch, training) -> None:
    """Run ``training`` as a job killed right after it wrote its epoch-1 checkpoint."""
    real_save = nettrain.save_checkpoint

    def killed_after_first(ckdir, epoch, *a, **k):
        path = real_save(ckdir, epoch, *a, **k)
        if epoch == 1:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(nettrain, "save_checkpoint", killed_after_first)
    with pytest.raises(KeyboardInterrupt):
        training()
    monkeypatch.setattr(nettrain, "save_checkpoint", real_save)


def test_resume_after_kill_between_epochs_is_exact(run, uninterrupted, monkeypatch):
    tmp, scene, patches = run
    cfg = net_config(tmp / "b")
    out = tmp / "b" / "models" / "fgunet"
    _killed_after_epoch_one(monkeypatch, lambda: _train(cfg, scene, patches, out))
    assert not out.exists()  # no half-trained model folder
    _train(cfg, scene, patches, out)
    assert _same_weights(_weights(out), _weights(uninterrupted[1]))
    strip = [
        {k: v for k, v in h.items() if k not in ("seconds", "cpu_seconds")}
        for h in load_meta(out)["training"]["history"]
    ]
    ref = [
        {k: v for k, v in h.items() if k not in ("seconds", "cpu_seconds")}
        for h in load_meta(uninterrupted[1])["training"]["history"]
    ]
    assert strip == ref


def test_resume_after_kill_mid_epoch_is_exact(run, uninterrupted, monkeypatch):
    tmp, scene, patches = run
    cfg = net_config(tmp / "c")
    out = tmp / "c" / "models" / "fgunet"
    real_loss = nettrain.weighted_sparse_ce
    calls = {"n": 0}

    def dies_in_epoch_two(*a, **k):
        calls["n"] += torch.is_grad_enabled()  # training steps only (selection scoring is no_grad)
        if calls["n"] == 5:  # epoch 1 has 3 steps: this is epoch 2, batch 2
            raise KeyboardInterrupt
        return real_loss(*a, **k)

    monkeypatch.setattr(nettrain, "weighted_sparse_ce", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        _train(cfg, scene, patches, out)
    assert latest_checkpoint(out.with_name("fgunet.checkpoints")).name == "epoch_0001.pt"
    monkeypatch.setattr(nettrain, "weighted_sparse_ce", real_loss)
    _train(cfg, scene, patches, out)
    assert _same_weights(_weights(out), _weights(uninterrupted[1]))


def test_nan_loss_stops_naming_epoch_and_batch(run, monkeypatch):
    tmp, scene, patches = run
    cfg = net_config(tmp / "d")
    out = tmp / "d" / "models" / "fgunet"
    real_loss = nettrain.weighted_sparse_ce
    calls = {"n": 0}

    def nan_in_epoch_two(*a, **k):
        calls["n"] += torch.is_grad_enabled()  # training steps only (selection scoring is no_grad)
        loss = real_loss(*a, **k)
        # epoch 1 has 3 steps: epoch 2 batch 2 is training call 5
        return loss * float("nan") if calls["n"] == 5 and torch.is_grad_enabled() else loss

    monkeypatch.setattr(nettrain, "weighted_sparse_ce", nan_in_epoch_two)
    with pytest.raises(PipelineError, match=r"loss is nan at epoch 2, batch 2.*epoch_0001\.pt kept"):
        _train(cfg, scene, patches, out)
    assert not out.exists()
    ck = latest_checkpoint(out.with_name("fgunet.checkpoints"))
    assert ck.name == "epoch_0001.pt"
    assert all(torch.isfinite(v).all() for v in load_weights(ck)["state_dict"].values())


def test_checkpoint_of_another_run_is_refused(run, uninterrupted):
    tmp, scene, patches = run
    _, ref_out = uninterrupted
    ckdir = ref_out.with_name("fgunet.checkpoints")
    out = tmp / "e" / "models" / "fgunet"
    # another class list (a class added to the nomenclature)
    cfg = net_config(tmp / "e")
    raw = cfg.data
    raw["nomenclature"].append({"code": 12, "name": "AWC", "colour": "#ffff7f"})
    other = Config(validate(raw))
    with pytest.raises(PipelineError, match="class list differ"):
        train_network(
            other, "fgunet", scene.gapfilled, scene.labels, scene.percentiles, out,
            patches=patches, checkpoints=ckdir,
        )  # fmt: skip
    # other percentiles (normalisation)
    doc = json.loads(scene.percentiles.read_text())
    doc["high"] = [h + 1 for h in doc["high"]]
    pct = tmp / "e" / "percentiles.json"
    pct.parent.mkdir(parents=True, exist_ok=True)
    pct.write_text(json.dumps(doc))
    with pytest.raises(PipelineError, match="normalisation"):
        train_network(
            net_config(tmp / "e"), "fgunet", scene.gapfilled, scene.labels, pct, out,
            patches=patches, checkpoints=ckdir,
        )  # fmt: skip
    assert not out.exists()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b.pop("state_dict"), "damaged checkpoint .missing 'state_dict'"),
        (
            lambda b: b["state_dict"].update({k: v[:1] for k, v in list(b["state_dict"].items())[:1]}),
            "size mismatch",
        ),
        (lambda b: b.pop("optimizer"), "damaged checkpoint .missing 'optimizer'"),
    ],
)
def test_damaged_checkpoint_is_one_line_naming_it(run, uninterrupted, tmp_path, damage, message):
    """A checkpoint of this very run, damaged: one line naming the file, no traceback, nothing written."""
    tmp, scene, patches = run
    cfg, ref_out = uninterrupted
    ckdir = tmp_path / "ck"
    shutil.copytree(ref_out.with_name("fgunet.checkpoints"), ckdir)
    latest = latest_checkpoint(ckdir)
    blob = torch.load(latest, weights_only=True)
    damage(blob)
    torch.save(blob, latest)
    out = tmp_path / "models" / "fgunet"
    with pytest.raises(PipelineError, match=message) as err:
        train_network(
            net_config(tmp / "a", epochs=3), "fgunet", scene.gapfilled, scene.labels, scene.percentiles, out,
            patches=patches, checkpoints=ckdir,
        )  # fmt: skip
    assert str(latest) in str(err.value) and "\n" not in str(err.value)
    assert not out.exists()


def test_weights_with_code_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / WEIGHTS
    path.write_bytes(pickle.dumps({"state_dict": Evil()}))
    with pytest.raises(PipelineError, match="not a loadable weights file"):
        load_weights(path)


def test_registry_names_every_network():
    assert set(ARCHS) == set(NETWORKS)
    for name in NETWORKS:
        assert issubclass(get(name), NetClassifier) and get(name).arch == name


def test_config_rejects_groups_that_do_not_divide_the_dates(tmp_path):
    with pytest.raises(PipelineError, match="nets/groups"):
        net_config(tmp_path, groups=2)  # 3 dates
    raw = yaml.safe_load(yaml.safe_dump(make_config(tmp_path).data))
    raw["nets"] = TINY | {"groups": 2}
    validate(raw)  # RF alone does not care about temporal groups


def test_config_rejects_unet_aux_loss_without_a_branched_network(tmp_path):
    raw = yaml.safe_load(yaml.safe_dump(make_config(tmp_path).data))
    raw["nets"] = TINY | {"unet_aux_loss": 1.0}
    raw["classifiers"] = ["rf", "unet3", "mlp3"]
    with pytest.raises(PipelineError, match="nets/unet_aux_loss.*only fgunet"):
        validate(raw)
    raw["classifiers"] = ["rf", "unet3", "fgunet"]
    validate(raw)


@pytest.mark.parametrize(
    ("nets", "classifiers", "where"),
    [
        ({"patch_size": 30}, ["fgunet"], "nets/patch_size"),  # 3 U-Net levels pool by 4
        ({"patch_size": 36, "unet_filters": [4, 8, 16, 32]}, ["unet3"], "nets/patch_size"),  # by 8
        ({"patch_size": 48, "unet_filters": [2, 2, 2, 2, 2, 2]}, ["tsfgunet"], "nets/patch_size"),  # by 32
    ],
)
def test_config_rejects_patches_the_unet_cannot_pool(tmp_path, nets, classifiers, where):
    """Checked when the config is validated, not after the patches stage ran on every tile; a
    network without a U-Net (mlp3) pools nothing, so any size is fine for it."""
    raw = yaml.safe_load(yaml.safe_dump(make_config(tmp_path).data))
    raw["nets"] = TINY | nets
    raw["classifiers"] = ["rf", *classifiers]
    with pytest.raises(PipelineError, match=f"{where}.*pooling factor"):
        validate(raw)
    raw["classifiers"] = ["rf", "mlp3"]
    validate(raw)


def test_tile_without_patch_positions_warns_and_is_still_mapped(tmp_path, caplog):
    scene = make_scene(tmp_path)
    cfg = net_config(tmp_path, epochs=1, steps_per_epoch=2)
    empty_tile = "T31TDJ"
    zarr.open_group(str(scene.labels[empty_tile]), mode="r+")["train"][...] = 0
    patches = {t: tmp_path / f"{t}.train.npz" for t in scene.labels}
    with caplog.at_level("WARNING"):
        for tile, lab in scene.labels.items():
            index_patches(cfg, tile, lab, patches[tile])
    assert any(empty_tile in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    out = tmp_path / "models" / "mlp3"
    train_network(cfg, "mlp3", scene.gapfilled, scene.labels, scene.percentiles, out, patches=patches)
    assert load_meta(out)["training"]["patch_positions"][empty_tile] == 0
    predict_tile(cfg, out, scene.gapfilled[empty_tile], tmp_path / "m.tif", confidence=tmp_path / "c.tif")
    with rasterio.open(tmp_path / "m.tif") as src:
        assert (src.read(1) > 0).mean() > 0.8  # mapped everywhere it has data


def test_predict_refuses_weights_that_disagree_with_model_json(uninterrupted, run, tmp_path):
    _, scene, _ = run
    cfg, out = uninterrupted
    bad = tmp_path / "fgunet"
    shutil.copytree(out, bad)
    meta = json.loads((bad / "model.json").read_text())
    meta["classes"]["codes"] = meta["classes"]["codes"][::-1]
    (bad / "model.json").write_text(json.dumps(meta))
    target = tmp_path / "m.tif"
    with pytest.raises(PipelineError, match="classes .* differ from model.json"):
        predict_tile(cfg, bad, scene.gapfilled["T31TCJ"], target, confidence=tmp_path / "c.tif")
    assert not target.exists() and not (tmp_path / "c.tif").exists()


def test_checkpoint_trained_on_other_labels_is_refused(run, uninterrupted, tmp_path):
    _, scene, patches = run
    _, ref_out = uninterrupted
    cfg = net_config(tmp_path)
    # the reference polygons changed: a few training pixels relabelled
    labels = {}
    for tile, src in scene.labels.items():
        labels[tile] = tmp_path / src.name
        shutil.copytree(src, labels[tile])
    arr = zarr.open_group(str(labels["T31TCJ"]), mode="r+")["train"]
    block = arr[0:8, 0:8]
    arr[0:8, 0:8] = np.where(block > 0, 51, 0).astype(np.uint8)
    with pytest.raises(PipelineError, match="training labels"):
        train_network(
            cfg, "fgunet", scene.gapfilled, labels, scene.percentiles, tmp_path / "m",
            patches=patches, checkpoints=ref_out.with_name("fgunet.checkpoints"),
        )  # fmt: skip


# --- sparse labels, weights and model selection (issue 10) ----------------------------------------


def _sparse_class_scene(tmp_path):
    """The stripes scene plus class 53 as 3x3 objects (9 px: no 32-px patch holds 10 % of it) with a
    spectrum of its own (alternating low/high bands), in the training rows and the validation rows."""
    scene = make_scene(tmp_path)
    rng = np.random.default_rng(5)
    for tile in scene.labels:
        refl = zarr.open_group(str(scene.gapfilled[tile]), mode="r+")["reflectance"]
        cube = refl[...]
        lab = zarr.open_group(str(scene.labels[tile]), mode="r+")
        train, val, sel = lab["train"][...], lab["validation"][...], lab["selection"][...]
        spectrum = np.where(np.arange(cube.shape[1]) % 2, 4200, 300)[None, :, None, None]
        for r in (18, 38, 62, 82):
            for c in range(4, 124, 12):
                cube[:, :, r : r + 3, c : c + 3] = spectrum + rng.normal(
                    0, 150, (cube.shape[0], cube.shape[1], 3, 3)
                )
                target = train if r < 48 else val
                target[r : r + 3, c : c + 3] = 53
                if 32 <= r < 48:
                    sel[r : r + 3, c : c + 3] = 53
        refl[...] = cube
        lab["train"][...], lab["validation"][...], lab["selection"][...] = train, val, sel
    return scene


def _recall(cfg, scene, out, tmp_path, code=53):
    hit = total = 0
    for tile in scene.labels:
        predict_tile(cfg, out, scene.gapfilled[tile], tmp_path / f"{tile}.tif")
        with rasterio.open(tmp_path / f"{tile}.tif") as src:
            pred = src.read(1)
        ref = zarr.open_group(str(scene.labels[tile]), mode="r")["validation"][...]
        hit += int(((ref == code) & (pred == code)).sum())
        total += int((ref == code).sum())
    return hit / total


def test_a_sparse_class_is_drawn_and_learnt_and_an_undrawable_one_stops(tmp_path, caplog):
    """The seed's 10 % rule alone never draws a class of 9-px objects: training stops naming it.
    With the relaxed threshold (the default) it is drawn from its best-stocked positions and mapped."""
    scene = _sparse_class_scene(tmp_path)
    strict = net_config(tmp_path / "strict", min_class_positions=0)
    patches = {t: tmp_path / "strict" / f"{t}.train.npz" for t in scene.labels}
    for tile, lab in scene.labels.items():
        index_patches(strict, tile, lab, patches[tile])
    with pytest.raises(PipelineError, match=r"never drawn for training: 53 GPS.*allow_undrawn_classes"):
        train_network(
            strict, "mlp3", scene.gapfilled, scene.labels, scene.percentiles, tmp_path / "s", patches=patches
        )
    assert not (tmp_path / "s").exists()

    cfg = net_config(tmp_path / "relaxed", epochs=3, steps_per_epoch=10, learning_rate=0.01)
    patches = {t: tmp_path / "relaxed" / f"{t}.train.npz" for t in scene.labels}
    for tile, lab in scene.labels.items():
        index_patches(cfg, tile, lab, patches[tile])
    out = tmp_path / "relaxed" / "mlp3"
    with caplog.at_level("INFO", logger="pipeline.nets.train"):
        train_network(cfg, "mlp3", scene.gapfilled, scene.labels, scene.percentiles, out, patches=patches)
    meta = load_meta(out)["training"]
    thr = int(meta["draw_thresholds_px"]["53"])
    assert thr in (9, 18, 27)  # whole objects (1-3 of them in a patch), far below 10 % of 32x32 = 103 px
    assert any(f"53 GPS ({thr})" in r.getMessage() for r in caplog.records)
    assert _recall(cfg, scene, out, tmp_path) > 0.8


def test_sampled_weights_correct_only_what_the_sampler_leaves(run):
    """Eq. 4 on the pixels of drawn patches: a class the sampler over-represents is not weighted up
    again. Counts are checked against the same draws counted by hand."""
    tmp, scene, patches = run
    cfg = net_config(tmp / "w")
    data = nettrain.PatchData(
        scene.gapfilled, scene.labels, patches, nettrain.Normalisation.from_percentiles(scene.percentiles), 32
    )
    sampler = nettrain.ClassFirstSampler(list(data.train_index.values()), [11, 31, 51], need=103)
    got = nettrain.sampled_pixels(data, sampler, cfg.class_codes, seed=3, n=64)
    refs = sampler.draw(64, np.random.default_rng(3))
    want = np.zeros(256, np.int64)
    for r in refs:
        train = zarr.open_group(str(scene.labels[r.tile]), mode="r")["train"][
            r.row : r.row + 32, r.col : r.col + 32
        ]
        sel = zarr.open_group(str(scene.labels[r.tile]), mode="r")["selection"][
            r.row : r.row + 32, r.col : r.col + 32
        ]
        want += np.bincount(np.where(sel > 0, 0, train).ravel(), minlength=256)
    np.testing.assert_array_equal(got, want[np.asarray(cfg.class_codes, np.int64)])
    # cap: 1031 / 1 would be 1000x the smallest weight; it is held at 50x (1.031 * 50)
    np.testing.assert_allclose(
        class_weights(np.array([1000, 30, 0, 1]), cap=50), [1.031, 1031 / 30, 0, 51.55], rtol=1e-6
    )


def test_the_epoch_kept_is_the_best_on_the_selection_polygons(run, monkeypatch):
    """Selection kappa peaks at epoch 1 of 3: the model folder holds epoch 1's weights, also after a
    kill and resume; the validation labels are never read during training."""
    tmp, scene, patches = run
    scores_by_epoch = iter([0.9, 0.5, 0.7] * 2)
    real_eval = nettrain.evaluate

    def scripted(*a, **k):
        row = real_eval(*a, **k)
        return row | {"sel_kappa": next(scores_by_epoch)}

    monkeypatch.setattr(nettrain, "evaluate", scripted)
    read_splits = []
    real_read = nettrain.PatchData.read

    def spy(self, refs, split="train"):
        read_splits.append(split)
        return real_read(self, refs, split)

    real_context = nettrain.PatchData.read_in_context

    def spy_context(self, ref, split, margin):
        read_splits.append(split)
        assert margin == 24  # the 3-level U-Net's receptive radius (23 px), on the pooling grid
        return real_context(self, ref, split, margin)

    monkeypatch.setattr(nettrain.PatchData, "read", spy)
    monkeypatch.setattr(nettrain.PatchData, "read_in_context", spy_context)
    cfg = net_config(tmp / "best", epochs=3, keep_checkpoints=1)
    out = tmp / "best" / "models" / "fgunet"
    _train(cfg, scene, patches, out)
    meta = load_meta(out)["training"]
    assert meta["kept_epoch"] == 1 and [h["sel_kappa"] for h in meta["history"]] == [0.9, 0.5, 0.7]
    assert set(read_splits) == {"train", "selection"}
    ckdir = out.with_name("fgunet.checkpoints")
    assert [p.name for p in ckdir.glob("epoch_*.pt")] == ["epoch_0003.pt"]  # epoch 1's file is gone
    epoch1 = load_weights(ckdir / "epoch_0003.pt")["best"]
    assert epoch1["epoch"] == 1 and _same_weights(_weights(out), epoch1["state_dict"])
    assert not _same_weights(_weights(out), load_weights(ckdir / "epoch_0003.pt")["state_dict"])


def test_selection_scores_are_the_maps_scores_on_those_pixels(run, uninterrupted):
    """Each selection patch is scored with its context: the same confusion matrix as the whole-tile
    map (one forward pass) on the patches' selection pixels (an independent path: classify_window)."""
    from pipeline.metrics import confusion, scores
    from pipeline.models.features import Normalisation
    from pipeline.nets.data import PatchData, code_lut

    _, scene, patches = run
    cfg, out = uninterrupted
    model = get("fgunet").load(out)
    norm = Normalisation.from_percentiles(scene.percentiles)
    data = PatchData(scene.gapfilled, scene.labels, patches, norm, 32)
    refs = data.selection_refs(8, seed=0)
    assert refs
    w = torch.ones(len(cfg.class_codes))
    got = nettrain.evaluate(
        model.net, (data.read_in_context(r, "selection", 24) for r in refs), norm, (), cfg.class_codes,
        code_lut(cfg.class_codes), w, "cpu",
    )  # fmt: skip
    cm = np.zeros((len(cfg.class_codes),) * 2, np.int64)
    maps = {t: model.classify_window(scene.cubes[t], norm)[0] for t in scene.labels}
    for r in refs:
        sel = zarr.open_group(str(scene.labels[r.tile]), mode="r")["selection"][
            r.row : r.row + 32, r.col : r.col + 32
        ]
        cm += confusion(sel, maps[r.tile][r.row : r.row + 32, r.col : r.col + 32], cfg.class_codes)
    assert got["sel_kappa"] == pytest.approx(scores(cm)["kappa"], abs=1e-12)
    assert got["sel_oa"] == pytest.approx(scores(cm)["oa"], abs=1e-12)


def test_kept_epoch_rule_without_selection_scores_is_the_last():
    better = nettrain._better
    assert better(None, None)  # no selection patches at all: each new epoch replaces the kept one
    assert not better(None, 0.5) and better(0.6, None)
    assert better(0.6, 0.5) and not better(0.5, 0.5)  # ties keep the earlier epoch


def test_a_setting_changed_after_a_finished_training_retrains_afresh(run, uninterrupted, tmp_path, caplog):
    """What Snakemake's params trigger does after e.g. nets.learning_rate changed: the finished
    training's checkpoints are not resumed (another run) nor refused (it finished, and the model
    is the product): the network trains from scratch, exactly as if there were none."""
    _, scene, patches = run
    _, ref_out = uninterrupted
    out = tmp_path / "models" / "fgunet"
    shutil.copytree(ref_out, out)
    shutil.copytree(ref_out.with_name("fgunet.checkpoints"), out.with_name("fgunet.checkpoints"))
    changed = net_config(tmp_path, learning_rate=2e-3)
    with caplog.at_level("WARNING"):
        _train(changed, scene, patches, out)
    assert (
        "trained with other settings (training settings differ (learning_rate: 0.001 vs 0.002))"
        in caplog.text
    )
    fresh = tmp_path / "fresh" / "models" / "fgunet"
    _train(net_config(tmp_path / "fresh", learning_rate=2e-3), scene, patches, fresh)
    assert _same_weights(_weights(out), _weights(fresh))
    assert load_meta(out)["training"]["learning_rate"] == 2e-3
    assert len(load_meta(out)["training"]["history"]) == len(load_meta(fresh)["training"]["history"])


def test_too_few_patch_positions_warn_with_the_count(tmp_path, caplog):
    """A tile about one patch in size trains on a handful of patches: said, with the count."""
    scene = make_scene(tmp_path)
    cfg = net_config(tmp_path, patch_stride=32, epochs=1, steps_per_epoch=1)  # 3 x 4 positions a tile
    patches = {t: tmp_path / f"{t}.train.npz" for t in scene.labels}
    for tile, lab in scene.labels.items():
        index_patches(cfg, tile, lab, patches[tile])
    out = tmp_path / "models" / "mlp3"
    with caplog.at_level("WARNING"):
        train_network(cfg, "mlp3", scene.gapfilled, scene.labels, scene.percentiles, out, patches=patches)
    n = sum(load_meta(out)["training"]["patch_positions"].values())
    assert 0 < n <= 24
    assert f"mlp3: only {n} training patch positions of 32 px in all tiles" in caplog.text
