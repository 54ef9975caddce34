"""How often do the polygon-bootstrap 95 % intervals hold the true value? Coverage by polygon count.

A population of 30,000 validation-like polygons (3 classes, 5-60 px each, each polygon with its own
accuracy, drawn from Beta(6, 2): a classifier right or wrong by polygon) has known scores. Samples
of n polygons per class are drawn from it, each gets its interval from ``pipeline.bootstrap`` (the
chain's code), and the share of intervals holding the population's kappa and class-0 F-score is the
coverage. A 95 % interval should hold it 95 % of the time; the chain gives none below
``MIN_POLYGONS`` (docs/qa.md).

    python bench/bootstrap_coverage.py --draws 300 --replicates 400
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from pipeline.bootstrap import PolygonTable, batch_scores, interval, replicate_confusions
from pipeline.metrics import scores

K = 3


def table(ids: np.ndarray, ref: np.ndarray, size: np.ndarray, right: np.ndarray) -> PolygonTable:
    """Each polygon: ``right`` pixels mapped as its class, the rest as the next class."""
    return PolygonTable.from_pairs(
        np.concatenate([ids, ids]), np.concatenate([ref, ref]),
        np.concatenate([ref, (ref + 1) % K]), np.concatenate([right, size - right]), K,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=300, help="samples per polygon count")
    ap.add_argument("--replicates", type=int, default=400, help="bootstrap draws per interval")
    ap.add_argument("--counts", type=int, nargs="+", default=[3, 5, 10, 20, 30, 60])
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    n_pop = 30_000
    ref = np.arange(n_pop) % K
    size = rng.integers(5, 60, n_pop)
    right = rng.binomial(size, rng.beta(6, 2, n_pop))
    truth = scores(table(np.arange(1, n_pop + 1), ref, size, right).confusion())
    for n in args.counts:
        hit_f1 = hit_kappa = 0
        for d in range(args.draws):
            pick = np.concatenate([rng.choice(np.flatnonzero(ref == k), n, replace=False) for k in range(K)])
            # the chain's replicates, without its MIN_POLYGONS gate: what the interval would be
            (cms,) = replicate_confusions(
                [table(pick + 1, ref[pick], size[pick], right[pick])], args.replicates, d
            )
            s = batch_scores(cms)
            f1, kappa = interval(s["f1"][:, 0]), interval(s["kappa"])
            assert f1 is not None and kappa is not None
            hit_f1 += f1[0] <= truth["f1"][0] <= f1[1]
            hit_kappa += kappa[0] <= truth["kappa"] <= kappa[1]
        print(json.dumps({"polygons_per_class": n, "draws": args.draws, "coverage_f1": hit_f1 / args.draws,
                          "coverage_kappa": hit_kappa / args.draws}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
