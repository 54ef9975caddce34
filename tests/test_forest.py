"""The exact CART builder and the compiled forest, against scikit-learn as the independent oracle.

Split by split: with all features tried and no bootstrap, a tree must make sklearn's decision tree's
splits; where the two differ, both splits must have the same Gini proxy (a tie, broken by feature
order). Forests: same accuracy as sklearn's RF on the same data; the compiled kernel reproduces
sklearn's ``predict_proba`` bit for bit on a converted sklearn forest.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.tree import DecisionTreeClassifier

from pipeline.errors import PipelineError
from pipeline.models import get
from pipeline.models.forest import Forest, Tree, encode_features, grow_forest

K = 5


def noisy(n: int, f: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.random((n, f), dtype=np.float32)
    y = (rng.integers(0, K, n) + 2 * (x[:, 0] > 0.5) + (x[:, 3] > 0.7)) % K
    return x, y.astype(np.int32)


class _Wrap:
    """A single sklearn tree seen as a one-tree forest, for :meth:`Forest.from_sklearn`."""

    def __init__(self, tree: DecisionTreeClassifier) -> None:
        self.estimators_, self.classes_, self.n_features_in_ = [tree], tree.classes_, tree.n_features_in_


def proxy(x: np.ndarray, y: np.ndarray, rows: np.ndarray, feat: int, thr: float) -> float:
    """Gini proxy sum cl^2/nl + sum cr^2/nr of a split (larger is better), computed from scratch."""
    left = x[rows, feat] <= thr
    cl = np.bincount(y[rows[left]], minlength=K).astype(float)
    cr = np.bincount(y[rows[~left]], minlength=K).astype(float)
    return (cl**2).sum() / cl.sum() + (cr**2).sum() / cr.sum()


@pytest.mark.parametrize("depth", [1, 3, 6])
def test_shallow_tree_is_sklearns(depth):
    x, y = noisy(5000, 12)
    ours = grow_forest(x, y, K, 1, depth, 10, 12, seed=1, bootstrap=False)
    ref = Forest.from_sklearn(_Wrap(DecisionTreeClassifier(max_depth=depth, min_samples_split=10).fit(x, y)))
    assert len(ours.nodes) == len(ref.nodes)
    xt = np.random.default_rng(9).random((20_000, 12), dtype=np.float32)
    np.testing.assert_array_equal(ours.run(xt, 1, True), ref.run(xt, 1, True))


def test_deep_tree_differs_from_sklearns_only_at_ties():
    x, y = noisy(3000, 8, seed=2)
    forest = grow_forest(x, y, K, 1, 20, 10, 8, seed=3, bootstrap=False)
    sk = DecisionTreeClassifier(max_depth=20, min_samples_split=10, random_state=0).fit(x, y).tree_
    feat, thr, left, right = forest.feature, forest.threshold, forest.left, forest.right
    same = ties = 0
    stack = [(0, 0, np.arange(len(y)))]
    while stack:
        a, b, rows = stack.pop()
        ours_leaf, sk_leaf = feat[a] < 0, sk.children_left[b] == -1
        assert ours_leaf == sk_leaf, f"leaf in one tree only, at a node of {rows.size} rows"
        if ours_leaf:
            continue
        fa, ta, fb, tb = feat[a], thr[a], sk.feature[b], sk.threshold[b]
        go_left = x[rows, fa] <= ta
        if fa != fb or not np.array_equal(go_left, x[rows, fb] <= tb):
            assert proxy(x, y, rows, fa, ta) == pytest.approx(proxy(x, y, rows, fb, tb), rel=1e-12)
            ties += 1
            continue
        same += 1
        stack += [
            (left[a], sk.children_left[b], rows[go_left]),
            (right[a], sk.children_right[b], rows[~go_left]),
        ]
    assert same > 100 and ties > 0  # deep enough to meet ties, and the walk compared real splits


def test_hand_computed_split_and_thresholds():
    """One feature, classes change between 2 and 3: threshold at the midpoint, ties go left."""
    x = np.array([[1], [2], [2], [3], [4], [4]], np.float32)
    y = np.array([0, 0, 0, 1, 1, 1], np.int32)
    forest = grow_forest(x, y, 2, 1, 5, 2, 1, seed=0, bootstrap=False)
    assert len(forest.nodes) == 3
    assert forest.feature[0] == 0 and forest.threshold[0] == np.float32(2.5)
    proba = forest.run(np.array([[2.5], [2.5000002], [-7], [np.nan]], np.float32), 1, True)
    np.testing.assert_array_equal(
        proba, [[1, 0], [0, 1], [1, 0], [0, 1]]
    )  # NaN: the larger side (3 v 3: right)
    # min_samples_split larger than the node: a single leaf with the class fractions
    stump = grow_forest(x, y, 2, 1, 5, 7, 1, seed=0, bootstrap=False)
    np.testing.assert_array_equal(stump.run(x[:1], 1, True), [[0.5, 0.5]])


def test_threshold_is_exact_between_adjacent_float32():
    lo = np.float32(0.3)
    hi = np.nextafter(lo, np.float32(1))  # no float32 strictly between the two
    x = np.array([[lo]] * 5 + [[hi]] * 5, np.float32)
    y = np.repeat([0, 1], 5).astype(np.int32)
    forest = grow_forest(x, y, 2, 1, 3, 2, 1, seed=0, bootstrap=False)
    np.testing.assert_array_equal(forest.run(np.array([[lo], [hi]]), 1, False), [0, 1])


def test_tree_rules_depth_and_min_split():
    x, y = noisy(4000, 10, seed=4)
    forest = grow_forest(x, y, K, 3, 7, 40, 3, seed=5)
    assert forest.depths.max() == 7
    # route the training rows: every split node holds >= 40 distinct rows of its tree's bootstrap
    children = np.random.SeedSequence(5).spawn(3)
    for t, root in enumerate(forest.roots):
        rng = np.random.default_rng(children[t])
        rows = np.unique(rng.integers(0, len(y), len(y)))  # the same bootstrap draw as the builder
        stack = [(int(root), rows, 0)]
        while stack:
            c, r, d = stack.pop()
            assert d <= 7
            if forest.is_leaf[c]:
                continue
            assert r.size >= 40
            left = x[r, forest.feature[c]] <= forest.threshold[c]
            assert left.any() and (~left).any()
            stack += [(forest.left[c], r[left], d + 1), (forest.right[c], r[~left], d + 1)]


def test_forest_reproducible_and_thread_invariant():
    x, y = noisy(3000, 16, seed=6)
    a = grow_forest(x, y, K, 6, 20, 10, 4, seed=11, threads=1)
    b = grow_forest(x, y, K, 6, 20, 10, 4, seed=11, threads=2)
    c = grow_forest(x, y, K, 6, 20, 10, 4, seed=12, threads=2)
    for name in Forest.ARRAYS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.nodes[:50], c.nodes[:50])


def test_forest_as_accurate_as_sklearns():
    rng = np.random.default_rng(7)
    means = rng.uniform(0.3, 0.7, (8, 40))
    y = np.repeat(np.arange(8), 700)
    x = np.clip(means[y] + rng.normal(0, 0.25, (y.size, 40)), 0, 1).astype(np.float32)
    yt = np.repeat(np.arange(8), 1000)
    xt = np.clip(means[yt] + rng.normal(0, 0.25, (yt.size, 40)), 0, 1).astype(np.float32)
    ours = (grow_forest(x, y, 8, 60, 20, 10, 6, seed=1, threads=2).run(xt, 2, False) == yt).mean()
    sk = RandomForestClassifier(60, max_depth=20, min_samples_split=10, random_state=1, n_jobs=2).fit(x, y)
    ref = (sk.predict(xt) == yt).mean()
    assert ref > 0.5 and abs(ours - ref) < 0.02  # chance is 0.125


def test_quantised_features_encode_exactly():
    """Normalised int16 reflectances repeat: ranks of distinct values, round trip to the values."""
    x = np.array([[0.5, 3], [0.25, 3], [0.5, 1], [1.0, 2]], np.float32)
    codes, values, offsets = encode_features(x)
    np.testing.assert_array_equal(codes, [[1, 0, 1, 2], [2, 2, 0, 1]])
    np.testing.assert_array_equal(offsets, [0, 3, 6])
    np.testing.assert_array_equal(values, [0.25, 0.5, 1.0, 1, 2, 3])


def test_compiled_forest_matches_sklearn():
    """The kernel gives sklearn's probabilities (bit-identical) and classes, NaN included."""
    rng = np.random.default_rng(5)
    x = rng.random((3000, 24), dtype=np.float32)
    x[:, :4] = np.round(x[:, :4], 2)  # repeated values: test pixels fall exactly on split thresholds
    y = rng.integers(0, 6, 3000) + 10 * (x[:, 4] > 0.5)
    x[rng.random(x.shape) < 0.002] = np.nan  # sklearn learns a side for missing values
    sk = RandomForestClassifier(25, max_depth=20, min_samples_split=10, random_state=3).fit(x, y)
    forest = Forest.from_sklearn(sk)
    xt = rng.random((20_000, 24), dtype=np.float32)
    xt[:, :4] = np.round(xt[:, :4], 2)
    xt[:5000:97, 7] = np.nan
    ref = sk.predict_proba(xt)
    proba = forest.run(xt, 2, True)
    np.testing.assert_array_equal(proba, ref)  # same float32 test, float64 leaves and summation order
    classes = forest.run(xt, 2, False)
    np.testing.assert_array_equal(classes, np.argmax(proba, axis=1))
    differ = sk.classes_[classes] != sk.predict(xt)
    top2 = np.sort(ref[differ], axis=1)[:, -2:]
    assert differ.mean() <= 1e-4 and np.all(top2[:, 1] - top2[:, 0] < 1e-6)  # only near-ties
    np.testing.assert_array_equal(
        forest.run(xt[123:9000], 1, True), proba[123:9000]
    )  # thread/window invariant
    with pytest.raises(ValueError, match="infinity"):
        forest.run(np.full((3, 24), np.inf, np.float32), 1, True)
    with pytest.raises(ValueError, match="features"):
        forest.run(xt[:, :5], 1, False)


