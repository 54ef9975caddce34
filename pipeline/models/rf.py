"""Random Forest baseline (Stoian et al. 2019, §4.2): 100 trees, depth 20, no split below 10 samples.

The paper used OpenCV's RF through OTB; scikit-learn's is the same algorithm (bootstrap, sqrt(F)
features per split, Gini). OpenCV's "min sample count" is the smallest node that may still be split,
i.e. sklearn's ``min_samples_split``. Prediction averages tree probabilities (sklearn) where OpenCV
counts hard votes; both pick the same class except on near-ties.

Training is scikit-learn's; the saved ``model.joblib`` is the plain sklearn forest. Prediction runs a
compiled forest (:class:`CompiledForest`, built lazily after fit/load and never pickled): the trees
flattened into one compact node table, traversed by a numba kernel over blocks of pixels, each pixel
summing its trees' leaf probabilities in tree order into a local vector. The result is bit-identical
to sklearn's single-threaded ``predict_proba`` (same float32 split test, same float64 leaf values,
same summation order), whatever the thread count or row windowing; sklearn's own ``n_jobs``
prediction adds tree outputs in completion order and is not reproducible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import joblib
import numba
import numpy as np
from numba import njit, prange
from sklearn.ensemble import RandomForestClassifier

from pipeline.models import derive_seed, register

MODEL_FILE = "model.joblib"
BLOCK = 256  # pixels per kernel task: 256 x 330 float32 = 330 KB of features stay in L2 across the trees


class CompiledForest:
    """A fitted sklearn forest as flat arrays for :func:`_forest_kernel`.

    ``nodes`` (n_nodes, 4) int32, one 16-byte record per node of every tree, trees concatenated:
    ``[feature, threshold, left, right]`` with global child indices. The threshold is stored as the
    largest float32 <= sklearn's float64 threshold, so ``x <= t`` decides exactly as sklearn's
    ``(double) x <= threshold`` for every float32 ``x``. Leaves point to themselves (feature 0), so a
    pixel that reached its leaf stays there while the rest of its block descends; a leaf's threshold
    slot holds the start of its probability entries instead.
    ``entries`` (n_entries, 2) int64: the non-zero class probabilities of each leaf as (float64 bits,
    class index | last-entry flag << 32); adding the zero ones would not change any sum.
    ``missing_left`` (n_nodes,) uint8: sklearn's side for NaN features at each split.
    """

    def __init__(self, forest: RandomForestClassifier) -> None:
        n_classes = len(forest.classes_)
        records, entries, missing, roots, depths = [], [], [], [], []
        n_nodes = n_entries = 0
        for est in forest.estimators_:
            tree = est.tree_
            leaf = tree.children_left == -1
            ids = np.arange(tree.node_count) + n_nodes
            thr = tree.threshold.astype(np.float32)  # rounds to nearest: step down where it went up
            up = thr.astype(np.float64) > tree.threshold
            thr[up] = np.nextafter(thr[up], np.float32(-np.inf))
            rec = np.empty((tree.node_count, 4), np.int32)
            rec[:, 0] = np.where(leaf, 0, tree.feature)
            rec[:, 1] = thr.view(np.int32)
            rec[:, 2] = np.where(leaf, ids, tree.children_left + n_nodes)
            rec[:, 3] = np.where(leaf, ids, tree.children_right + n_nodes)
            value = tree.value[leaf, 0, :n_classes]  # sklearn >= 1.4 stores per-leaf class fractions
            nonzero = value != 0
            count = nonzero.sum(axis=1)
            row, col = np.nonzero(nonzero)
            ends = np.cumsum(count)
            rec[leaf, 1] = n_entries + ends - count
            ent = np.empty((row.size, 2), np.int64)
            ent[:, 0] = value[row, col].view(np.int64)
            ent[:, 1] = col
            ent[ends - 1, 1] |= np.int64(1) << 32
            records.append(rec)
            entries.append(ent)
            missing.append(tree.missing_go_to_left.astype(np.uint8))
            roots.append(n_nodes)
            depths.append(tree.max_depth)
            n_nodes += tree.node_count
            n_entries += row.size
        if n_nodes >= 2**31 or n_entries >= 2**31:
            raise ValueError("forest too large for 32-bit node indices")
        self.nodes = np.concatenate(records)
        self.entries = np.concatenate(entries)
        self.missing_left = np.concatenate(missing)
        self.roots = np.array(roots, np.int32)
        self.depths = np.array(depths, np.int32)
        self.n_classes = n_classes
        self.n_features = int(forest.n_features_in_)

    def run(self, x: np.ndarray, threads: int, proba: bool) -> np.ndarray:
        """(N, F) float32 -> (N, K) float64 mean tree probabilities, or (N,) int64 argmax class index."""
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"X has shape {x.shape}, the forest expects (n, {self.n_features}) features")
        if x.shape[0] == 0:
            raise ValueError("Found array with 0 sample(s) while a minimum of 1 is required")
        n = x.shape[0]
        out = np.empty((n if proba else 0, self.n_classes), np.float64)
        cls = np.empty(0 if proba else n, np.int64)
        nonfinite = np.zeros(-(-n // BLOCK), np.uint8)
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
        ent = self.entries
        _forest_kernel(
            x, self.nodes, self.nodes.view(np.float32), self.missing_left, self.roots, self.depths,
            ent, ent.view(np.float64), out, cls, nonfinite, BLOCK,
        )  # fmt: skip
        if nonfinite.any():  # sklearn's input check: NaN is a missing value, infinity is an error
            raise ValueError("Input X contains infinity or a value too large for dtype('float32').")
        return out if proba else cls


@njit(parallel=True, nogil=True, cache=True)
def _forest_kernel(x, nodes, thr, missing_left, roots, depths, ent, entf, out, cls, nonfinite, block):  # noqa: PLR0913
    """Per block of pixels, tree by tree: descend all pixels level by level (branch-free, the inner
    loop vectorises into gathers) until every pixel is at its leaf, then add the leaf entries to the
    pixel's float64 sums in tree order. Blocks holding NaN take a branchy walk honouring sklearn's
    missing-value side; blocks holding +-inf are flagged for the caller to raise."""
    n, f = x.shape
    n_trees = roots.size
    k = out.shape[1]
    xf = x.ravel()
    nf = nodes.ravel()
    tf = thr.ravel()
    for b in prange((n + block - 1) // block):
        i0 = b * block
        m = min(n, i0 + block) - i0
        has_nan = False
        for v in xf[i0 * f : (i0 + m) * f]:
            if v != v:
                has_nan = True
            elif v - v != 0:
                nonfinite[b] = 1
        acc = np.zeros(m * k)
        cur = np.empty(m, np.uint32)
        base = np.empty(m, np.uintp)
        for g in range(m):
            base[g] = np.uintp((i0 + g) * f)
        for t in range(n_trees):
            root = np.uint32(roots[t] * 4)
            for g in range(m):
                cur[g] = root
            if has_nan:
                for g in range(m):
                    c = np.int64(root) // 4
                    while nodes[c, 2] != c:
                        v = xf[base[g] + np.uintp(nodes[c, 0])]
                        if v != v:
                            c = nodes[c, 2] if missing_left[c] else nodes[c, 3]
                        else:
                            c = nodes[c, 2] if v <= thr[c, 1] else nodes[c, 3]
                    cur[g] = np.uint32(c * 4)
            else:
                for _ in range(depths[t]):
                    moved = np.uint32(0)
                    for g in range(m):
                        c = cur[g]
                        node = np.uintp(c)
                        v = xf[base[g] + np.uintp(nf[node])]
                        right = np.uintp(v > tf[node + np.uintp(1)])
                        nxt = np.uint32(nf[node + np.uintp(2) + right]) * np.uint32(4)
                        moved |= nxt ^ c
                        cur[g] = nxt
                    if moved == 0:
                        break
            for g in range(m):
                j = np.int64(nf[np.uintp(cur[g]) + np.uintp(1)])
                while True:
                    e = ent[j, 1]
                    acc[g * k + (e & 0xFFFFFFFF)] += entf[j, 0]
                    if e >> 32:
                        break
                    j += 1
        if cls.size:
            for g in range(m):
                best = 0
                top = acc[g * k] / n_trees
                for c in range(1, k):
                    p = acc[g * k + c] / n_trees  # compare the divided means, as argmax(predict_proba)
                    if p > top:
                        best, top = c, p
                cls[i0 + g] = best
        else:
            for g in range(m):
                for c in range(k):
                    out[i0 + g, c] = acc[g * k + c] / n_trees


@register("rf")
class RandomForest:
    """sklearn RandomForestClassifier behind the :class:`~pipeline.models.Classifier` protocol."""

    name: ClassVar[str] = "rf"
    pixelwise: ClassVar[bool] = True

    def __init__(
        self,
        n_estimators: int = 100,
        max_depth: int = 20,
        min_samples_split: int = 10,
        n_jobs: int = 1,
        random_state: int = 0,
    ) -> None:
        self.threads = n_jobs
        self._compiled: CompiledForest | None = None
        self.model = RandomForestClassifier(
            n_estimators=n_estimators,
            max_depth=max_depth,
            min_samples_split=min_samples_split,
            max_features="sqrt",
            n_jobs=1,
            random_state=random_state,
        )

    @classmethod
    def from_config(cls, cfg: Any) -> RandomForest:
        rf = cfg["rf"]
        return cls(
            n_estimators=int(rf["n_estimators"]),
            max_depth=int(rf["max_depth"]),
            min_samples_split=int(rf["min_samples_split"]),
            n_jobs=cfg.threads(),
            random_state=derive_seed(cfg.seed, "rf"),
        )

    @property
    def classes_(self) -> np.ndarray:
        return self.model.classes_

    @property
    def compiled(self) -> CompiledForest:
        """The flattened forest, built on first use after fit/load (not saved: the file stays sklearn's)."""
        if getattr(self, "_compiled", None) is None:
            self._compiled = CompiledForest(self.model)
        return self._compiled

    def set_threads(self, n: int) -> None:
        """Threads for predict: the node running inference may differ from the training one."""
        self.threads = max(1, int(n))

    def fit(self, features: np.ndarray, labels: np.ndarray) -> RandomForest:
        # trees are independent: threaded fitting is reproducible (each tree has its own seed)
        self._compiled = None
        self.model.set_params(n_jobs=self.threads)
        try:
            self.model.fit(np.ascontiguousarray(features, dtype=np.float32), labels)
        finally:
            self.model.set_params(n_jobs=1)
        return self

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(features, dtype=np.float32)  # sklearn trees work in float32: no copy
        return self.compiled.run(x, self.threads, proba=True)

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Same classes as ``argmax(predict_proba)``, without materialising the (N, K) probabilities."""
        x = np.ascontiguousarray(features, dtype=np.float32)
        return self.classes_[self.compiled.run(x, self.threads, proba=False)]

    def params(self) -> dict[str, Any]:
        p = self.model.get_params()  # n_jobs is an execution detail, not a model parameter
        keys = ("n_estimators", "max_depth", "min_samples_split", "max_features", "criterion", "bootstrap")
        return {k: p[k] for k in keys} | {"random_state": p["random_state"], "library": "scikit-learn"}

    def save(self, directory: Path) -> None:
        joblib.dump(self.model, Path(directory) / MODEL_FILE, compress=3)

    @classmethod
    def load(cls, directory: Path) -> RandomForest:
        obj = cls.__new__(cls)
        obj.model = joblib.load(Path(directory) / MODEL_FILE)
        obj.threads = 1
        obj._compiled = None
        return obj
