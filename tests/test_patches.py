"""Training patches: valid positions vs a brute-force oracle, streamed indexing, class-first sampling,
patch reads, eq.-2 inputs with spectral indices, and D4 augmentation alignment."""

from __future__ import annotations

import logging
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.io.tilestore import add_array, create_store
from pipeline.models.features import NODATA, Normalisation
from pipeline.nets import patches
from pipeline.nets.patches import (
    ClassFirstSampler,
    PatchIndex,
    PatchRef,
    augment,
    channels_per_date,
    index_tile,
    min_pixels,
    patch_inputs,
    patch_positions,
    random_augment,
    read_patches,
)
from tests.conftest import make_grid

CODES = (1, 2, 3, 5)


# --------------------------------------------------------------------------- helpers


def oracle(labels, size, stride, frac, codes, row0=0, col0=0):
    """Brute force: every lattice position of the block, counted pixel by pixel."""
    need = max(1, math.ceil(Fraction(str(frac)) * size * size))
    h, w = labels.shape
    rows, cols, members = [], [], {c: [] for c in codes}
    for r in range(row0, row0 + h - size + 1):
        if r % stride:
            continue
        for c in range(col0, col0 + w - size + 1):
            if c % stride:
                continue
            patch = labels[r - row0 : r - row0 + size, c - col0 : c - col0 + size]
            if np.count_nonzero(patch) < need:
                continue
            rows.append(r)
            cols.append(c)
            for code in codes:
                if np.count_nonzero(patch == code) >= need:
                    members[code].append(len(rows) - 1)
    return np.array(rows, int), np.array(cols, int), members


def random_labels(rng, h, w, codes=CODES, n_rect=6, noise=0.12):
    """Sparse labels: a few class rectangles (polygons) plus scattered labelled pixels."""
    lab = np.zeros((h, w), np.uint8)
    for _ in range(n_rect):
        r, c = rng.integers(0, h), rng.integers(0, w)
        lab[r : r + rng.integers(2, 14), c : c + rng.integers(2, 14)] = rng.choice(codes)
    speck = rng.random((h, w)) < noise
    lab[speck] = rng.choice(codes, int(speck.sum()))
    return lab


def assert_same(got, want_rows, want_cols, want_members, codes):
    np.testing.assert_array_equal(got.rows, want_rows)
    np.testing.assert_array_equal(got.cols, want_cols)
    assert got.rows.dtype == got.cols.dtype == np.int32
    for i, code in enumerate(codes):
        np.testing.assert_array_equal(got.members[i], want_members[code], err_msg=f"class {code}")


def write_labels(path: Path, train: np.ndarray, validation: np.ndarray | None = None) -> Path:
    h, w = train.shape
    group = create_store(path, "reference", make_grid(w, h), tile=path.stem)
    add_array(group, "train", (h, w), "uint8", 0)[:] = train
    add_array(group, "validation", (h, w), "uint8", 0)[:] = (
        np.zeros_like(train) if validation is None else validation
    )
    return path


def make_index(tile, size, rows_by_class: dict[int, list[tuple[int, int]]]) -> PatchIndex:
    """A hand-built index: each class's positions given explicitly (disjoint positions per class)."""
    rows, cols, codes, offsets, members = [], [], [], [0], []
    for code in sorted(rows_by_class):
        for r, c in rows_by_class[code]:
            members.append(len(rows))
            rows.append(r)
            cols.append(c)
        codes.append(code)
        offsets.append(len(members))
    return PatchIndex(
        tile,
        size,
        1,
        0.1,
        np.array(rows, np.int32),
        np.array(cols, np.int32),
        np.array(codes, np.uint8),
        np.array(offsets, np.int64),
        np.array(members, np.int64),
        np.full(len(members), size * size, np.int32),  # every member full of its class
    )


# --------------------------------------------------------------------------- patch_positions


