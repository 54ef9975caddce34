"""95 % intervals of the validation scores, by resampling the validation polygons (cluster bootstrap).

Why polygons, not pixels: the pixels of one reference polygon are one field, one stand, one town
block; a classifier gets them right or wrong together. A pixel-level interval would treat a block
of 300 pixels as 300 independent draws and come out far too narrow. On the README demo, the urban
classes have 2-6 validation polygons: whether FG-UNET "beats RF on CUF" is decided by a handful of
blocks, too few for any interval (docs/validation.md).

The validation stage keeps, per validation polygon, how many of its pixels each class was mapped
as (:class:`PolygonTable`). A replicate draws, within each reference class, as many polygons as it
has, with replacement (stratified: the class's share of polygons stays fixed), and sums their rows
into a confusion matrix. Classifiers compared on one run share the replicates (the same draws of
the same polygons), so the interval of a difference is that of paired scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import sparse

CHUNK = 64  # replicates per matrix product: bounds memory at national polygon counts
MIN_POLYGONS = 10  # fewer validation polygons: no interval (95 % intervals cover 80-90 %: docs/validation.md)


@dataclass(frozen=True)
class PolygonTable:
    """Per validation polygon: its reference class and its pixels per mapped class.

    ``ids`` are the polygons' rows in the run's ``split.gpkg`` (unique across tiles; a polygon on two
    tiles is one cluster), ``ref`` their class index, ``counts`` (P, K) sparse pixel counts."""

    ids: np.ndarray
    ref: np.ndarray
    counts: sparse.csr_matrix

    @classmethod
    def from_pairs(cls, ids: Any, ref: Any, pred: Any, n: Any, k: int) -> PolygonTable:
        """Aggregate (polygon, reference class, mapped class, pixels) rows; repeated pairs add up."""
        ids, ref = np.asarray(ids, np.int64), np.asarray(ref, np.int64)
        pred, n = np.asarray(pred, np.int64), np.asarray(n, np.int64)
        uniq, row = np.unique(ids, return_inverse=True)
        refs = np.full(len(uniq), -1, np.int64)
        refs[row] = ref
        if len(uniq) and (refs[row] != ref).any():
            bad = int(ids[np.flatnonzero(refs[row] != ref)[0]])
            raise ValueError(f"validation polygon {bad} has two reference classes")
        counts = sparse.csr_matrix((n, (row, pred)), shape=(len(uniq), k), dtype=np.int64)
        counts.sum_duplicates()
        return cls(uniq, refs, counts)

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> PolygonTable | None:
        """From a metrics document's ``polygon_confusion`` (None when it has none: an older run)."""
        p = doc.get("polygon_confusion")
        if p is None:
            return None
        return cls.from_pairs(p["id"], p["ref"], p["pred"], p["n"], len(doc["codes"]))

    @classmethod
    def merge(cls, tables: Sequence[PolygonTable]) -> PolygonTable:
        k = tables[0].counts.shape[1]
        parts = [t.to_pairs() for t in tables]
        return cls.from_pairs(*(np.concatenate([p[i] for p in parts]) for i in range(4)), k=k)

    def to_pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        coo = self.counts.tocoo()
        return self.ids[coo.row], self.ref[coo.row], coo.col.astype(np.int64), coo.data.astype(np.int64)

    def to_doc(self) -> dict[str, list[int]]:
        ids, ref, pred, n = self.to_pairs()
        return {"id": ids.tolist(), "ref": ref.tolist(), "pred": pred.tolist(), "n": n.tolist()}

    def confusion(self) -> np.ndarray:
        """The confusion matrix (rows = reference) the table sums to."""
        k = self.counts.shape[1]
        rows = sparse.csr_matrix(
            (np.ones(len(self.ref)), (self.ref, np.arange(len(self.ref)))), (k, len(self.ref))
        )
        return np.asarray((rows @ self.counts).todense()).round().astype(np.int64)

    def polygons_per_class(self) -> np.ndarray:
        return np.bincount(self.ref, minlength=self.counts.shape[1])


