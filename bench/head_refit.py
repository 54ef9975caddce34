"""Is it FG-UNET's features or its classifier? Refit the last (linear 1x1) layer on frozen features.

The paper profile (docs/networks.md) found FG-UNET below RF on the urban classes while RF on the
same network's penultimate features (``fgunet_rf``) is above RF. This script separates the two
explanations left open there: a trained network's features are computed for the RF's class-balanced
pixel sample (exactly the hybrid's), a multinomial logistic regression (a linear head, the same
shape as the network's last layer; ``pipeline.nets.headfit.fit_linear_head``, what
``nets.head_refit`` runs in the chain) is fitted on them, and its weights replace the network's last
layer in a copy of the model. The copy is mapped and validated by the chain's own ``predict`` and
``validate`` stages, so its scores compare directly with ``metrics/<model>`` and
``metrics/fgunet_rf-*`` of the same run.

    python bench/head_refit.py --workdir results/paper --model fgunet-s44

Writes under ``<workdir>/bench/head_refit/<model>/`` and prints one JSON line per model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cli import main as landcover
from pipeline.config import Config, load_config
from pipeline.layout import Layout
from pipeline.models import get
from pipeline.models.features import Normalisation
from pipeline.models.pixel import training_sample
from pipeline.nets.features import network_features
from pipeline.nets.headfit import fit_linear_head
from pipeline.train import load_meta


@dataclass
class TrainedNet:
    """A finished run's trained network with what reading its features needs."""

    cfg: Config  # the run's config, with the model's own seed
    lay: Layout
    classifier: str
    seed: int | None
    net_dir: Path
    net: Any
    norm: Normalisation
    gapfilled: dict[str, Path]
    labels: dict[str, Path]


def load_network(workdir: Path, model: str) -> TrainedNet:
    cfg = load_config(workdir / "run-config.yaml")
    classifier, seed = Layout.split_seed_model(model)
    if seed is not None:
        cfg = cfg.with_seed(seed)  # the hybrid of this seed samples its pixels with it
    lay = Layout(workdir)
    net_dir = lay.model_dir(model)
    meta = load_meta(net_dir)
    feats = meta["features"]
    norm = Normalisation.from_json(meta["normalisation"], feats["bands"], feats["dates"])
    gapfilled = {t: lay.gapfilled(t) for t in cfg.tiles}
    labels = {t: lay.labels(t) for t in cfg.tiles}
    net = get(classifier).load(net_dir)
    return TrainedNet(cfg, lay, classifier, seed, net_dir, net, norm, gapfilled, labels)


def refit(workdir: Path, model: str, c_reg: float) -> dict:
    run_config = workdir / "run-config.yaml"
    t_net = load_network(workdir, model)
    cfg, lay, classifier, seed, net_dir = t_net.cfg, t_net.lay, t_net.classifier, t_net.seed, t_net.net_dir
    net, norm, gapfilled, labels = t_net.net, t_net.norm, t_net.gapfilled, t_net.labels

    t0 = time.process_time()
    sample, *_ = training_sample(cfg, labels, gapfilled, norm)
    margin = net.spec.pool_aligned(net.receptive_radius)
    x = network_features(net, norm, gapfilled, sample, int(cfg["inference"]["window"]), margin)
    t_feat = time.process_time() - t0

    t1 = time.process_time()
    # the chain's own refit (nets.head_refit): logits on raw features, in the network's class order
    w, b = fit_linear_head(x, sample.labels, net.classes_, c_reg)
    t_fit = time.process_time() - t1

    out = workdir / "bench" / "head_refit" / model
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(net_dir, out / "model")
    blob = torch.load(out / "model" / "weights.pt", weights_only=True)
    sdict = blob["state_dict"]
    sdict["head.classifier.weight"] = (
        torch.from_numpy(w).to(sdict["head.classifier.weight"].dtype).view_as(sdict["head.classifier.weight"])
    )
    sdict["head.classifier.bias"] = torch.from_numpy(b).to(sdict["head.classifier.bias"].dtype)
    torch.save(blob, out / "model" / "weights.pt")

    tiles = []
    for tile in cfg.tiles:
        args = ["--config", str(run_config)]
        m, conf, met = out / f"{tile}.tif", out / f"{tile}_confidence.tif", out / f"{tile}.json"
        assert landcover([*args, "predict", "--model", classifier, "--tile", tile, "--model-dir",
                          str(out / "model"), "--src", str(lay.gapfilled(tile)), "--out", str(m),
                          "--confidence", str(conf)]) == 0  # fmt: skip
        assert landcover([*args, "validate", "--model", classifier, "--tile", tile, "--map", str(m),
                          "--labels", str(lay.labels(tile)), "--out", str(met)]) == 0  # fmt: skip
        tiles.append(str(met))
    overall = out / "overall.json"
    assert landcover(["--config", str(run_config), "summarise", "--model", classifier, "--out", str(overall),
                      *tiles]) == 0  # fmt: skip

    def scores(path: Path) -> dict:
        d = json.loads(path.read_text())
        f1 = {k: v["f1"] for k, v in d["per_class"].items()}
        return {"kappa": round(d["kappa"], 3), "mean_f1": round(float(np.mean(list(f1.values()))), 3),
                **{k: round(f1[k], 2) for k in ("CUF", "DUF", "ICU")}}  # fmt: skip

    hybrid = Layout.seed_model("fgunet_rf", seed) if seed is not None else "fgunet_rf"
    return {
        "model": model,
        "C": c_reg,
        "sample_pixels": int(sample.labels.size),
        "features": int(x.shape[1]),
        "cpu_s": {"features": round(t_feat, 1), "fit": round(t_fit, 1)},
        "refit_head": scores(overall),
        "network": scores(lay.overall_metrics(model)),
        "hybrid": scores(lay.overall_metrics(hybrid)) if lay.overall_metrics(hybrid).exists() else None,
        "rf": scores(lay.overall_metrics(Layout.seed_model("rf", seed) if seed is not None else "rf")),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("results/paper"))
    ap.add_argument("--model", nargs="+", default=["fgunet", "fgunet-s43", "fgunet-s44"])
    ap.add_argument("-C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    args = ap.parse_args()
    for model in args.model:
        print(json.dumps(refit(args.workdir, model, args.C)), flush=True)


if __name__ == "__main__":
    main()