@pytest.mark.parametrize(
    ("size", "stride", "frac"),
    [
        (8, 1, 0.1),
        (8, 3, 0.1),
        (5, 2, 0.25),
        (16, 4, 0.1),
        (7, 7, 0.3),
        (1, 1, 1.0),
        (12, 8, 0.1),
        (6, 3, 0.2),
    ],
)
def test_patch_positions_matches_oracle(size, stride, frac):
    rng = np.random.default_rng(size * 100 + stride)
    for trial in range(3):
        lab = random_labels(rng, 37 + trial * 11, 45)
        got = patch_positions(lab, size, stride, frac, CODES)
        assert_same(got, *oracle(lab, size, stride, frac, CODES), CODES)


@pytest.mark.parametrize(("r0", "c0", "stride"), [(36, 12, 4), (12, 36, 3), (7, 5, 3), (30, 30, 1)])
def test_patch_positions_of_a_block_uses_the_absolute_lattice(r0, c0, stride):
    """A piece of a larger raster (offsets off the 32-px block grid, on or off the lattice)."""
    rng = np.random.default_rng(r0 + c0)
    whole = random_labels(rng, 100, 90, n_rect=12)
    size, h, w = 8, 41, 37
    block = whole[r0 : r0 + h, c0 : c0 + w]
    got = patch_positions(block, size, stride, 0.1, CODES, row0=r0, col0=c0)
    rows, cols, members = oracle(whole, size, stride, 0.1, CODES)
    inside = (rows >= r0) & (rows + size <= r0 + h) & (cols >= c0) & (cols + size <= c0 + w)
    keep = np.flatnonzero(inside)
    rank = np.full(rows.size, -1)
    rank[keep] = np.arange(keep.size)
    want = {c: rank[[m for m in members[c] if inside[m]]] for c in CODES}
    assert keep.size > 0
    assert_same(got, rows[keep], cols[keep], want, CODES)
    assert (got.rows % stride == 0).all() and (got.cols % stride == 0).all()


@pytest.mark.parametrize(
    ("size", "frac", "need"), [(10, 0.1, 10), (8, 0.1, 7), (30, 0.1, 90), (64, 0.1, 410)]
)
def test_threshold_boundary(size, frac, need):
    """Exactly ceil(frac * N * N) labelled pixels is valid, one fewer is not (float noise included)."""
    assert patches.min_pixels(size, frac) == need
    rng = np.random.default_rng(size)
    where = rng.permutation(size * size)
    for n, valid in ((need, True), (need - 1, False)):
        lab = np.zeros(size * size, np.uint8)
        lab[where[:n]] = 3
        got = patch_positions(lab.reshape(size, size), size, 1, frac, CODES)
        assert (got.rows.size == 1) is valid
        assert (got.members[CODES.index(3)].size == 1) is valid
    # enough labelled pixels overall but no class reaches the threshold: valid, listed for no class
    lab = np.zeros(size * size, np.uint8)
    lab[where[:need]] = np.where(np.arange(need) % 2, 1, 2)
    got = patch_positions(lab.reshape(size, size), size, 1, frac, CODES)
    assert got.rows.size == 1 and all(m.size == 0 for m in got.members)


def test_patch_positions_edge_cases():
    lab = np.zeros((5, 5), np.uint8)
    lab[:] = 1
    assert patch_positions(lab, 8, 1, 0.1, CODES).rows.size == 0  # block smaller than a patch
    assert patch_positions(np.zeros((20, 20), np.uint8), 8, 1, 0.1, CODES).rows.size == 0
    with pytest.raises(ValueError, match="min_fraction"):
        patch_positions(lab, 2, 1, 0.0, CODES)
    with pytest.raises(ValueError, match="1..65535"):
        patch_positions(lab, 2, 1, 0.1, [0, 1])


# --------------------------------------------------------------------------- index_tile


