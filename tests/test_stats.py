"""Exact percentiles from histograms (== np.percentile), merging across tiles, eq. 2 normalisation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.io.tilestore import add_array, create_store
from pipeline.stats import (
    NODATA,
    Percentiles,
    channel_names,
    merge_percentiles,
    percentile_from_counts,
    tile_histogram,
    window_histogram,
)
from tests.conftest import make_grid

DATES = ["2018-01-05", "2018-01-15", "2018-01-25"]
BANDS = ["B2", "B3"]
QS = [0, 3, 25, 50, 97, 99.9, 100, 33.3333]


def hist_of(values: np.ndarray) -> tuple[np.ndarray, int]:
    lo = int(values.min())
    return np.bincount(values.astype(np.int64) - lo), lo


@pytest.mark.parametrize(
    "values",
    [
        np.array([5], dtype=np.int16),
        np.array([7, 7, 7, 7], dtype=np.int16),
        np.array([-3, 10, 10, 10, 10, 11, 400], dtype=np.int16),
        np.random.default_rng(0).integers(0, 12, 1001).astype(np.int16),  # heavy duplicates
        np.random.default_rng(1).integers(-2000, 16000, 5000).astype(np.int16),
    ],
)
def test_percentile_from_counts_equals_np_percentile(values: np.ndarray) -> None:
    counts, lo = hist_of(values)
    for q in QS:
        assert percentile_from_counts(counts, lo, q) == np.percentile(values, q)


def test_full_int16_range_equals_float64_percentile() -> None:
    values = np.random.default_rng(2).integers(-32768, 32767, 37, endpoint=True).astype(np.int16)
    counts, lo = hist_of(values)
    for q in np.linspace(0, 100, 41):
        assert percentile_from_counts(counts, lo, float(q)) == np.percentile(
            values.astype(np.float64), float(q)
        )


def test_upper_half_interpolates_from_above_like_numpy() -> None:
    """numpy computes b - (b - a) * (1 - g) when g >= 0.5; a + (b - a) * g differs in the last bit here."""
    values = np.array([-14563, -6980, -2345, 1537, 6923, 8831, 15843], dtype=np.int16)
    counts, lo = hist_of(values)
    q = 99.0417669388115
    assert percentile_from_counts(counts, lo, q) == np.percentile(values, q)


def make_gapfilled(
    path: Path, refl: np.ndarray, count: np.ndarray, tile: str, dates=DATES, bands=BANDS
) -> None:
    t, c, h, w = refl.shape
    g = create_store(path, "gapfilled", make_grid(width=w, height=h), tile=tile, bands=bands, dates=dates)
    add_array(g, "reflectance", refl.shape, np.int16, NODATA)[...] = refl
    add_array(g, "clear_count", count.shape, np.uint16, 0)[...] = count


def random_tile(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    refl = rng.integers(0, 3000, (3, 2, h, w)).astype(np.int16)
    refl[:, 1] //= 50  # lots of ties on band B3
    count = rng.integers(0, 4, (h, w)).astype(np.uint16)
    refl[:, :, count == 0] = NODATA
    return refl, count


def test_histograms_merge_to_np_percentile_of_concatenation(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    tiles = [random_tile(rng, h, w) for h, w in ((40, 530), (17, 9), (64, 64))]
    hists = []
    for i, (refl, count) in enumerate(tiles):
        make_gapfilled(tmp_path / f"T{i}.zarr", refl, count, f"T{i}")
        hists.append(tmp_path / f"T{i}.hist.npz")
        tile_histogram(tmp_path / f"T{i}.zarr", hists[-1], threads=2)
    merge_percentiles(hists, 3, 97, tmp_path / "p.json")
    out = json.loads((tmp_path / "p.json").read_text())
    # oracle: every valid pixel of every tile, channel t*C + c
    feats = np.concatenate([r.reshape(6, -1)[:, c.ravel() > 0] for r, c in tiles], axis=1)
    assert out["channels"] == channel_names(DATES, BANDS)
    assert out["channels"][:3] == ["2018-01-05/B2", "2018-01-05/B3", "2018-01-15/B2"]
    assert out["low"] == [float(np.percentile(f, 3)) for f in feats]
    assert out["high"] == [float(np.percentile(f, 97)) for f in feats]
    assert out["n_pixels"] == feats.shape[1] == sum(int((c > 0).sum()) for _, c in tiles)
    assert out["tiles"] == ["T0", "T1", "T2"] and out["dates"] == DATES and out["bands"] == BANDS
    assert out["low_percentile"] == 3 and out["high_percentile"] == 97
    with np.load(hists[1]) as z:  # the per-tile file is exact on its own too
        assert z["counts"].sum(axis=1).tolist() == [int((tiles[1][1] > 0).sum())] * 6


def test_nodata_excluded(tmp_path: Path) -> None:
    refl = np.full((3, 2, 4, 4), 100, dtype=np.int16)
    refl[:, :, 0, 0] = 5000
    count = np.ones((4, 4), dtype=np.uint16)
    refl[:, :, 3, :] = NODATA
    count[3, :] = 0
    make_gapfilled(tmp_path / "t.zarr", refl, count, "T")
    tile_histogram(tmp_path / "t.zarr", tmp_path / "t.npz")
    merge_percentiles([tmp_path / "t.npz"], 0, 100, tmp_path / "p.json")
    out = json.loads((tmp_path / "p.json").read_text())
    assert out["low"] == [100.0] * 6 and out["high"] == [5000.0] * 6 and out["n_pixels"] == 12


def test_mismatch_and_empty_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    refl, count = random_tile(rng, 8, 8)
    make_gapfilled(tmp_path / "a.zarr", refl, count, "A")
    make_gapfilled(tmp_path / "b.zarr", refl, count, "B", dates=["2018-01-05", "2018-01-16", "2018-01-25"])
    for name in "ab":
        tile_histogram(tmp_path / f"{name}.zarr", tmp_path / f"{name}.npz")
    with pytest.raises(PipelineError, match=r"b\.npz: channels differ"):
        merge_percentiles([tmp_path / "a.npz", tmp_path / "b.npz"], 3, 97, tmp_path / "p.json")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(PipelineError, match=r"junk\.npz: not a readable histogram"):
        merge_percentiles([tmp_path / "a.npz", tmp_path / "junk.npz"], 3, 97, tmp_path / "p.json")
    make_gapfilled(
        tmp_path / "e.zarr", np.full((3, 2, 4, 4), NODATA, np.int16), np.zeros((4, 4), np.uint16), "E"
    )
    tile_histogram(tmp_path / "e.zarr", tmp_path / "e.npz")
    with pytest.raises(PipelineError, match="2018-01-05/B2 has no valid pixel"):
        merge_percentiles([tmp_path / "e.npz"], 3, 97, tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()
    # an empty tile merges fine with a non-empty one
    merge_percentiles([tmp_path / "e.npz", tmp_path / "a.npz"], 3, 97, tmp_path / "p.json")
    with pytest.raises(PipelineError, match="expected a 'gapfilled' store"):
        create_store(tmp_path / "x.zarr", "ingest", make_grid(width=4, height=4))
        tile_histogram(tmp_path / "x.zarr", tmp_path / "x.npz")


def write_pct(path: Path, low: list[float], high: list[float]) -> Percentiles:
    path.write_text(json.dumps({"low_percentile": 3, "high_percentile": 97, "bands": ["B2", "B3"],
                                "dates": ["d0", "d1"], "channels": ["d0/B2", "d0/B3", "d1/B2", "d1/B3"],
                                "low": low, "high": high, "n_pixels": 1, "tiles": ["T"]}))  # fmt: skip
    return Percentiles.load(path)


def test_normalise_by_hand(tmp_path: Path) -> None:
    p = write_pct(tmp_path / "p.json", [100, 0, -50, 7], [300, 1000, 50, 7])
    x = np.array([[200, 250, 0, 7], [50, 2000, 100, 9], [NODATA, 0, -50, 0]], dtype=np.int16)
    y = p.normalise_features(x)
    assert y.dtype == np.float32
    # (200-100)/200, 250/1000, (0+50)/100, flat channel -> 0 ; clipping below / above ; nodata -> 0
    np.testing.assert_array_equal(y, [[0.5, 0.25, 0.5, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    cube = x.T.reshape(2, 2, 3)[..., None]  # (T, C, h=3, w=1): pixel i = x[i]
    yc = p.normalise_cube(cube)
    assert yc.shape == (4, 3, 1)
    np.testing.assert_array_equal(yc[:, :, 0].T, y)
    batch = p.normalise_cube(np.stack([cube, cube]))
    assert batch.shape == (2, 4, 3, 1)
    with pytest.raises(ValueError, match="4 features last"):
        p.normalise_features(x[:, :3])
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 2, 2, h, w\)"):
        p.normalise_cube(cube[:1])


def test_normalise_bit_identical_to_numpy_expression(tmp_path: Path) -> None:
    """The compiled pass equals the plain numpy eq.-2 expression on random int16 windows."""
    rng = np.random.default_rng(3)
    low = rng.uniform(-200, 3000, 4).round().astype(np.float32)
    high = low + rng.uniform(1, 5000, 4).round().astype(np.float32)
    high[3] = low[3]  # a flat channel
    p = write_pct(tmp_path / "p.json", low.tolist(), high.tolist())
    cube = rng.integers(-1000, 9000, (3, 2, 2, 37, 53)).astype(np.int16)  # (batch, T, C, h, w)
    cube[rng.random(cube.shape) < 0.05] = NODATA
    scale = np.divide(1, high - low, out=np.zeros(4, np.float32), where=high > low)

    def expected(x: np.ndarray, lo: np.ndarray, sc: np.ndarray) -> np.ndarray:
        y = np.clip((x.astype(np.float32) - lo) * sc, 0, 1)
        return np.where(x == NODATA, np.float32(0), y)

    got = p.normalise_cube(cube)
    want = expected(cube.reshape(3, 4, 37, 53), low[:, None, None], scale[:, None, None])
    np.testing.assert_array_equal(got, want)
    feats = np.ascontiguousarray(cube.reshape(3, 4, -1).transpose(0, 2, 1).reshape(-1, 4))
    np.testing.assert_array_equal(p.normalise_features(feats), expected(feats, low, scale))
    np.testing.assert_array_equal(
        p.normalise_features(feats[::3]), expected(feats[::3], low, scale)
    )  # strided


def test_load_rejects_bad_file(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="lengths disagree"):
        write_pct(tmp_path / "p.json", [1, 2, 3], [4, 5, 6])
    (tmp_path / "q.json").write_text("{")
    with pytest.raises(PipelineError, match="not a readable percentiles file"):
        Percentiles.load(tmp_path / "q.json")


# --- the histograms counted inside the gapfill pass -------------------------------------------


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_window_histogram_counts_what_bincount_counts(threads: int) -> None:
    """The single-threaded kernel and the parallel region (channels dealt over the threads, more
    threads asked than numba has or than there are channels) count what np.bincount counts."""
    rng = np.random.default_rng(11)
    vals = rng.integers(-300, 9000, (5, 4001)).astype(np.int16)  # few equal neighbours: one histogram
    vals[:, ::7] = NODATA  # never counted
    vals[2, 3] = -32768  # extremes of int16 are counted
    vals[4, 9] = 32767
    vals[3] = NODATA  # a channel with nothing to count
    keep = rng.random(4001) < 0.8
    keep[[3, 9]] = True
    n, lo, counts = window_histogram(vals, keep, threads=threads)
    assert n == int(keep.sum()) and lo == -32768 and counts.dtype == np.uint32
    assert counts.shape == (5, 32767 - lo + 1)
    for k in range(5):
        v = vals[k, keep]
        v = v[v != NODATA].astype(np.int64)
        oracle = np.bincount(v - lo, minlength=counts.shape[1])
        np.testing.assert_array_equal(counts[k], oracle)
    assert counts[3].sum() == 0
    assert window_histogram(vals, np.zeros(4001, bool), threads=threads) is None
    assert window_histogram(np.full((3, 10), NODATA, np.int16), threads=threads) is None
    # runs of equal values: the four-way count, with a tail of 397 % 4
    smooth = np.repeat(rng.integers(100, 120, (6, 50)), 8, axis=1)[:, :397].astype(np.int16)
    n, lo, counts = window_histogram(smooth, None, 77, threads=threads)
    assert (n, lo) == (77, int(smooth.min()))
    for k in range(6):
        np.testing.assert_array_equal(counts[k], np.bincount(smooth[k] - lo, minlength=counts.shape[1]))


def _oracle(cubes: list[tuple[np.ndarray, np.ndarray]], q: float) -> list[float]:
    """np.percentile over every clear pixel of every gapfilled cube, channel t*C + c."""
    k = cubes[0][0].shape[0] * cubes[0][0].shape[1]
    feats = np.concatenate([r.reshape(k, -1)[:, c.ravel() > 0] for r, c in cubes], axis=1)
    return [float(np.percentile(f, q)) for f in feats]


def test_gapfill_writes_the_histogram_a_second_pass_would_read(tmp_path: Path) -> None:
    """Bit for bit the file ``tile_histogram`` makes from the finished store, and the run-wide
    percentiles of np.percentile; rerunning one tile replaces its histogram only, and the merge of
    the new and the untouched tile is again np.percentile of their cubes."""
    from pipeline.gapfill import gapfill_tile
    from pipeline.io.tilestore import open_store
    from tests.test_gapfill import make_ingest

    grid = np.datetime64("2018-01-01") + np.arange(0, 100, 10).astype("timedelta64[D]")

    def run(name: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
        make_ingest(tmp_path / f"{name}.in.zarr", seed=seed, w=600 if name == "A" else 90)
        store, hist = tmp_path / f"{name}.zarr", tmp_path / f"{name}.hist.npz"
        for p in (store, hist):  # a rerun: the job's outputs are replaced
            if p.is_dir():
                shutil.rmtree(p)
            p.unlink(missing_ok=True)
        gapfill_tile(tmp_path / f"{name}.in.zarr", store, grid, threads=2, histogram=hist)
        g = open_store(store, "gapfilled", ("reflectance", "clear_count"))
        return np.asarray(g["reflectance"]), np.asarray(g["clear_count"])

    cubes = {"A": run("A", 0), "B": run("B", 1)}
    tile_histogram(tmp_path / "A.zarr", tmp_path / "A.second_pass.npz", threads=2)
    with np.load(tmp_path / "A.hist.npz") as fused, np.load(tmp_path / "A.second_pass.npz") as read:
        assert sorted(fused.files) == sorted(read.files)
        for key in fused.files:
            np.testing.assert_array_equal(fused[key], read[key], err_msg=key)
        assert fused["counts"].sum() > 0 and str(fused["tile"]) == "T31TCJ"
    hists = [tmp_path / "A.hist.npz", tmp_path / "B.hist.npz"]
    merge_percentiles(hists, 3, 97, tmp_path / "p.json")
    out = json.loads((tmp_path / "p.json").read_text())
    assert out["low"] == _oracle(list(cubes.values()), 3)
    assert out["high"] == _oracle(list(cubes.values()), 97)

    cubes["A"] = run("A", 5)  # tile A rerun on other inputs; B untouched
    merge_percentiles(hists, 3, 97, tmp_path / "p2.json")
    out2 = json.loads((tmp_path / "p2.json").read_text())
    assert out2["low"] == _oracle(list(cubes.values()), 3) and out2["low"] != out["low"]
    assert out2["high"] == _oracle(list(cubes.values()), 97)


def test_a_failed_gapfill_leaves_no_histogram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.gapfill as gf
    from tests.test_gapfill import make_ingest

    make_ingest(tmp_path / "in.zarr")
    real, calls = gf.gapfill, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(gf, "gapfill", failing)
    grid = np.datetime64("2018-01-01") + np.arange(0, 100, 10).astype("timedelta64[D]")
    with pytest.raises(RuntimeError, match="disk full"):
        gf.gapfill_tile(tmp_path / "in.zarr", tmp_path / "out.zarr", grid, histogram=tmp_path / "h.npz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]
