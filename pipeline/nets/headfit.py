"""``nets.head_refit``: the trained network's linear last layer refitted on a class-balanced pixel sample.

Why: on the demo, FG-UNET's own last layer, trained end to end by SGD on 8 patches per step, left
the urban classes far below RF (CUF F1 0.29 ± 0.22 over 3 seeds), while a logistic regression on the
same frozen features of the RF's balanced pixel sample reached 0.65 ± 0.04 and the run's kappa rose
from 0.847 to 0.863 (docs/networks.md, "Features or classifier?"). The network, its map path, speed
and confidence layer are unchanged; only the weights of its 1x1 classifier are replaced. Not in the
paper: off in the schema's defaults; the demo's ``config.yaml`` turns it on, since it is what makes
the README demo's 100-step FG-UNET pass kappa 0.80 whatever the seed's (or the CPU's) trajectory
(docs/networks.md, "The README demo's recipe").
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Config
from pipeline.io.tilestore import SHARD
from pipeline.models.features import Normalisation
from pipeline.sampling import PixelSample

log = logging.getLogger(__name__)

C_REG = 1.0  # inverse L2 strength (scikit-learn's default), on standardised features
#: Pixels per class the refit uses at most. A linear layer of K x F weights needs far fewer pixels
#: than a forest, and L-BFGS time grows with them: at a national RF sample (30,000 per class, 347k
#: pixels) the refit ran > 11 min on 2 cores where the demo's 2,000 per class take < 1 min
#: (docs/benchmarks/national_cost.md). The RF's own sample is unchanged.
HEAD_PER_CLASS = 5000
ABSENT_LOGIT = -1e4  # a class without sampled pixels: never the argmax, ~0 probability


def fit_linear_head(
    x: np.ndarray, y: np.ndarray, codes: np.ndarray, c_reg: float = C_REG
) -> tuple[np.ndarray, np.ndarray]:
    """(K, F) weights and (K,) biases, in ``codes`` order, of a multinomial logistic regression of
    ``y`` (class codes) on ``x`` (N, F): ``x @ W.T + b`` are its decision values on raw features
    (the standardisation it is fitted with is folded in). Classes absent from ``y`` get
    :data:`ABSENT_LOGIT`."""
    from sklearn.linear_model import LogisticRegression

    mu = x.mean(0, dtype=np.float64)
    sd = x.std(0, dtype=np.float64) + 1e-6
    model = LogisticRegression(C=c_reg, max_iter=2000).fit((x - mu) / sd, y)
    codes = [int(c) for c in codes]
    w = np.zeros((len(codes), x.shape[1]), np.float64)
    b = np.full(len(codes), ABSENT_LOGIT)
    for i, c in enumerate(model.classes_):
        k = codes.index(int(c))
        w[k] = model.coef_[i] / sd
        b[k] = model.intercept_[i] - model.coef_[i] @ (mu / sd)
    return w, b


def capped(sample: PixelSample, per_class: int, seed: int) -> PixelSample:
    """At most ``per_class`` pixels of each class: a seeded draw without replacement, order kept.

    A sample within the cap is returned as it is, so the demo's refit (2,000 per class) is unchanged.
    """
    keep = []
    rng = np.random.default_rng(seed)
    for code in dict.fromkeys(sample.labels.tolist()):  # classes in the sample's (code) order
        at = np.flatnonzero(sample.labels == code)
        keep.append(np.sort(rng.choice(at, per_class, replace=False)) if at.size > per_class else at)
    idx = np.concatenate(keep) if keep else np.empty(0, np.int64)
    if idx.size == sample.labels.size:
        return sample
    counts = {c: min(n, per_class) for c, n in sample.counts.items()}
    return replace(
        sample,
        features=sample.features[idx],
        labels=sample.labels[idx],
        tile=sample.tile[idx],
        row=sample.row[idx],
        col=sample.col[idx],
        counts=counts,
    )


def refit_head(
    cfg: Config,
    name: str,
    net: torch.nn.Module,
    norm: Normalisation,
    indices: tuple[str, ...],
    gapfilled: Mapping[str, Path],
    labels: Mapping[str, Path],
) -> dict[str, Any]:
    """Replace ``net``'s last layer (in place) by :func:`fit_linear_head` on its features of the
    RF's class-balanced training sample (same seed and pixels as ``rf`` and ``fgunet_rf``, at most
    :data:`HEAD_PER_CLASS` of each class); the provenance for ``model.json``."""
    from pipeline.models import get
    from pipeline.models.pixel import training_sample
    from pipeline.nets.features import network_features

    t0 = time.process_time()
    codes = cfg.class_codes
    clf = get(name)(net, codes, indices)  # eval mode, channels-last: the map's arithmetic path
    sample, seed, per_class, _ = training_sample(cfg, labels, gapfilled, norm)
    sample = capped(sample, HEAD_PER_CLASS, seed)
    margin = clf.spec.pool_aligned(clf.receptive_radius)
    # the store's shard grid, not inference.window: that is a mapping setting, and the features
    # (margin >= receptive radius) do not depend on the window, so a new window must not retrain
    x = network_features(clf, norm, gapfilled, sample, SHARD, margin)
    w, b = fit_linear_head(x, sample.labels, codes)
    layer = net.head.classifier
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w).to(layer.weight.dtype).view_as(layer.weight))
        layer.bias.copy_(torch.from_numpy(b).to(layer.bias.dtype))
    cpu = time.process_time() - t0
    log.info("%s: last layer refitted on %d x %d features (%.0f CPU-s)", name, *x.shape, cpu)
    return {
        "method": "multinomial logistic regression, L2, standardised features",
        "C": C_REG,
        "sample_seed": seed,
        "samples_per_class": per_class,
        "refit_per_class_cap": HEAD_PER_CLASS,
        "pixels": int(x.shape[0]),
        "features": int(x.shape[1]),
        "cpu_s": round(cpu, 1),
    }
