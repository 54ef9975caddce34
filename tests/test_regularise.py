"""Majority regularisation: hand-computed cases, a naive per-pixel oracle, and OTB itself when installed."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import rasterio
from affine import Affine

from pipeline.io.tilestore import iter_windows, padded, win_slices
from pipeline.regularise import ball, majority

OTB = shutil.which("otbcli_ClassificationMapRegularization")


def naive(labels: np.ndarray, radius: int, nodata: int = 0, undecided: int | None = None) -> np.ndarray:
    """Per-pixel transcription of OTB's documented rule (histogram over the ball, nodata not voted)."""
    h, w = labels.shape
    fp = ball(radius)
    out = labels.copy()
    for i in range(h):
        for j in range(w):
            if labels[i, j] == nodata:
                continue
            counts: dict[int, int] = {}
            for dy in range(-radius, radius + 1):
                for dx in range(-radius, radius + 1):
                    y, x = i + dy, j + dx
                    if fp[dy + radius, dx + radius] and 0 <= y < h and 0 <= x < w and labels[y, x] != nodata:
                        counts[int(labels[y, x])] = counts.get(int(labels[y, x]), 0) + 1
            top = sorted(counts.values(), reverse=True)
            if len(top) > 1 and top[0] == top[1]:
                out[i, j] = labels[i, j] if undecided is None else undecided
            else:
                out[i, j] = max(counts, key=counts.get)
    return out


def test_ball_shapes():
    """ITK BinaryBallStructuringElement: radius 1 is the full 3x3 square, radius 2 drops the corners."""
    assert ball(1).all() and ball(1).shape == (3, 3)
    expected2 = np.array(
        [
            [0, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1],
            [0, 1, 1, 1, 0],
        ],
        bool,
    )
    np.testing.assert_array_equal(ball(2), expected2)
    assert ball(3).sum() == 37 and not ball(3)[0, 1] and ball(3)[0, 2]


def test_hand_computed_radius_1():
    a = np.array(
        [
            [1, 1, 2, 2],
            [1, 2, 2, 3],
            [0, 3, 3, 3],
            [0, 3, 1, 1],
        ],
        np.uint8,
    )
    # Worked by hand, 3x3 ball, 0 = nodata (kept, never voted), outside the image not voted:
    # (0,0): {1:3, 2:1} -> 1          (0,1): {1:3, 2:3} tie -> keeps 1   (0,2): {1:1,2:4,3:1} -> 2
    # (0,3): {2:3, 3:1} -> 2          (1,0): {1:3, 2:1, 3:1} -> 1        (1,1): {1:3,2:3,3:2} tie -> keeps 2
    # (1,2): {1:1,2:4,3:4} tie -> 2   (1,3): {2:3, 3:3} tie -> keeps 3   (2,0): nodata -> 0
    # (2,1): {1:2,2:2,3:4} -> 3       (2,2): {1:2,2:3,3:4} -> 3          (2,3): {1:2,2:1,3:3} -> 3
    # (3,0): nodata -> 0              (3,1): {3:3, 1:1} -> 3             (3,2): {3:4, 1:2} -> 3
    # (3,3): {3:2, 1:2} tie -> keeps 1
    expected = np.array(
        [
            [1, 1, 2, 2],
            [1, 2, 2, 3],
            [0, 3, 3, 3],
            [0, 3, 3, 1],
        ],
        np.uint8,
    )
    np.testing.assert_array_equal(majority(a, 1), expected)
    # suvbool=true: ties become the undecided label
    und = expected.copy()
    for yx in [(0, 1), (1, 1), (1, 2), (1, 3), (3, 3)]:
        und[yx] = 9
    np.testing.assert_array_equal(majority(a, 1, undecided=9), und)
    # another nodata label: 0 votes now, 3 is kept and does not vote
    b = majority(a, 1, nodata=3)
    assert (b[a == 3] == 3).all()
    assert b[2, 0] == 0  # {1:1, 2:1, 0:2} with 3 not voting -> 0
    assert b[3, 3] == 1  # {1:2} only -> 1


def test_radius_0_and_uniform():
    a = np.random.default_rng(0).integers(0, 4, (20, 30)).astype(np.uint8)
    np.testing.assert_array_equal(majority(a, 0), a)
    np.testing.assert_array_equal(majority(np.full((5, 5), 7, np.uint8), 2), np.full((5, 5), 7))
    np.testing.assert_array_equal(majority(np.zeros((4, 4), np.uint8), 1), np.zeros((4, 4)))


@pytest.mark.parametrize("radius", [1, 2, 3])
@pytest.mark.parametrize("undecided", [None, 200])
def test_matches_naive_oracle(radius, undecided):
    rng = np.random.default_rng(radius)
    a = rng.integers(0, 4, (37, 45)).astype(np.uint8)  # few classes: many ties
    a[rng.random(a.shape) < 0.1] = 0
    np.testing.assert_array_equal(majority(a, radius, undecided=undecided), naive(a, radius, 0, undecided))


def test_uint16_labels_and_threads():
    rng = np.random.default_rng(5)
    a = rng.choice(np.array([0, 300, 301, 1000], np.uint16), (600, 70))
    one = majority(a, 2)
    assert one.dtype == np.uint16
    np.testing.assert_array_equal(one, majority(a, 2, threads=2))  # strips of 256 rows across threads
    np.testing.assert_array_equal(one[:200, :50], naive(a[:202, :52], 2)[:200, :50])


@pytest.mark.parametrize("radius", [1, 2])
def test_windowed_with_halo_equals_whole(radius):
    a = np.random.default_rng(3).integers(0, 5, (150, 170)).astype(np.uint8)
    whole = majority(a, radius)
    out = np.zeros_like(a)
    for win in iter_windows(*a.shape, 64):
        big, inner = padded(win, radius, *a.shape)
        out[win_slices(win)] = majority(a[win_slices(big)], radius)[inner]
    np.testing.assert_array_equal(out, whole)


def _otb(tmp_path, a: np.ndarray, radius: int, *extra: str) -> np.ndarray:
    src, dst = tmp_path / "in.tif", tmp_path / "out.tif"
    profile = {"driver": "GTiff", "width": a.shape[1], "height": a.shape[0], "count": 1, "dtype": "uint8"}
    with rasterio.open(src, "w", transform=Affine(1, 0, 0, 0, -1, 1000), **profile) as d:
        d.write(a, 1)
    cmd = [OTB, "-io.in", str(src), "-io.out", str(dst), "uint8", "-ip.radius", str(radius), *extra]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    with rasterio.open(dst) as d:
        return d.read(1)


@pytest.mark.skipif(
    OTB is None, reason="otbcli_ClassificationMapRegularization absent (apt-get install otb-bin)"
)
@pytest.mark.parametrize("radius", [1, 2, 3])
def test_matches_otb(tmp_path, radius):
    rng = np.random.default_rng(10 + radius)
    a = rng.integers(0, 5, (131, 97)).astype(np.uint8)  # 0 = nodata among 4 classes: many ties
    np.testing.assert_array_equal(majority(a, radius), _otb(tmp_path, a, radius))
    np.testing.assert_array_equal(
        majority(a, radius, undecided=9),
        _otb(tmp_path, a, radius, "-ip.suvbool", "true", "-ip.undecidedlabel", "9"),
    )
    np.testing.assert_array_equal(
        majority(a, radius, nodata=2), _otb(tmp_path, a, radius, "-ip.nodatalabel", "2")
    )