def test_bad_training_input():
    x, y = noisy(100, 4)
    x[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity"):
        grow_forest(x, y, K, 1, 5, 2, 2, seed=0)
    with pytest.raises(ValueError, match=r"class indices must lie in \[0, 2\)"):
        grow_forest(np.zeros((4, 1), np.float32), np.array([0, 1, 2, 0]), 2, 1, 5, 2, 1, seed=0)


def test_model_file_round_trip_and_damage(tmp_path):
    x, y = noisy(2000, 9, seed=8)
    rf = get("rf")(n_estimators=5, random_state=4).fit(x, y + 10)
    rf.save(tmp_path)
    back = get("rf").load(tmp_path)
    np.testing.assert_array_equal(back.classes_, np.arange(10, 10 + K))
    np.testing.assert_array_equal(back.predict_proba(x), rf.predict_proba(x))
    assert back.params() == rf.params()
    arrays = dict(np.load(tmp_path / "forest.npz"))
    arrays["nodes"][5, 1] = -1  # a split to feature 2047 with its right child far out of range
    np.savez(tmp_path / "forest.npz", **arrays)
    with pytest.raises(
        PipelineError, match=r"forest.npz: not a readable forest \(forest arrays are inconsistent"
    ):
        get("rf").load(tmp_path)
    (tmp_path / "forest.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(PipelineError, match="forest.npz: not a readable forest"):
        get("rf").load(tmp_path)
    with pytest.raises(PipelineError, match="model file not found"):
        get("rf").load(tmp_path / "nowhere")


def _chain_tree(right1: int) -> Tree:
    """9 nodes, depth 3 (0 -> 4 -> 6 -> 7); ``right1`` re-points node 1's right child."""
    split = {0: 4, 1: right1, 4: 6, 6: 8}
    feature = np.array([0 if i in split else -1 for i in range(9)])
    left = np.array([i + 1 if i in split else -1 for i in range(9)])
    right = np.array([split.get(i, -1) for i in range(9)])
    value = np.zeros((9, 2))
    value[feature < 0, 0] = 1
    thr = np.arange(9, dtype=np.float32)
    return Tree(feature, thr, left, right, np.zeros(9, np.uint8), value, 3)


@pytest.mark.parametrize("damage", ["depth lowered", "child re-pointed", "negative depth"])
def test_inconsistent_depths_are_refused_not_a_crash(tmp_path, damage):
    """Every index in range, but the kernel's fixed-depth walk would stop on a split node and read
    its threshold as a leaf entry index (a segmentation fault before the load check knew depths)."""
    good = Forest.from_parts([Forest.compact(_chain_tree(3), 2)], 2, 1)
    path = tmp_path / "forest.npz"
    good.save(path)
    Forest.load(path)  # the intact tree loads
    if damage == "child re-pointed":  # 0 -> 1 -> 4 -> 6 -> 7: depth 4, the file still says 3
        bad = Forest.from_parts([Forest.compact(_chain_tree(4), 2)], 2, 1)
    else:
        bad = Forest(dict(good.__dict__.items()), 2, 1)
        bad.depths = good.depths - (1 if damage == "depth lowered" else 4)
    bad.save(path)
    with pytest.raises(ValueError, match=r"inconsistent \(damaged file\?\): tree 0 records depth"):
        Forest.load(path)
    x, y = noisy(500, 6, seed=3)  # the same damage in a real model, through the model's loader
    rf = get("rf")(n_estimators=3, random_state=1).fit(x, y)
    rf.save(tmp_path)
    arrays = dict(np.load(tmp_path / "forest.npz"))
    arrays["depths"] = arrays["depths"] - 1
    np.savez(tmp_path / "forest.npz", **arrays)
    with pytest.raises(
        PipelineError, match=r"forest.npz: not a readable forest \(forest arrays are inconsistent"
    ):
        get("rf").load(tmp_path)


def test_packed_layout_limits_are_errors():
    """A split whose right child lies >= 2^20 records away, or a feature index >= 2048, cannot be packed."""
    value = np.array([[0, 0], [1, 0], [0, 1]], np.float64)
    far = Tree(np.array([0, -1, -1]), np.zeros(3, np.float32), np.array([1, -1, -1]),
               np.array([1 << 20, -1, -1]), np.zeros(3, np.uint8), value, 1)  # fmt: skip
    with pytest.raises(ValueError, match="too large for the packed node layout"):
        Forest.compact(far, 2)
    wide = far._replace(feature=np.array([2048, -1, -1]), right=np.array([2, -1, -1]))
    with pytest.raises(ValueError, match="too large for the packed node layout"):
        Forest.compact(wide, 2)
    ok = Forest.from_parts([Forest.compact(wide._replace(feature=np.array([2047, -1, -1])), 2)], 2, 2048)
    np.testing.assert_array_equal(ok.right, [2, -1, -1])
    np.testing.assert_array_equal(ok.feature, [2047, -1, -1])
