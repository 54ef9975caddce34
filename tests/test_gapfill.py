"""Gapfilling: hand-computed series, a property test against a slow exact reference, the tile shell."""

from __future__ import annotations

import logging
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline.gapfill as gf
from pipeline.errors import PipelineError
from pipeline.gapfill import NODATA, clear_count, gapfill, gapfill_tile
from pipeline.io.tilestore import add_array, create_store, dates_of, open_store
from tests.conftest import make_grid

D0 = np.datetime64("2018-01-01", "D")
BANDS = ["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"]


def days(*d: int) -> np.ndarray:
    return D0 + np.array(d, dtype="timedelta64[D]")


def series(vals: list[int], ok: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """One pixel, one band: (T, 1, 1) int16 and (T, 1) bool."""
    return np.array(vals, dtype=np.int16)[:, None, None], np.array(ok)[:, None]


def test_interior_interpolation_by_hand() -> None:
    v, m = series([100, 200], [True, True])
    out = gapfill(v, m, days(0, 10), days(4, 5, 7))
    assert out[:, 0, 0].tolist() == [140, 150, 170]


def test_exact_hits_and_constant_edges() -> None:
    v, m = series([100, 200, 260], [True, True, True])
    out = gapfill(v, m, days(10, 20, 30), days(0, 10, 20, 25, 30, 40))
    assert out[:, 0, 0].tolist() == [100, 100, 200, 230, 260, 260]


def test_invalid_values_are_ignored_even_if_garbage() -> None:
    v, m = series([100, 32767, -32768, 200, 5], [True, False, False, True, False])
    out = gapfill(v, m, days(0, 2, 5, 10, 12), days(0, 2, 5, 10, 12, 20))
    # 2 -> 120, 5 -> 150; after the last clear date (10) the value stays 200
    assert out[:, 0, 0].tolist() == [100, 120, 150, 200, 200, 200]


def test_leading_invalid_gives_first_clear_value() -> None:
    v, m = series([-5000, 300, 500], [False, True, True])
    out = gapfill(v, m, days(0, 10, 20), days(0, 5, 10, 15))
    assert out[:, 0, 0].tolist() == [300, 300, 300, 400]


def test_never_clear_pixel_is_nodata() -> None:
    v = np.full((3, 2, 1, 2), 1234, dtype=np.int16)
    m = np.zeros((3, 1, 2), dtype=bool)
    m[1, 0, 1] = True
    out = gapfill(v, m, days(0, 10, 20), days(-5, 5, 15, 25))
    assert (out[:, :, 0, 0] == NODATA).all()
    assert (out[:, :, 0, 1] == 1234).all()


def test_bands_share_the_mask() -> None:
    v = np.array([[10, -20, 0], [999, 999, 999], [30, 20, 1000]], dtype=np.int16)[:, :, None]  # (T=3, C=3, 1)
    m = np.array([True, False, True])[:, None]
    out = gapfill(v, m, days(0, 1, 4), days(1, 2, 3))
    # w = 1/4, 2/4, 3/4 on every band
    assert out[:, :, 0].tolist() == [[15, -10, 250], [20, 0, 500], [25, 10, 750]]


def test_round_half_to_even() -> None:
    # 0 -> 3 over 6 days: day 1 is 0.5 (-> 0), day 3 is 1.5 (-> 2), day 5 is 2.5 (-> 2)
    v, m = series([0, 3], [True, True])
    out = gapfill(v, m, days(0, 6), days(1, 3, 5))
    assert out[:, 0, 0].tolist() == [0, 2, 2]
    # extreme int16 values do not overflow
    v, m = series([-32768, 32767], [True, True])
    out = gapfill(v, m, days(0, 2), days(1))
    assert out[0, 0, 0] == 0  # -0.5 -> -0 -> 0


def test_unsorted_or_duplicate_dates_rejected() -> None:
    v, m = series([1, 2], [True, True])
    with pytest.raises(ValueError, match="strictly increasing"):
        gapfill(v, m, days(5, 1), days(0))
    with pytest.raises(ValueError, match="strictly increasing"):
        gapfill(v, m, days(3, 3), days(0))


def test_bad_inputs_rejected() -> None:
    v, m = series([1, 2], [True, True])
    with pytest.raises(ValueError, match="int16"):
        gapfill(v.astype(np.int32), m, days(0, 1), days(0))
    with pytest.raises(ValueError, match="bool"):
        gapfill(v, m.astype(np.uint8), days(0, 1), days(0))
    with pytest.raises(ValueError, match="shape"):
        gapfill(v, m[:1], days(0, 1), days(0))
    with pytest.raises(ValueError, match="observations"):
        gapfill(v, m, days(0, 1, 2), days(0))


def test_no_observation_at_all_and_out_buffer() -> None:
    v = np.zeros((0, 2, 3), dtype=np.int16)
    out = gapfill(v, np.zeros((0, 3), dtype=bool), days(), days(0, 1))
    assert out.shape == (2, 2, 3) and (out == NODATA).all()
    v, m = series([100, 200], [True, True])
    buf = np.zeros((1, 1, 1), dtype=np.int16)
    assert gapfill(v, m, days(0, 10), days(4), out=buf) is buf and buf[0, 0, 0] == 140


def reference(v: np.ndarray, m: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Slow per-pixel reference in exact rational arithmetic, rounded half to even."""
    t, c, n = v.shape
    x = src.astype(np.int64)
    out = np.empty((len(dst), c, n), dtype=np.int16)
    for p in range(n):
        idx = np.flatnonzero(m[:, p])
        for b in range(c):
            xs, ys = x[idx], [int(y) for y in v[idx, b, p]]
            for j, d in enumerate(dst.astype(np.int64)):
                if not idx.size:
                    out[j, b, p] = NODATA
                    continue
                if d <= xs[0]:
                    val = Fraction(ys[0])
                elif d >= xs[-1]:
                    val = Fraction(ys[-1])
                else:
                    k = int(np.searchsorted(xs, d, side="right")) - 1
                    val = ys[k] + Fraction((ys[k + 1] - ys[k]) * int(d - xs[k]), int(xs[k + 1] - xs[k]))
                out[j, b, p] = round(val)  # Fraction rounds half to even
    return out


@settings(max_examples=150, deadline=None)
@given(
    data=st.data(),
    t=st.integers(1, 8),
    c=st.integers(1, 3),
    n=st.integers(1, 40),
    block=st.integers(1, 16),
)
def test_matches_exact_reference(data: st.DataObject, t: int, c: int, n: int, block: int) -> None:
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    src = D0 + np.sort(rng.choice(120, t, replace=False)).astype("timedelta64[D]")
    dst = D0 + rng.integers(-20, 140, data.draw(st.integers(1, 10))).astype("timedelta64[D]")
    lo, hi = data.draw(st.sampled_from([(-32768, 32767), (0, 10000), (0, 4)]))
    v = rng.integers(lo, hi, (t, c, n), endpoint=True).astype(np.int16)
    m = rng.random((t, n)) < data.draw(st.floats(0, 1))
    np.testing.assert_array_equal(gapfill(v, m, src, dst, block=block), reference(v, m, src, dst))


def float32_reference(v: np.ndarray, m: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The documented float32 rule, pixel by pixel in numpy: ``vn - (vn - vp) * num / den`` in float32
    (days since the first source date), rounded half to even. Unlike :func:`reference` it also holds
    where float32 is not exact (full int16 range over very long gaps), so it pins the kernel's bits."""
    t, c, n = v.shape
    x = (src - src[0]).astype(np.float32)
    out = np.empty((len(dst), c, n), dtype=np.int16)
    for p in range(n):
        idx = np.flatnonzero(m[:, p])
        for j, d in enumerate((dst - src[0]).astype(np.float32)):
            before, after = idx[x[idx] <= d], idx[x[idx] >= d]
            if not idx.size:
                out[j, :, p] = NODATA
            elif not before.size or not after.size or before[-1] == after[0]:
                out[j, :, p] = v[after[0] if after.size else before[-1], :, p]
            else:
                vp, vn = v[before[-1], :, p].astype(np.float32), v[after[0], :, p].astype(np.float32)
                num, den = x[after[0]] - d, x[after[0]] - x[before[-1]]
                out[j, :, p] = np.rint(vn - (vn - vp) * num / den).astype(np.int16)
    return out


@pytest.mark.parametrize("seed", range(6))
def test_bit_identical_to_float32_rule_on_random_cubes(seed: int) -> None:
    """Regression for the fused kernel: strided windows, any segment size, misaligned ``out`` buffers
    (non-temporal stores), spans up to 32000 days at full int16 range, exact-hit output dates."""
    rng = np.random.default_rng(seed)
    t, c, h, w = (int(x) for x in rng.integers([1, 1, 1, 1], [36, 5, 4, 90]))
    span = [60, 400, 32000][seed % 3]
    src = D0 + np.sort(rng.choice(span, t, replace=False)).astype("timedelta64[D]")
    dst = D0 + np.sort(rng.integers(-30, span + 30, int(rng.integers(1, 40)))).astype("timedelta64[D]")
    dst = np.concatenate([dst, src[: t // 2]])
    lo, hi = [(-32768, 32767), (0, 10000)][seed % 2]
    big = rng.integers(lo, hi, (t, c, h + 2, w + 3), endpoint=True).astype(np.int16)
    mbig = rng.random((t, h + 2, w + 3)) < rng.uniform(0.1, 0.9)
    v, m = big[:, :, 1 : 1 + h, 2 : 2 + w], mbig[:, 1 : 1 + h, 2 : 2 + w]
    want = float32_reference(v.reshape(t, c, -1), m.reshape(t, -1), src, dst).reshape(len(dst), c, h, w)
    for block in (1, 13, 64, 512):
        skew = int(rng.integers(0, 40))
        buf = np.empty(len(dst) * c * h * w + skew, np.int16)[skew:].reshape(len(dst), c, h, w)
        np.testing.assert_array_equal(gapfill(v, m, src, dst, block=block, out=buf), want)
        vc, mc = np.ascontiguousarray(v), np.ascontiguousarray(m)
        np.testing.assert_array_equal(gapfill(vc, mc, src, dst, block=block), want)


def test_float_rounding_matches_np_interp_within_one() -> None:
    """Against numpy's own interpolator on realistic values (float64, different rounding order)."""
    rng = np.random.default_rng(3)
    src = D0 + np.sort(rng.choice(365, 30, replace=False)).astype("timedelta64[D]")
    dst = D0 + np.arange(0, 365, 10).astype("timedelta64[D]")
    v = rng.integers(0, 12000, (30, 1, 200)).astype(np.int16)
    m = rng.random((30, 200)) < 0.6
    m[:, 0] = True
    out = gapfill(v, m, src, dst)
    for p in range(1, 200):
        if m[:, p].any():
            x = src[m[:, p]].astype(np.float64)
            ref = np.interp(dst.astype(np.float64), x, v[m[:, p], 0, p].astype(np.float64))
            assert np.abs(out[:, 0, p] - ref).max() <= 0.5 + 1e-9


def test_clear_count() -> None:
    m = np.array([[[1, 0], [0, 0]], [[1, 1], [0, 0]], [[1, 0], [1, 0]]], dtype=bool)
    cc = clear_count(m)
    assert cc.dtype == np.uint16 and cc.tolist() == [[3, 1], [1, 0]]


# ----------------------------------------------------------------------------------- tile shell


def make_ingest(path: Path, t: int = 5, h: int = 70, w: int = 600, seed: int = 0) -> tuple[np.ndarray, ...]:
    """A tiny ingest store spanning two shard columns; returns (reflectance, valid, dates)."""
    rng = np.random.default_rng(seed)
    grid = make_grid(width=w, height=h)
    dates = D0 + np.sort(rng.choice(100, t, replace=False)).astype("timedelta64[D]")
    refl = rng.integers(0, 10000, (t, 10, h, w)).astype(np.int16)
    valid = (rng.random((t, h, w)) < 0.6).astype(np.uint8)
    valid[:, :3, :3] = 0  # never clear
    garbage = rng.integers(-32768, 32767, refl.shape, endpoint=True).astype(np.int16)
    refl = np.where(valid[:, None] == 1, refl, garbage)
    valid[1, 5, 5] = 1
    refl[1, 3, 5, 5] = NODATA  # "clear" but no data on a band: must not be used
    g = create_store(
        path,
        "ingest",
        grid,
        tile="T31TCJ",
        bands=BANDS,
        dates=[str(d) for d in dates],
        acquired=[],
        products=["a"],
    )
    add_array(g, "reflectance", refl.shape, np.int16, NODATA)[...] = refl
    add_array(g, "valid", valid.shape, np.uint8, 0)[...] = valid
    return refl, valid, dates


def test_gapfill_tile_matches_pure_function(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    refl, valid, dates = make_ingest(tmp_path / "in.zarr")
    grid_dates = dates[0] - 3 + np.arange(0, 110, 10).astype("timedelta64[D]")
    with caplog.at_level(logging.WARNING):
        gapfill_tile(tmp_path / "in.zarr", tmp_path / "out.zarr", grid_dates, threads=2)
    assert "extends beyond the acquisitions" in caplog.text
    clear = (valid == 1) & (refl != NODATA).all(axis=1)
    g = open_store(tmp_path / "out.zarr", "gapfilled", ("reflectance", "clear_count"))
    np.testing.assert_array_equal(g["reflectance"][...], gapfill(refl, clear, dates, grid_dates))
    cc = g["clear_count"][...]
    np.testing.assert_array_equal(cc, clear.sum(axis=0))
    assert cc[0, 0] == 0 and (g["reflectance"][:, :, 0, 0] == NODATA).all()
    assert cc[5, 5] == valid[:, 5, 5].sum() - 1
    assert list(dates_of(g)) == list(grid_dates)
    assert g.attrs["source_dates"] == [str(d) for d in dates]
    assert g.attrs["tile"] == "T31TCJ" and g.attrs["bands"] == BANDS and g.attrs["width"] == 600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr", "out.zarr"]


def test_interrupted_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_ingest(tmp_path / "in.zarr")
    calls = {"n": 0}
    real = gf.gapfill

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(gf, "gapfill", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        gapfill_tile(tmp_path / "in.zarr", tmp_path / "out.zarr", days(10, 20), threads=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]


def test_gapfill_tile_rejects_wrong_store(tmp_path: Path) -> None:
    make_ingest(tmp_path / "in.zarr", t=2, h=8, w=8)
    gapfill_tile(tmp_path / "in.zarr", tmp_path / "out.zarr", days(10, 20))
    with pytest.raises(PipelineError, match="expected a 'ingest' store"):
        gapfill_tile(tmp_path / "out.zarr", tmp_path / "again.zarr", days(10, 20))
    assert not (tmp_path / "again.zarr").exists()


def test_a_tile_cloudy_on_every_date_warns_and_maps_to_no_data(tmp_path: Path, caplog) -> None:
    make_ingest(tmp_path / "in.zarr", t=3, h=8, w=8)
    g = zarr.open_group(str(tmp_path / "in.zarr"), mode="r+")
    g["valid"][...] = 0  # every acquisition cloudy
    with caplog.at_level(logging.WARNING):
        gapfill_tile(tmp_path / "in.zarr", tmp_path / "out.zarr", days(10, 20))
    assert "no clear observation on any of the 3 dates" in caplog.text and "tile T31TCJ" in caplog.text
    out = open_store(tmp_path / "out.zarr", "gapfilled", ("reflectance", "clear_count"))
    assert (out["reflectance"][...] == NODATA).all() and (out["clear_count"][...] == 0).all()


def test_an_acquisition_outside_the_runs_period_is_refused(tmp_path: Path) -> None:
    """A product of another year in the folder (or a metadata date typed wrong): not used to
    interpolate the year's first or last dates without a word."""
    make_ingest(tmp_path / "in.zarr", t=3, h=8, w=8)
    g = zarr.open_group(str(tmp_path / "in.zarr"), mode="r+")
    dates = list(g.attrs["dates"])
    g.attrs["dates"] = [*dates[:-1], "2031-05-01"]
    g.attrs["product_dirs"] = ["p0", "p1", "SENTINEL2A_20310501-000000-000_L2A_T31TCJ_C_V1-4"]
    with pytest.raises(
        PipelineError, match=r"acquisition 2031-05-01 \(product SENTINEL2A_20310501.*outside the run's period"
    ):
        gapfill_tile(tmp_path / "in.zarr", tmp_path / "out.zarr", days(10, 20))
    assert not (tmp_path / "out.zarr").exists()
    g.attrs["dates"] = [*dates[:-1], str(np.datetime64(days(10, 20)[-1]) + gf.PERIOD_MARGIN_DAYS)]
    gapfill_tile(tmp_path / "in.zarr", tmp_path / "out.zarr", days(10, 20))  # at the margin: used