@pytest.mark.parametrize(("block", "height"), [(48, 200), (512, 600)])
def test_index_tile_streams_and_equals_whole_array(tmp_path, monkeypatch, block, height):
    rng = np.random.default_rng(block)
    lab = random_labels(rng, height, 70, n_rect=40, noise=0.05)
    store = write_labels(tmp_path / "T31TCJ.zarr", lab, validation=random_labels(rng, height, 70))
    size, stride = 16, 5
    shapes = []
    real = patches.patch_positions

    def spy(block_labels, *args, **kw):
        shapes.append(block_labels.shape)
        return real(block_labels, *args, **kw)

    monkeypatch.setattr(patches, "patch_positions", spy)
    out = tmp_path / "patches" / "T31TCJ.npz"
    index = index_tile(store, "T31TCJ", out, size, stride, 0.1, CODES, block=block)
    assert len(shapes) > 1 and max(s[0] for s in shapes) <= block + size - 1  # never the whole tile
    whole = real(lab, size, stride, 0.1, CODES)
    np.testing.assert_array_equal(index.rows, whole.rows)
    np.testing.assert_array_equal(index.cols, whole.cols)
    assert index.class_codes.tolist() == [c for c, m in zip(CODES, whole.members, strict=True) if m.size]
    for code, m in zip(CODES, whole.members, strict=True):
        r, c = index.positions_of(code)
        np.testing.assert_array_equal(r, whole.rows[m])
        np.testing.assert_array_equal(c, whole.cols[m])
    assert (index.rows + size <= height).all() and (index.cols + size <= 70).all()
    loaded = PatchIndex.load(out)
    np.testing.assert_array_equal(loaded.class_members, index.class_members)
    assert (loaded.tile, loaded.size, loaded.stride) == ("T31TCJ", size, stride)


def test_index_tile_split_and_unknown_codes(tmp_path):
    train = np.zeros((40, 40), np.uint8)
    val = np.zeros((40, 40), np.uint8)
    val[:20, :20] = 2
    store = write_labels(tmp_path / "T.zarr", train, val)
    index = index_tile(store, "T", tmp_path / "v.npz", 8, 4, 0.1, CODES, split="validation")
    assert index.class_codes.tolist() == [2] and index.n_positions > 0
    train[5, 5] = 9
    bad = write_labels(tmp_path / "B.zarr", train)
    with pytest.raises(PipelineError, match=r"B\.zarr.*\[9\]"):
        index_tile(bad, "B", tmp_path / "b.npz", 8, 4, 0.1, CODES)


def test_index_tile_without_positions_warns_and_saves_empty(tmp_path, caplog):
    lab = np.zeros((70, 60), np.uint8)
    lab[10, 10] = 1  # one labelled pixel: below 10 % of any 8x8 patch
    store = write_labels(tmp_path / "T31TDJ.zarr", lab)
    out = tmp_path / "T31TDJ.npz"
    with caplog.at_level(logging.WARNING, logger="pipeline.nets.patches"):
        index = index_tile(store, "T31TDJ", out, 8, 2, 0.1, CODES)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "T31TDJ" in caplog.records[0].getMessage() and "still mapped" in caplog.records[0].getMessage()
    assert index.n_positions == 0
    loaded = PatchIndex.load(out)
    assert loaded.n_positions == 0 and loaded.class_codes.size == 0
    assert loaded.class_offsets.tolist() == [0]
    assert loaded.positions_of(1)[0].size == 0
    with pytest.raises(PipelineError, match="no tile"):
        ClassFirstSampler([loaded])


# --------------------------------------------------------------------------- PatchIndex persistence


def test_patch_index_round_trip_and_corrupt_files(tmp_path):
    index = make_index("T1", 64, {3: [(0, 8), (16, 24)], 7: [(40, 0)]})
    path = tmp_path / "idx" / "T1.npz"
    index.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["T1.npz"]  # no temporary left behind
    back = PatchIndex.load(path)
    assert (back.tile, back.size, back.stride, back.min_fraction) == ("T1", 64, 1, 0.1)
    for name in ("rows", "cols", "class_codes", "class_offsets", "class_members"):
        np.testing.assert_array_equal(getattr(back, name), getattr(index, name))
        assert getattr(back, name).dtype == getattr(index, name).dtype
    assert back.counts() == {3: 2, 7: 1}
    np.testing.assert_array_equal(back.positions_of(3)[0], [0, 16])

    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(PipelineError, match=r"corrupt\.npz.*not a readable patch index") as err:
        PatchIndex.load(corrupt)
    assert "\n" not in str(err.value)
    with pytest.raises(PipelineError, match=r"missing\.npz.*not found"):
        PatchIndex.load(tmp_path / "missing.npz")
    inconsistent = tmp_path / "inconsistent.npz"
    bad = PatchIndex(**{**index.__dict__, "class_members": np.array([0, 1, 99], np.int64)})
    bad.save(inconsistent)
    with pytest.raises(PipelineError, match=r"inconsistent\.npz.*corrupt patch index"):
        PatchIndex.load(inconsistent)
    # an index of an older version (no per-class pixel counts) names the stage to rerun
    old = tmp_path / "old.npz"
    with open(old, "wb") as f:
        np.savez(f, **{k: v for k, v in np.load(path).items() if k != "class_pixels"})
    with pytest.raises(PipelineError, match=r"old\.npz.*older version.*forcerun patches"):
        PatchIndex.load(old)