def replicate_confusions(tables: Sequence[PolygonTable], n_boot: int, seed: int) -> list[np.ndarray]:
    """(n_boot, K, K) confusion matrices per table, from the SAME stratified draws of polygons.

    The tables may list different polygons (a polygon with no mapped pixel in one map is absent
    from its table): the draws are over the union, and a polygon absent from a table adds nothing
    to that table's matrices, as in its full-sample matrix."""
    k = tables[0].counts.shape[1]
    ids = np.unique(np.concatenate([t.ids for t in tables]))
    ref = np.full(len(ids), -1, np.int64)
    aligned = []
    for t in tables:
        pos = np.searchsorted(ids, t.ids)
        if ((ref[pos] >= 0) & (ref[pos] != t.ref)).any():
            raise ValueError("the tables disagree on a validation polygon's reference class")
        ref[pos] = t.ref
        remap = sparse.csr_matrix((np.ones(len(pos)), (pos, np.arange(len(pos)))), (len(ids), len(pos)))
        aligned.append((remap @ t.counts).tocsr())
    rng = np.random.default_rng(seed)
    out = [np.zeros((n_boot, k, k), np.int64) for _ in tables]
    for c in range(k):
        members = np.flatnonzero(ref == c)
        if not len(members):
            continue
        sub = [a[members] for a in aligned]
        for start in range(0, n_boot, CHUNK):
            b = min(CHUNK, n_boot - start)
            w = rng.multinomial(len(members), np.full(len(members), 1.0 / len(members)), size=b)
            for o, s in zip(out, sub, strict=True):
                o[start : start + b, c, :] = np.asarray((s.T @ w.T).T).round().astype(np.int64)
    return out


def batch_scores(cms: np.ndarray) -> dict[str, np.ndarray]:
    """OA (B,), kappa (B,) and per-class F1 (B, K) of a stack of confusion matrices, as
    :func:`pipeline.metrics.scores` computes them one by one (F1 0 for a class never right)."""
    cms = np.asarray(cms, np.float64)
    n = cms.sum((1, 2))
    diag = np.diagonal(cms, axis1=1, axis2=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        oa = diag.sum(1) / n
        expected = (cms.sum(1) * cms.sum(2)).sum(1) / n**2
        kappa = np.where(expected < 1, (oa - expected) / (1 - expected), 1.0)
        p = np.nan_to_num(diag / cms.sum(1))
        r = np.nan_to_num(diag / cms.sum(2))
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return {"oa": oa, "kappa": kappa, "f1": f1}


def interval(v: np.ndarray) -> list[float] | None:
    v = v[np.isfinite(v)]
    return None if not len(v) else [round(float(x), 4) for x in np.percentile(v, [2.5, 97.5])]


def score_intervals(table: PolygonTable, n_boot: int, seed: int) -> dict[str, Any]:
    """95 % percentile intervals of OA, kappa and each class's F1 (None where the class has fewer
    than :data:`MIN_POLYGONS` validation polygons), with the polygon counts they rest on."""
    (cms,) = replicate_confusions([table], n_boot, seed)
    s = batch_scores(cms)
    per = table.polygons_per_class()
    return {
        "method": "stratified polygon bootstrap, percentile",
        "replicates": n_boot,
        "seed": seed,
        "oa": interval(s["oa"]) if per.sum() >= MIN_POLYGONS else None,
        "kappa": interval(s["kappa"]) if per.sum() >= MIN_POLYGONS else None,
        "f1": [interval(s["f1"][:, i]) if per[i] >= MIN_POLYGONS else None for i in range(len(per))],
        "polygons": per.tolist(),
    }


def paired_differences(a: PolygonTable, b: PolygonTable, n_boot: int, seed: int) -> dict[str, Any]:
    """95 % intervals of ``a - b`` (kappa and per-class F1) over shared draws of the polygons."""
    ca, cb = replicate_confusions([a, b], n_boot, seed)
    sa, sb = batch_scores(ca), batch_scores(cb)
    both = np.unique(np.concatenate([np.stack([a.ids, a.ref], 1), np.stack([b.ids, b.ref], 1)]), axis=0)
    per = np.bincount(both[:, 1], minlength=a.counts.shape[1])
    return {
        "kappa": interval(sa["kappa"] - sb["kappa"]) if per.sum() >= MIN_POLYGONS else None,
        "f1": [
            interval(sa["f1"][:, i] - sb["f1"][:, i]) if per[i] >= MIN_POLYGONS else None
            for i in range(len(per))
        ],
        "polygons": per.tolist(),
    }
