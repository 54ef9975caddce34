"""A Random Forest as flat arrays: grown by an exact CART builder, run by a compiled kernel.

Growing (:func:`grow_forest`) is the classic algorithm of Breiman's RF as in OpenCV (the paper's,
through OTB) and scikit-learn: per tree a bootstrap sample, per node ``max_features`` features drawn
without replacement, the Gini-optimal threshold among **all** distinct values of each (exact, no
binning), depth-first growth until ``max_depth``, a pure node or fewer than ``min_samples_split``
distinct samples. It is faster than sklearn's builder on the same work because each feature is
encoded once as dense ranks of its distinct values: a node then sorts small integers with a radix
sort instead of floats with introsort, and the Gini scan runs on exact integer class counts (bootstrap
multiplicities), so the split found for given data and drawn features is the one sklearn finds
(tested against ``DecisionTreeClassifier`` where no two splits tie). Trees grow in parallel threads
(the builder releases the GIL), each from its own seed: the forest is the same for any thread count.

Prediction (:class:`Forest`) flattens the trees into one 16-byte node table traversed by a numba
kernel over blocks of pixels; each pixel sums its trees' leaf class fractions in tree order, so the
result is bit-identical whatever the thread count or row windowing, and bit-identical to sklearn's
single-threaded ``predict_proba`` for a forest converted with :meth:`Forest.from_sklearn` (the
oracle the tests use). The forest saves to one ``.npz`` of plain arrays: nothing pickled to load.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numba
import numpy as np
from numba import njit, prange

# Pixels per kernel task: each task walks every tree once, so its block should be large enough to
# reuse each tree's nodes (~150 KB for 100 trees of depth 20 on 50,000 samples) across many pixels,
# yet keep the block's features in the last-level cache. ~4 MiB of features measured best
# (docs/benchmarks/rf_and_regularisation.md): 1.4x the former 256-pixel blocks.
BLOCK_BYTES = 4 << 20
MIN_BLOCK, MAX_BLOCK = 256, 8192
FORMAT = 2  # version of the saved array layout (2: 8-byte packed nodes)
LEAF = -1


class Tree(NamedTuple):
    """One tree in node order (root 0). Leaves have ``feature == LEAF`` and children ``-1``.

    ``threshold`` is float32 and decides ``x <= t`` -> left exactly as at training time for every
    float32 ``x``; ``value`` (n_nodes, K) holds the leaf class fractions (rows of split nodes unused);
    ``missing_left``: the side a NaN takes at each split.
    """

    feature: np.ndarray
    threshold: np.ndarray
    left: np.ndarray
    right: np.ndarray
    missing_left: np.ndarray
    value: np.ndarray
    depth: int


class Part(NamedTuple):
    """A compacted tree (:meth:`Forest.compact`): leaf entry starts local until :meth:`Forest.from_parts`."""

    nodes: np.ndarray
    entries: np.ndarray
    leaf: np.ndarray
    missing_left: np.ndarray
    depth: int


FEATURE_BITS = 11  # features per pixel < 2048 (37 dates x 13 channels = 481)
DELTA_BITS = 20  # right child at most 2^20 - 1 records after its parent
FEATURE_MASK = (1 << FEATURE_BITS) - 1


class Forest:
    """Trees flattened for :func:`_forest_kernel`.

    ``nodes`` (n_nodes, 2) int32, one 8-byte record per node, trees concatenated, each tree in
    depth-first order with the left child right after its parent. Word 0: the float32 threshold
    (``x <= t`` goes left), or for a leaf the index of its first probability entry. Word 1 (uint32):
    feature index (bits 0-10) | 1 for a split (bit 11) | distance to the right child (bits 12-31). A
    step is then ``c += right_distance if x > t else split_bit``: leaves step by 0, so a pixel that
    reached its leaf stays there while the rest of its block descends. Half the bytes of explicit
    children: 1.3-1.5x faster prediction, as nodes are what the kernel waits for.
    ``entries`` (n_entries, 2) int64: the non-zero class fractions of each leaf as (float64 bits,
    class index | last-entry flag << 32); adding the zero ones would not change any sum.
    ``missing_left`` (n_nodes,) uint8: the side a NaN feature takes at each split.
    """

    ARRAYS = ("nodes", "entries", "missing_left", "roots", "depths")

    def __init__(self, arrays: dict[str, np.ndarray], n_classes: int, n_features: int) -> None:
        self.nodes = np.ascontiguousarray(arrays["nodes"], np.int32)
        self.entries = np.ascontiguousarray(arrays["entries"], np.int64)
        self.missing_left = np.ascontiguousarray(arrays["missing_left"], np.uint8)
        self.roots = np.ascontiguousarray(arrays["roots"], np.int32)
        self.depths = np.ascontiguousarray(arrays["depths"], np.int32)
        self.n_classes = int(n_classes)
        self.n_features = int(n_features)

    @property
    def n_trees(self) -> int:
        return int(self.roots.size)

    # decoded views of the packed records (global node indices; -1 where a leaf has none)
    @property
    def is_leaf(self) -> np.ndarray:
        return (self.nodes[:, 1].view(np.uint32) >> FEATURE_BITS) & 1 == 0

    @property
    def feature(self) -> np.ndarray:
        return np.where(self.is_leaf, -1, (self.nodes[:, 1].view(np.uint32) & FEATURE_MASK).astype(np.int64))

    @property
    def threshold(self) -> np.ndarray:
        return self.nodes[:, 0].view(np.float32)

    @property
    def left(self) -> np.ndarray:
        return np.where(self.is_leaf, -1, np.arange(len(self.nodes)) + 1)

    @property
    def right(self) -> np.ndarray:
        delta = (self.nodes[:, 1].view(np.uint32) >> (FEATURE_BITS + 1)).astype(np.int64)
        return np.where(self.is_leaf, -1, np.arange(len(self.nodes)) + delta)

    @staticmethod
    def compact(tree: Tree, n_classes: int) -> Part:
        """One tree as packed records and leaf entries (see the class doc)."""
        leaf = tree.feature == LEAF
        count = int(tree.feature.size)
        ids = np.arange(count)
        split = ~leaf
        if np.any(tree.left[split] != ids[split] + 1):
            raise ValueError("trees must be in depth-first order, left child first")
        delta = (tree.right - ids)[split]
        if count and (delta.max(initial=1) >= 1 << DELTA_BITS or tree.feature.max() > FEATURE_MASK):
            raise ValueError(
                f"tree too large for the packed node layout (a right child > {(1 << DELTA_BITS) - 1} "
                f"nodes after its parent, or > {FEATURE_MASK + 1} features): lower rf.max_depth"
            )
        word1 = np.zeros(count, np.uint32)
        word1[split] = (
            tree.feature[split] | (1 << FEATURE_BITS) | (delta.astype(np.uint32) << (FEATURE_BITS + 1))
        )
        rec = np.empty((count, 2), np.int32)
        rec[:, 0] = tree.threshold.astype(np.float32).view(np.int32)
        rec[:, 1] = word1.view(np.int32)
        value = tree.value[leaf, :n_classes]
        nonzero = value != 0
        per_leaf = nonzero.sum(axis=1)
        if np.any(per_leaf == 0):
            raise ValueError("a leaf without any class weight")
        row, col = np.nonzero(nonzero)
        ends = np.cumsum(per_leaf)
        rec[leaf, 0] = ends - per_leaf
        ent = np.empty((row.size, 2), np.int64)
        ent[:, 0] = value[row, col].astype(np.float64).view(np.int64)
        ent[:, 1] = col
        ent[ends - 1, 1] |= np.int64(1) << 32
        return Part(rec, ent, leaf, tree.missing_left.astype(np.uint8), int(tree.depth))

    @classmethod
    def from_parts(cls, parts: list[Part], n_classes: int, n_features: int) -> Forest:
        """Concatenate compacted trees, shifting leaf entry starts to global indices."""
        sizes = [len(p.nodes) for p in parts]
        n_entries = sum(len(p.entries) for p in parts)
        if sum(sizes) >= 2**31 or n_entries >= 2**31:
            raise ValueError("forest too large for 32-bit node indices")
        starts = np.cumsum([0] + [len(p.entries) for p in parts[:-1]])
        nodes = []
        for p, e in zip(parts, starts, strict=True):
            rec = p.nodes.copy()
            rec[p.leaf, 0] += np.int32(e)
            nodes.append(rec)
        arrays = {
            "nodes": np.concatenate(nodes),
            "entries": np.concatenate([p.entries for p in parts]),
            "missing_left": np.concatenate([p.missing_left for p in parts]),
            "roots": np.cumsum([0, *sizes[:-1]]).astype(np.int32),
            "depths": np.array([p.depth for p in parts], np.int32),
        }
        return cls(arrays, n_classes, n_features)

    @classmethod
    def from_sklearn(cls, forest: Any) -> Forest:
        """A fitted ``sklearn.ensemble.RandomForestClassifier`` (the tests' independent oracle)."""
        trees = []
        for est in forest.estimators_:
            t = est.tree_
            thr = _float32_below(t.threshold)
            leaf = t.children_left == -1
            feature = np.where(leaf, LEAF, t.feature).astype(np.int32)
            value = t.value[:, 0, :]  # sklearn >= 1.4 stores per-leaf class fractions
            miss = t.missing_go_to_left
            trees.append(Tree(feature, thr, t.children_left, t.children_right, miss, value, t.max_depth))
        k = len(forest.classes_)
        return cls.from_parts([cls.compact(t, k) for t in trees], k, int(forest.n_features_in_))

    def save(self, path: Path, **extra: np.ndarray) -> None:
        """Plain arrays (``np.load(allow_pickle=False)`` reads them back); ``extra`` rides along."""
        meta = np.array([FORMAT, self.n_classes, self.n_features], np.int64)
        with open(path, "wb") as fh:
            np.savez(fh, meta=meta, **{k: getattr(self, k) for k in self.ARRAYS}, **extra)

    @classmethod
    def load(cls, path: Path) -> tuple[Forest, dict[str, np.ndarray]]:
        """The forest and the extra arrays saved with it; ``ValueError`` names what is wrong."""
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
        missing = [k for k in ("meta", *cls.ARRAYS) if k not in data]
        if missing:
            raise ValueError(f"not a forest file: missing {', '.join(missing)}")
        fmt, n_classes, n_features = (int(v) for v in data.pop("meta"))
        if fmt != FORMAT:
            raise ValueError(f"forest format {fmt}, this version reads {FORMAT}")
        forest = cls({k: data.pop(k) for k in cls.ARRAYS}, n_classes, n_features)
        forest._check()
        return forest, data

    def _check(self) -> None:
        """Indices in range, so a damaged file fails here rather than reading out of bounds."""
        n, e = len(self.nodes), len(self.entries)
        if self.nodes.ndim != 2 or self.nodes.shape[1] != 2 or self.entries.shape[1:] != (2,):
            raise ValueError("forest arrays have the wrong shape")
        bounds = np.append(self.roots, n)
        if self.roots.size == 0 or self.roots[0] != 0 or np.any(np.diff(bounds) <= 0):
            raise ValueError("forest arrays are inconsistent (damaged file?)")
        leaf, right = self.is_leaf, self.right
        tree_end = np.repeat(bounds[1:], np.diff(bounds))  # a tree's nodes end where the next begins
        split = ~leaf
        ok = (
            self.missing_left.size == n
            and np.all(self.nodes[leaf, 1] == 0)
            and np.all((self.nodes[leaf, 0] >= 0) & (self.nodes[leaf, 0] < e))
            and np.all(self.feature[split] < self.n_features)
            and np.all((right[split] > np.arange(n)[split] + 1) & (right[split] < tree_end[split]))
            and np.all((self.entries[:, 1] & 0xFFFFFFFF) < self.n_classes)
            and bool((self.entries[-1, 1] >> 32) == 1 if e else True)
            and self.depths.size == self.roots.size
        )
        if not ok:
            raise ValueError("forest arrays are inconsistent (damaged file?)")
        # The kernel's branch-free walk descends exactly depths[t] levels: a depth below a tree's
        # deepest leaf would leave pixels on a split node and read its threshold as an entry index.
        deepest = _deepest_leaf(self.nodes, self.roots, n)
        if np.any(self.depths < deepest):
            t = int(np.argmax(self.depths < deepest))
            raise ValueError(
                f"forest arrays are inconsistent (damaged file?): tree {t} records depth "
                f"{int(self.depths[t])}, its deepest leaf is at depth {int(deepest[t])}"
            )

    def run(self, x: np.ndarray, threads: int, proba: bool) -> np.ndarray:
        """(N, F) float32 -> (N, K) float64 mean tree probabilities, or (N,) int64 argmax class index."""
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"X has shape {x.shape}, the forest expects (n, {self.n_features}) features")
        if x.shape[0] == 0:
            raise ValueError("Found array with 0 sample(s) while a minimum of 1 is required")
        x = np.ascontiguousarray(x, np.float32)
        n = x.shape[0]
        out = np.empty((n if proba else 0, self.n_classes), np.float64)
        cls = np.empty(0 if proba else n, np.int64)
        block = int(np.clip(BLOCK_BYTES // (4 * self.n_features), MIN_BLOCK, MAX_BLOCK))
        nonfinite = np.zeros(-(-n // block), np.uint8)
        numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
        ent = self.entries
        _forest_kernel(
            x, self.nodes, self.nodes.view(np.float32), self.missing_left, self.roots, self.depths,
            ent, ent.view(np.float64), out, cls, nonfinite, block,
        )  # fmt: skip
        if nonfinite.any():  # sklearn's input check: NaN is a missing value, infinity is an error
            raise ValueError("Input X contains infinity or a value too large for dtype('float32').")
        return out if proba else cls


@njit(cache=True)
def _deepest_leaf(nodes, roots, n):  # pragma: no cover - compiled
    """Per tree, the longest root-to-leaf path among reachable nodes. Children always lie after
    their parent inside the tree (checked before), so one pass in node order settles each depth."""
    depth = np.full(n, -1, np.int64)
    out = np.zeros(roots.size, np.int64)
    for t in range(roots.size):
        end = roots[t + 1] if t + 1 < roots.size else n
        depth[roots[t]] = 0
        for c in range(roots[t], end):
            d = depth[c]
            if d < 0:
                continue  # unreachable: the kernel never lands here
            w = np.uint32(nodes[c, 1])
            if (w >> np.uint32(FEATURE_BITS)) & np.uint32(1) == 0:
                out[t] = max(out[t], d)
                continue
            r = c + np.int64(w >> np.uint32(FEATURE_BITS + 1))
            depth[c + 1] = max(depth[c + 1], d + 1)
            depth[r] = max(depth[r], d + 1)
    return out


def grow_forest(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    n_trees: int,
    max_depth: int,
    min_samples_split: int,
    max_features: int,
    seed: int,
    threads: int = 1,
    progress: Callable[[int], None] | None = None,
    bootstrap: bool = True,
) -> Forest:
    """Fit ``n_trees`` trees on (N, F) float32 ``x`` and class indices ``y`` in ``[0, n_classes)``.

    Tree ``i`` draws its bootstrap and its features from ``SeedSequence(seed).spawn(n_trees)[i]``,
    so the forest depends on the seed only. ``progress(1)`` is called as each tree finishes.
    ``bootstrap=False`` grows every tree on all rows (with ``max_features = F``: sklearn's single
    decision tree, which the tests compare against).
    """
    x = np.ascontiguousarray(x, np.float32)
    y = np.ascontiguousarray(y, np.int32)
    n, f = x.shape
    if n == 0 or y.shape != (n,):
        raise ValueError(f"need one class index per sample, got X {x.shape} and y {y.shape}")
    if not np.isfinite(x).all():
        raise ValueError("training features contain NaN or infinity")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"class indices must lie in [0, {n_classes})")
    if not 1 <= max_features <= f or min_samples_split < 2 or max_depth < 1 or n_trees < 1:
        raise ValueError("invalid forest parameters")
    codes, values, offsets = encode_features(x, threads)
    children = np.random.SeedSequence(seed).spawn(n_trees)

    def one(i: int) -> Part:
        rng = np.random.default_rng(children[i])
        if bootstrap:
            weight = np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        else:
            weight = np.ones(n)
        state = np.array([rng.integers(1, 2**62)], np.uint64)
        feature, lo, hi, left, right, miss, value, depth, count = _grow_tree(
            codes, y, weight, n_classes, max_features, max_depth, min_samples_split, state
        )
        feature, left, right = feature[:count], left[:count], right[:count]
        split = feature >= 0
        fs = feature[split]
        a = values[offsets[fs] + lo[:count][split]].astype(np.float64)
        b = values[offsets[fs] + hi[:count][split]].astype(np.float64)
        threshold = np.zeros(count, np.float32)
        threshold[split] = _midpoint_below(a, b)
        tree = Tree(feature, threshold, left, right, miss[:count], value[:count], int(depth))
        part = Forest.compact(tree, n_classes)
        if progress is not None:
            progress(1)
        return part

    if threads <= 1:
        parts = [one(i) for i in range(n_trees)]
    else:  # the builder releases the GIL: threads grow trees truly in parallel
        with ThreadPoolExecutor(threads) as pool:
            parts = list(pool.map(one, range(n_trees)))
    return Forest.from_parts(parts, n_classes, f)


def _midpoint_below(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sklearn's threshold ``a/2 + b/2`` (float64) as the largest float32 <= it, kept in ``[a, b)``.

    For float32 inputs ``x <= t32`` then decides exactly as ``(double) x <= t``.
    """
    t = _float32_below(a / 2.0 + b / 2.0)
    return np.where(t.astype(np.float64) >= b, a.astype(np.float32), t)


def _float32_below(v: np.ndarray) -> np.ndarray:
    """The largest float32 <= each float64 ``v`` (a cast rounds to nearest: step down where it went up)."""
    t = v.astype(np.float32)
    up = t.astype(np.float64) > v
    t[up] = np.nextafter(t[up], np.float32(-np.inf))
    return t


def encode_features(x: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dense ranks of each feature's distinct values: ``codes`` (F, N) uint32 (feature-major, so a
    node gathers one feature's codes from a compact row), the distinct values ``values`` of feature
    ``f`` at ``offsets[f]:offsets[f + 1]``, ascending. ``code <= c`` <=> ``x <= values[offsets[f] + c]``.
    """
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    codes, distinct, counts = _encode(np.ascontiguousarray(x.T))
    offsets = np.zeros(x.shape[1] + 1, np.int64)
    np.cumsum(counts, out=offsets[1:])
    values = np.concatenate([distinct[j, : counts[j]] for j in range(x.shape[1])])
    return codes, values, offsets


@njit(parallel=True, cache=True)
def _encode(xt):  # pragma: no cover - compiled
    f, n = xt.shape
    codes = np.empty((f, n), np.uint32)
    distinct = np.empty((f, n), np.float32)
    counts = np.empty(f, np.int64)
    for j in prange(f):
        col = xt[j]
        order = np.argsort(col)
        c = -1
        prev = np.float32(0)
        for i in range(n):
            v = col[order[i]]
            if c < 0 or v != prev:
                c += 1
                distinct[j, c] = v
                prev = v
            codes[j, order[i]] = c
        counts[j] = c + 1
    return codes, distinct, counts


@njit(nogil=True, cache=True, inline="always")
def _rand_below(state, bound):  # pragma: no cover - compiled
    """xorshift64* draw in [0, bound): the tree's own stream, independent of any global RNG."""
    s = state[0]
    s ^= s >> np.uint64(12)
    s ^= s << np.uint64(25)
    s ^= s >> np.uint64(27)
    state[0] = s
    return np.int64((s * np.uint64(2685821657736338717)) >> np.uint64(33)) % bound


@njit(nogil=True, cache=True)
def _sort_by_key(keys, idx, keys2, idx2, n, span):  # pragma: no cover - compiled
    """Sort ``keys[:n]`` (values in [0, span]) carrying ``idx``; LSD radix on bytes, insertion sort
    for short runs. Returns True when the result lies in ``keys2``/``idx2`` (odd number of passes)."""
    if n <= 48:
        for i in range(1, n):
            k = keys[i]
            v = idx[i]
            j = i - 1
            while j >= 0 and keys[j] > k:
                keys[j + 1] = keys[j]
                idx[j + 1] = idx[j]
                j -= 1
            keys[j + 1] = k
            idx[j + 1] = v
        return False
    count = np.empty(256, np.int64)
    src_k, src_i, dst_k, dst_i = keys, idx, keys2, idx2
    shift = np.uint32(0)
    swapped = False
    while True:
        count[:] = 0
        for i in range(n):
            count[(src_k[i] >> shift) & np.uint32(255)] += 1
        total = 0
        for d in range(256):
            c = count[d]
            count[d] = total
            total += c
        for i in range(n):
            d = (src_k[i] >> shift) & np.uint32(255)
            p = count[d]
            dst_k[p] = src_k[i]
            dst_i[p] = src_i[i]
            count[d] = p + 1
        src_k, src_i, dst_k, dst_i = dst_k, dst_i, src_k, src_i
        swapped = not swapped
        shift += np.uint32(8)
        if shift >= 32 or (np.uint32(span) >> shift) == 0:
            break
    return swapped


@njit(nogil=True, cache=True)
def _grow_tree(codes, y, w, n_classes, mtry, max_depth, min_split, state):  # noqa: PLR0912, PLR0915  # pragma: no cover
    """Depth-first exact CART on the bootstrap rows (``w > 0``), sklearn's rules: a node splits when
    below ``max_depth``, not pure, and holding >= ``min_split`` distinct rows; features are drawn
    without replacement until ``mtry`` were visited and one of them was not constant; the split
    maximises the Gini proxy sum_k cl_k^2 / wl + sum_k cr_k^2 / wr (first best wins). Returns per node
    feature (-1 leaf), left/right codes of the threshold, children, NaN side, leaf fractions."""
    n_feat, n = codes.shape
    m = 0
    for i in range(n):
        if w[i] > 0:
            m += 1
    samples = np.empty(m, np.int32)
    j = 0
    for i in range(n):
        if w[i] > 0:
            samples[j] = i
            j += 1
    cap = 2 * m + 1
    feature = np.full(cap, -1, np.int32)
    lo = np.zeros(cap, np.uint32)
    hi = np.zeros(cap, np.uint32)
    left = np.full(cap, -1, np.int32)
    right = np.full(cap, -1, np.int32)
    miss = np.zeros(cap, np.uint8)
    value = np.zeros((cap, n_classes), np.float64)
    keys = np.empty(m, np.uint32)
    idx = np.empty(m, np.int32)
    keys2 = np.empty(m, np.uint32)
    idx2 = np.empty(m, np.int32)
    feats = np.arange(n_feat).astype(np.int32)
    total = np.zeros(n_classes)
    cl = np.zeros(n_classes)
    cr = np.zeros(n_classes)
    st_start = np.empty(cap, np.int64)
    st_end = np.empty(cap, np.int64)
    st_depth = np.empty(cap, np.int64)
    st_parent = np.empty(cap, np.int64)
    st_left = np.empty(cap, np.uint8)
    sp = 1
    st_start[0], st_end[0], st_depth[0], st_parent[0], st_left[0] = 0, m, 0, -1, 0
    count = 0
    tree_depth = 0
    eps = np.finfo(np.float64).eps
    while sp > 0:
        sp -= 1
        start, end, depth, parent = st_start[sp], st_end[sp], st_depth[sp], st_parent[sp]
        node = count
        count += 1
        if parent >= 0:
            if st_left[sp]:
                left[parent] = node
            else:
                right[parent] = node
        if depth > tree_depth:
            tree_depth = depth
        total[:] = 0.0
        for i in range(start, end):
            s = samples[i]
            total[y[s]] += w[s]
        wt = 0.0
        sq = 0.0
        for k in range(n_classes):
            wt += total[k]
            sq += total[k] * total[k]
        size = end - start
        is_leaf = depth >= max_depth or size < min_split or size < 2 or 1.0 - sq / (wt * wt) <= eps
        best = -np.inf
        best_f = -1
        best_lo = np.uint32(0)
        best_hi = np.uint32(0)
        best_pos = 0
        if not is_leaf:
            f_i = n_feat
            visited = 0
            found = 0
            while f_i > 0 and (visited < mtry or found == 0):
                visited += 1
                r = _rand_below(state, f_i)
                f_i -= 1
                f = feats[r]
                feats[r] = feats[f_i]
                feats[f_i] = f
                row = codes[f]
                kmin = np.uint32(0xFFFFFFFF)
                kmax = np.uint32(0)
                for i in range(size):
                    s = samples[start + i]
                    k = row[s]
                    keys[i] = k
                    idx[i] = s
                    kmin = min(kmin, k)
                    kmax = max(kmax, k)
                if kmin == kmax:
                    continue
                found += 1
                for i in range(size):
                    keys[i] -= kmin
                if _sort_by_key(keys, idx, keys2, idx2, size, kmax - kmin):
                    sk, si = keys2, idx2
                else:
                    sk, si = keys, idx
                cl[:] = 0.0
                cr[:] = total
                sq_l = 0.0
                sq_r = sq
                wl = 0.0
                wr = wt
                for i in range(size - 1):
                    s = si[i]
                    k = y[s]
                    ww = w[s]
                    sq_l += ww * (2.0 * cl[k] + ww)
                    cl[k] += ww
                    sq_r -= ww * (2.0 * cr[k] - ww)
                    cr[k] -= ww
                    wl += ww
                    wr -= ww
                    if sk[i + 1] != sk[i]:
                        proxy = sq_l / wl + sq_r / wr
                        if proxy > best:
                            best = proxy
                            best_f = f
                            best_lo = sk[i] + kmin
                            best_hi = sk[i + 1] + kmin
                            best_pos = i + 1
            if best_f < 0:
                is_leaf = True
        if is_leaf:
            for k in range(n_classes):
                value[node, k] = total[k] / wt
            continue
        feature[node] = best_f
        lo[node] = best_lo
        hi[node] = best_hi
        miss[node] = 1 if best_pos > size - best_pos else 0
        row = codes[best_f]
        a = start
        b = 0
        for i in range(start, end):  # stable partition: left rows in place, right rows buffered
            s = samples[i]
            if row[s] <= best_lo:
                samples[a] = s
                a += 1
            else:
                idx2[b] = s
                b += 1
        for i in range(b):
            samples[a + i] = idx2[i]
        st_start[sp], st_end[sp], st_depth[sp], st_parent[sp], st_left[sp] = a, end, depth + 1, node, 0
        sp += 1
        st_start[sp], st_end[sp], st_depth[sp], st_parent[sp], st_left[sp] = start, a, depth + 1, node, 1
        sp += 1
    return feature, lo, hi, left, right, miss, value, tree_depth, count


@njit(parallel=True, nogil=True, cache=True)
def _forest_kernel(x, nodes, thr, missing_left, roots, depths, ent, entf, out, cls, nonfinite, block):  # noqa: PLR0913  # pragma: no cover
    """Per block of pixels, tree by tree: descend all pixels level by level (branch-free) until every
    pixel is at its leaf, then add the leaf entries to the pixel's float64 sums in tree order. Blocks
    holding NaN take a branchy walk honouring the missing-value side; blocks holding +-inf are
    flagged for the caller to raise."""
    n, f = x.shape
    n_trees = roots.size
    k = out.shape[1]
    xf = x.ravel()
    words = nodes.ravel()
    tf = thr.ravel()
    fmask = np.uint32(FEATURE_MASK)
    fbits = np.uint32(FEATURE_BITS)
    dbits = np.uint32(FEATURE_BITS + 1)
    one = np.uint32(1)
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
            root = np.uint32(roots[t])
            for g in range(m):
                cur[g] = root
            if has_nan:
                for g in range(m):
                    c = root
                    while True:
                        w = np.uint32(words[np.uintp(c) * np.uintp(2) + np.uintp(1)])
                        if (w >> fbits) & one == 0:
                            break
                        v = xf[base[g] + np.uintp(w & fmask)]
                        go_right = missing_left[c] == 0 if v != v else v > tf[np.uintp(c) * np.uintp(2)]
                        c += (w >> dbits) if go_right else one
                    cur[g] = c
            else:
                for _ in range(depths[t]):
                    moved = np.uint32(0)
                    for g in range(m):
                        c = cur[g]
                        w = np.uint32(words[np.uintp(c) * np.uintp(2) + np.uintp(1)])
                        v = xf[base[g] + np.uintp(w & fmask)]
                        step = (w >> dbits) if v > tf[np.uintp(c) * np.uintp(2)] else ((w >> fbits) & one)
                        moved |= step
                        cur[g] = c + step
                    if moved == 0:
                        break
            for g in range(m):
                j = np.int64(words[np.uintp(cur[g]) * np.uintp(2)])
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