# --------------------------------------------------------------------------- sampler


def binomial_ok(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_sampler_class_first_frequencies():
    """1000 positions of class 1 vs 3 of classes 2 and 3: each class still drawn ~1/3 of the time."""
    big = [(r, c) for r in range(0, 200, 8) for c in range(0, 320, 8)][:1000]
    a = make_index("A", 8, {1: big, 2: [(500, 0), (500, 8), (500, 16)]})
    b = make_index("B", 8, {2: [(0, 0), (0, 8), (0, 16)], 3: [(8, 0), (8, 8), (8, 16)]})
    sampler = ClassFirstSampler([a, b])
    assert sampler.classes.tolist() == [1, 2, 3]
    assert sampler.counts == {1: 1000, 2: 6, 3: 3}
    n = 20000
    refs = sampler.draw(n, np.random.default_rng(0))
    assert len(refs) == n and all(isinstance(r, PatchRef) for r in refs)
    codes = np.array([r.code for r in refs])
    for k in (1, 2, 3):
        assert binomial_ok(int((codes == k).sum()), n, 1 / 3), (k, int((codes == k).sum()))
    # a class is only drawn where it exists, and at one of its own positions
    own = {
        (ix.tile, k): set(zip(*map(np.ndarray.tolist, ix.positions_of(k)), strict=True))
        for ix in (a, b)
        for k in (1, 2, 3)
    }
    assert all((r.row, r.col) in own[(r.tile, r.code)] for r in refs)
    assert {r.tile for r in refs if r.code == 1} == {"A"} and {r.tile for r in refs if r.code == 3} == {"B"}
    # class 2 pools its 6 positions over both tiles: each drawn ~1/6 of class-2 draws
    two = [(r.tile, r.row, r.col) for r in refs if r.code == 2]
    for pos in set(two):
        assert binomial_ok(two.count(pos), len(two), 1 / 6)
    assert len(set(two)) == 6


def test_sampler_determinism_and_class_restriction(caplog):
    a = make_index("A", 8, {1: [(0, 0), (8, 8)], 2: [(16, 16)]})
    b = make_index("B", 8, {3: [(0, 0)]})
    s = ClassFirstSampler([a, b])
    assert s.draw(50, np.random.default_rng(3)) == s.draw(50, np.random.default_rng(3))
    assert s.draw(50, np.random.default_rng(3)) != s.draw(50, np.random.default_rng(4))
    assert s.draw(0, np.random.default_rng(3)) == []
    with caplog.at_level(logging.WARNING, logger="pipeline.nets.patches"):
        only = ClassFirstSampler([a, b], codes=[2, 3, 99])
    assert only.classes.tolist() == [2, 3] and "99" in caplog.text
    assert {r.code for r in only.draw(200, np.random.default_rng(0))} == {2, 3}
    with pytest.raises(ValueError, match="patch sizes"):
        ClassFirstSampler([a, make_index("C", 16, {1: [(0, 0)]})])


def test_sampler_draws_hold_the_drawn_class(tmp_path):
    """Indexed from real label rasters: every draw's patch holds >= 10 % pixels of the drawn class."""
    size, stride, frac = 8, 2, 0.1
    need = patches.min_pixels(size, frac)
    ta = np.zeros((64, 72), np.uint8)
    ta[:40] = 1
    ta[50:53, 10:13] = 2  # 9-px blob: only a few patches hold >= 7 of its pixels
    tb = np.zeros((56, 64), np.uint8)
    tb[20:24, 20:24] = 2
    tb[45:48, 45:48] = 3
    tb[0, 0:3] = 5  # too small for any patch
    labels = {"TA": ta, "TB": tb}
    indices = [
        index_tile(
            write_labels(tmp_path / f"{t}.zarr", lab), t, tmp_path / f"{t}.npz", size, stride, frac, CODES
        )
        for t, lab in labels.items()
    ]
    sampler = ClassFirstSampler([PatchIndex.load(tmp_path / f"{t}.npz") for t in labels])
    assert sampler.classes.tolist() == [1, 2, 3]
    assert indices[0].class_codes.tolist() == [1, 2] and indices[1].class_codes.tolist() == [2, 3]
    refs = sampler.draw(3000, np.random.default_rng(11))
    for ref in refs:
        patch = labels[ref.tile][ref.row : ref.row + size, ref.col : ref.col + size]
        assert patch.shape == (size, size) and ref.row % stride == 0 and ref.col % stride == 0
        assert np.count_nonzero(patch == ref.code) >= need, ref
    assert {(r.tile, r.code) for r in refs} == {("TA", 1), ("TA", 2), ("TB", 2), ("TB", 3)}


# --------------------------------------------------------------------------- read_patches


def test_read_patches_returns_exact_slices(tmp_path):
    rng = np.random.default_rng(5)
    t, c, h, w = 2, 3, 150, 140
    cube = rng.integers(-500, 12000, (t, c, h, w)).astype(np.int16)
    lab = rng.integers(0, 6, (h, w)).astype(np.uint8)
    group = create_store(tmp_path / "g.zarr", "gapfilled", make_grid(w, h))
    refl = add_array(group, "reflectance", (t, c, h, w), "int16", NODATA)
    refl[:] = cube
    labels = add_array(group, "train", (h, w), "uint8", 0)
    labels[:] = lab
    for size, spots in ((16, [(0, 0), (56, 60), (h - 16, w - 16), (5, 70)]), (64, [(30, 40), (64, 64)])):
        refs = [PatchRef("T", r, q, 1) for r, q in spots]
        x, y = read_patches(refl, labels, refs, size)
        assert x.shape == (len(refs), t, c, size, size) and x.dtype == np.int16
        assert y.shape == (len(refs), size, size) and y.dtype == np.uint8
        for i, (r, q) in enumerate(spots):
            np.testing.assert_array_equal(x[i], cube[:, :, r : r + size, q : q + size])
            np.testing.assert_array_equal(y[i], lab[r : r + size, q : q + size])
    with pytest.raises(ValueError, match="outside"):
        read_patches(refl, labels, [PatchRef("T", h - 10, 0, 1)], 16)
    x, y = read_patches(refl, labels, [], 16)
    assert x.shape == (0, t, c, 16, 16) and y.shape == (0, 16, 16)


# --------------------------------------------------------------------------- patch_inputs

BANDS = ("B2", "B3", "B4", "B8")
DATES = ("2018-01-05", "2018-01-25")


def make_norm(bands=BANDS, low=None, high=None) -> Normalisation:
    k = len(bands) * len(DATES)
    low = np.zeros(k) if low is None else low
    high = np.full(k, 4000.0) if high is None else high
    return Normalisation(tuple(bands), DATES, np.asarray(low, float), np.asarray(high, float), 3.0, 97.0)


def test_patch_inputs_one_pixel_by_hand():
    raw = np.full((2, 4, 1, 1), NODATA, np.int16)  # date 1 is no-data
    raw[0, :, 0, 0] = [400, 1000, 500, 3000]  # B2, B3, B4, B8
    out = patch_inputs(raw, make_norm(), ["ndvi", "ndwi", "brightness"])
    assert out.shape == (14, 1, 1) and out.dtype == np.float32
    bands0 = [0.1, 0.25, 0.125, 0.75]
    ndvi = ((3000 - 500) / (3000 + 500) + 1) / 2  # 0.857142...
    ndwi = ((1000 - 3000) / (1000 + 3000) + 1) / 2  # 0.25
    np.testing.assert_allclose(out[:, 0, 0], [*bands0, ndvi, ndwi, np.mean(bands0), *[0.0] * 7], rtol=1e-6)
    # indices follow the requested order, after the bands of their date
    out = patch_inputs(raw, make_norm(), ["brightness", "ndvi"])
    np.testing.assert_allclose(out[:6, 0, 0], [*bands0, np.mean(bands0), ndvi], rtol=1e-6)
    assert channels_per_date(BANDS, ["brightness", "ndvi"]) == 6 and channels_per_date(BANDS, []) == 4


def test_patch_inputs_zero_denominator_and_out_of_range_ratio():
    raw = np.zeros((2, 4, 1, 3), np.int16)
    raw[:, :, 0, 0] = 0  # B4 + B8 = 0 and B3 + B8 = 0
    raw[:, 2, 0, 1], raw[:, 3, 0, 1] = 100, -100  # B4 = -B8: denominator 0
    raw[:, 2, 0, 2], raw[:, 3, 0, 2] = -50, 100  # ratio 3 -> clipped to 1
    out = patch_inputs(raw, make_norm(), ["ndvi"]).reshape(2, 5, 3)
    np.testing.assert_array_equal(out[:, 4], [[0, 0, 1], [0, 0, 1]])


def test_patch_inputs_batch_layout_matches_normalise_cube():
    rng = np.random.default_rng(2)
    t, c = len(DATES), len(BANDS)
    raw = rng.integers(-300, 9000, (3, t, c, 5, 6)).astype(np.int16)
    raw[1, 0, :, 2, 3] = NODATA  # one pixel without data at date 0
    low = rng.uniform(0, 1000, t * c)
    norm = make_norm(low=low, high=low + rng.uniform(1000, 5000, t * c))
    names = ["ndvi", "ndwi", "brightness"]
    out = patch_inputs(raw, norm, names)
    assert out.shape == (3, t * (c + 3), 5, 6) and out.dtype == np.float32 and out.flags.c_contiguous
    assert out.min() >= 0 and out.max() <= 1
    ref = norm.percentiles.normalise_cube(raw)  # (3, T*C, 5, 6)
    per_date = out.reshape(3, t, c + 3, 5, 6)
    for d in range(t):
        np.testing.assert_array_equal(per_date[:, d, :c], ref[:, d * c : (d + 1) * c])
        b = {name: raw[:, d, i].astype(np.float64) for i, name in enumerate(BANDS)}
        for j, (p, q) in enumerate((("B8", "B4"), ("B3", "B8"))):
            want = np.clip(((b[p] - b[q]) / (b[p] + b[q]) + 1) / 2, 0, 1)
            want[(raw[:, d] == NODATA).any(axis=1)] = 0
            np.testing.assert_allclose(per_date[:, d, c + j], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(per_date[:, d, c + 2], ref[:, d * c : (d + 1) * c].mean(axis=1), rtol=1e-6)
    assert (per_date[1, 0, :, 2, 3] == 0).all()  # no-data pixel: bands and indices all 0
    np.testing.assert_array_equal(patch_inputs(raw, norm, []), ref)


def test_patch_inputs_rejects_unknown_indices_and_missing_bands():
    raw = np.zeros((2, 4, 1, 1), np.int16)
    with pytest.raises(ValueError, match="evi"):
        patch_inputs(raw, make_norm(), ["ndvi", "evi"])
    with pytest.raises(ValueError, match="B8"):
        patch_inputs(np.zeros((2, 3, 1, 1), np.int16), make_norm(("B2", "B3", "B4")), ["ndwi"])
    with pytest.raises(ValueError, match="B8"):
        channels_per_date(("B2", "B3", "B4"), ["ndvi"])
    with pytest.raises(ValueError):
        patch_inputs(np.zeros((2, 3, 1, 1), np.int16), make_norm(), [])  # wrong band count


# --------------------------------------------------------------------------- augmentation


def coordinate_patch(n: int = 20):
    """Image channel 0 encodes each pixel's own position; labels hold the same pattern mod 251."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 1000, (2, 3, n, n)).astype(np.int32)
    x[0, 0] = np.arange(n * n).reshape(n, n)
    y = (np.arange(n * n).reshape(n, n) % 251).astype(np.uint8)
    return x, y


def d4_oracle(a, k):
    a = np.rot90(a, k % 4, axes=(-2, -1))
    return np.flip(a, -1) if k >= 4 else a


def test_augment_keeps_image_and_labels_aligned():
    x, y = coordinate_patch()
    seen = set()
    for k in range(8):
        xa, ya = augment(x, y, k)
        np.testing.assert_array_equal(xa, d4_oracle(x, k))
        np.testing.assert_array_equal(ya, d4_oracle(y, k))
        np.testing.assert_array_equal(ya, (xa[0, 0] % 251).astype(np.uint8))  # pixel by pixel
        assert xa.flags.c_contiguous and ya.flags.c_contiguous
        assert not np.shares_memory(xa, x) and not np.shares_memory(ya, y)
        seen.add(xa[0, 0].tobytes())
    assert len(seen) == 8
    xa, ya = augment(x, y, 0)
    np.testing.assert_array_equal(xa, x)
    np.testing.assert_array_equal(ya, y)
    # the seed's transforms are among them: 90/180/270 rotations, horizontal and vertical mirrors
    for want in (*(np.rot90(x[0, 0], r) for r in (1, 2, 3)), x[0, 0, :, ::-1], x[0, 0, ::-1, :]):
        assert want.tobytes() in seen
    with pytest.raises(ValueError):
        augment(x, y, 8)


def test_random_augment_per_patch():
    x1, y1 = coordinate_patch(12)
    x = np.stack([x1 + i for i in range(6)])  # (6, 2, 3, 12, 12)
    y = np.stack([y1] * 6)
    xo, yo = random_augment(x, y, np.random.default_rng(9))
    ks = np.random.default_rng(9).integers(0, 8, size=6)
    for i, k in enumerate(ks):
        xa, ya = augment(x[i], y[i], int(k))
        np.testing.assert_array_equal(xo[i], xa)
        np.testing.assert_array_equal(yo[i], ya)
        np.testing.assert_array_equal(yo[i], ((xo[i, 0, 0] - i) % 251).astype(np.uint8))
    with pytest.raises(ValueError):
        random_augment(x, y[:3], np.random.default_rng(0))


# --------------------------------------------------------------------- sparse labels: relaxed thresholds


def brute_counts(labels, size, stride, code, row0=0):
    """Pixels of ``code`` at every lattice position, counted patch by patch: {(row, col): n}."""
    h, w = labels.shape
    return {
        (r, c): int(np.count_nonzero(labels[r - row0 : r - row0 + size, c : c + size] == code))
        for r in range(row0, row0 + h - size + 1)
        if r % stride == 0
        for c in range(0, w - size + 1)
        if c % stride == 0
    }


def brute_threshold(counts, need, k):
    """min(need, the k-th largest positive count), at least 1 (the relaxed rule, by sorting)."""
    positive = sorted((n for n in counts if n > 0), reverse=True)
    return min(need, positive[k - 1]) if len(positive) >= k else 1


@pytest.mark.parametrize(("size", "stride", "k"), [(16, 4, 5), (12, 3, 20), (16, 8, 1)])
def test_relaxed_index_matches_brute_force(tmp_path, size, stride, k):
    """Each class is listed where it holds >= min(10 %, its k-th best count) pixels; the counts kept
    are the true ones; every position of the paper's rule is still there."""
    rng = np.random.default_rng(size + k)
    lab = random_labels(rng, 90, 70, n_rect=8, noise=0.01)
    lab[40:43, 30:33] = 5  # one small object: no patch holds 10 % of class 5
    lab[lab == 5] = 0
    lab[40:43, 30:33] = 5
    store = write_labels(tmp_path / "T31TCJ.zarr", lab)
    need = min_pixels(size, 0.1)
    index = index_tile(
        store, "T31TCJ", tmp_path / "i.npz", size, stride, 0.1, CODES, block=24, min_positions=k
    )
    strict = patch_positions(lab, size, stride, 0.1, CODES)
    listed = set(zip(index.rows.tolist(), index.cols.tolist(), strict=True))
    assert set(zip(strict.rows.tolist(), strict.cols.tolist(), strict=True)) <= listed
    assert len(listed) == index.n_positions  # each position once
    for code in CODES:
        counts = brute_counts(lab, size, stride, code)
        thr = brute_threshold(counts.values(), need, k)
        want = {p: n for p, n in counts.items() if n >= thr and n > 0}
        r, c = index.positions_of(code)
        got = dict(zip(zip(r.tolist(), c.tolist(), strict=True), index.pixels_of(code).tolist(), strict=True))
        assert got == want, f"class {code}"
    assert index.counts()[5] > 0 and max(index.pixels_of(5)) == 9 < need  # drawable now, at 9 px


def test_sampler_pools_the_relaxed_threshold_over_tiles(tmp_path):
    """The run-wide threshold comes from the positions of all tiles together, and min_positions=0
    keeps the seed's rule (a class below it is never drawn)."""
    rng = np.random.default_rng(3)
    tiles = {}
    for name in ("T31TCJ", "T31TDJ"):
        lab = random_labels(rng, 64, 64, n_rect=5, noise=0.01)
        lab[lab == 3] = 0
        r, c = rng.integers(0, 56, 2)
        lab[r : r + 3, c : c + 4] = 3  # class 3: one 12-px object per tile
        tiles[name] = lab
    size, stride, k = 16, 4, 30
    need = min_pixels(size, 0.1)
    stores = {t: write_labels(tmp_path / f"{t}.zarr", lab) for t, lab in tiles.items()}
    indices = [
        index_tile(store, t, tmp_path / f"{t}.npz", size, stride, 0.1, CODES, min_positions=k)
        for t, store in stores.items()
    ]
    sampler = ClassFirstSampler(indices, CODES, need=need, min_positions=k)
    for code in CODES:
        pooled = [n for lab in tiles.values() for n in brute_counts(lab, size, stride, code).values()]
        thr = brute_threshold(pooled, need, k)
        if any(n >= thr for n in pooled if n > 0):
            assert sampler.thresholds[code] == thr, code
            assert sampler.counts[code] == sum(1 for n in pooled if n >= thr and n > 0)
    assert sampler.thresholds[3] <= 12 < need
    refs = sampler.draw(400, np.random.default_rng(0))
    for ref in refs:
        lab = tiles[ref.tile]
        got = np.count_nonzero(lab[ref.row : ref.row + size, ref.col : ref.col + size] == ref.code)
        assert got >= sampler.thresholds[ref.code]
    assert 3 in {r.code for r in refs}
    strict = ClassFirstSampler(indices, CODES, need=need, min_positions=0)
    assert 3 not in strict.classes.tolist() and 3 in strict.missing


@pytest.mark.parametrize(
    ("h", "w", "remedy"), [(40, 28, "set nets.patch_size to at most 24"), (6, 90, "rf only")]
)
def test_a_tile_smaller_than_a_patch_names_both_sizes_and_the_remedy(tmp_path, h, w, remedy):
    from pipeline.config import load_config
    from tests.conftest import REPO

    cfg = load_config(REPO / "config.yaml")  # nets.patch_size 64 (the demo's)
    size = cfg["nets"]["patch_size"]
    labels = write_labels(tmp_path / "T31TCJ.zarr", np.full((h, w), cfg.class_codes[0], np.uint8))
    out = tmp_path / "T31TCJ.train.npz"
    with pytest.raises(
        PipelineError, match=rf"tile T31TCJ is {w}x{h} px, smaller than nets.patch_size {size}: .*{remedy}"
    ):
        patches.index_patches(cfg, "T31TCJ", labels, out)
    assert not out.exists()
