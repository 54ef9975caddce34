"""Which classifier on FG-UNET's frozen features closes the urban gap? Pixel-level scores on every
validation pixel, for heads fitted on the chain's class-balanced training sample (the hybrid's).

``bench/head_refit.py`` found that refitting FG-UNET's last (linear, 1x1) layer as a logistic
regression brings most of the network's urban F-scores up, and that RF on the same features passes
RF on CUF and ICU (docs/networks.md). Left open: is what remains linear against non-linear? This
script fits, on the same frozen penultimate features of the same training pixels, the network's
own head (as trained), the linear refit (``nets.head_refit``), one-hidden-layer MLPs (the
non-linear head a 1x1 hidden layer would add) and a Random Forest (the hybrid's classifier), and
scores each on all validation pixels (the maps' validation pixels; no window overlap or
regularisation, so figures differ slightly from the chain's map-level ones).

    python bench/head_compare.py --workdir results/paper --model fgunet-s44 [--hidden 64 128 256]

Prints one JSON line per head.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import cohen_kappa_score, f1_score

from pipeline.models.pixel import training_sample
from pipeline.nets.features import network_features
from pipeline.nets.headfit import C_REG, fit_linear_head
from pipeline.sampling import balanced_sample

sys.path.insert(0, str(Path(__file__).resolve().parent))
from head_refit import load_network  # noqa: E402

URBAN = ("CUF", "DUF", "ICU")


def scores(
    name: str, y: np.ndarray, p: np.ndarray, codes: list[int], names: dict[int, str], t: float
) -> dict:
    present = [c for c in codes if (y == c).any()]
    f1 = f1_score(y, p, labels=present, average=None, zero_division=0)
    per = {names[c]: round(float(v), 3) for c, v in zip(present, f1, strict=True)}
    out = {
        "head": name,
        "kappa": round(float(cohen_kappa_score(y, p)), 4),
        "oa": round(float((y == p).mean()), 4),
    }
    out |= {
        "mean_f1": round(float(np.mean(f1)), 4),
        **{u: per.get(u) for u in URBAN},
        "fit_cpu_s": round(t, 1),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("results/paper"))
    ap.add_argument("--model", default="fgunet-s44")
    ap.add_argument("--hidden", type=int, nargs="+", default=[64, 128, 256])
    args = ap.parse_args()
    t_net = load_network(args.workdir, args.model)
    cfg, net_dir, net, norm = t_net.cfg, t_net.net_dir, t_net.net, t_net.norm
    gapfilled, labels = t_net.gapfilled, t_net.labels
    margin = net.spec.pool_aligned(net.receptive_radius)
    window = int(cfg["inference"]["window"])
    train, *_ = training_sample(cfg, labels, gapfilled, norm)
    xtr = network_features(net, norm, gapfilled, train, window, margin)
    val = balanced_sample(labels, gapfilled, cfg.class_codes, 10**8, 0, norm, split="validation")
    xva = network_features(net, norm, gapfilled, val, window, margin)
    ytr, yva = train.labels.astype(np.int64), val.labels.astype(np.int64)
    codes = [int(c) for c in net.classes_]
    names = {c.code: c.name for c in cfg.classes}
    print(json.dumps({"model": args.model, "train_pixels": int(ytr.size), "validation_pixels": int(yva.size),
                      "features": int(xtr.shape[1])}), flush=True)  # fmt: skip

    # the network's own head, as trained (the 1x1 classifier on the same features)
    sd = torch.load(net_dir / "weights.pt", weights_only=True)["state_dict"]
    w = sd["head.classifier.weight"].float().numpy().reshape(len(codes), -1)
    b = sd["head.classifier.bias"].float().numpy()
    lut = np.array(codes)
    print(json.dumps(scores("own", yva, lut[np.argmax(xva @ w.T + b, 1)], codes, names, 0.0)), flush=True)

    t0 = time.process_time()
    w, b = fit_linear_head(xtr, ytr, net.classes_, C_REG)
    t = time.process_time() - t0
    print(
        json.dumps(scores("linear refit", yva, lut[np.argmax(xva @ w.T + b, 1)], codes, names, t)), flush=True
    )

    from sklearn.ensemble import RandomForestClassifier
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    for h in args.hidden:
        t0 = time.process_time()
        mlp = make_pipeline(
            StandardScaler(),
            MLPClassifier((h,), alpha=1e-3, early_stopping=True, max_iter=400, random_state=0),
        ).fit(xtr, ytr)
        t = time.process_time() - t0
        print(json.dumps(scores(f"mlp {h}", yva, mlp.predict(xva), codes, names, t)), flush=True)
    t0 = time.process_time()
    rf = RandomForestClassifier(100, n_jobs=-1, random_state=0).fit(xtr, ytr)
    t = time.process_time() - t0
    print(json.dumps(scores("rf (sklearn)", yva, rf.predict(xva), codes, names, t)), flush=True)


if __name__ == "__main__":
    main()
