"""Array stages on dask workers (separate processes) give the same stores as the default threads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.gapfill import gapfill_tile
from pipeline.io.tilestore import open_store
from pipeline.parallel import read_ahead, run_windows, window_executor
from pipeline.stats import tile_histogram
from tests.test_gapfill import make_ingest
from tests.test_stats import make_gapfilled, random_tile

LOCAL = {"cluster": "local", "workers": 2, "threads_per_worker": 1}


def test_gapfill_and_histogram_on_dask_workers_equal_threads(tmp_path: Path) -> None:
    _, _, dates = make_ingest(tmp_path / "in.zarr")  # 600 px wide: two windows
    grid = dates[0] + np.arange(0, 100, 10).astype("timedelta64[D]")
    gapfill_tile(
        tmp_path / "in.zarr", tmp_path / "threads.zarr", grid, threads=2, histogram=tmp_path / "t.npz"
    )
    gapfill_tile(
        tmp_path / "in.zarr",
        tmp_path / "dask.zarr",
        grid,
        threads=1,
        dask=LOCAL,
        histogram=tmp_path / "d.npz",
    )
    a = open_store(tmp_path / "threads.zarr", "gapfilled")
    b = open_store(tmp_path / "dask.zarr", "gapfilled")
    np.testing.assert_array_equal(a["reflectance"][...], b["reflectance"][...])
    np.testing.assert_array_equal(a["clear_count"][...], b["clear_count"][...])
    with np.load(tmp_path / "t.npz") as x, np.load(tmp_path / "d.npz") as y:  # counted on the workers
        assert x["counts"].sum() > 0 and int(x["n_pixels"]) == int(y["n_pixels"])
        np.testing.assert_array_equal(x["counts"], y["counts"])

    refl, count = random_tile(np.random.default_rng(3), 70, 1100)  # three windows across
    make_gapfilled(tmp_path / "g.zarr", refl, count, "T")
    tile_histogram(tmp_path / "g.zarr", tmp_path / "threads.npz", threads=2)
    tile_histogram(tmp_path / "g.zarr", tmp_path / "dask.npz", threads=1, dask=LOCAL)
    with np.load(tmp_path / "threads.npz") as x, np.load(tmp_path / "dask.npz") as y:
        assert x["counts"].sum() > 0
        np.testing.assert_array_equal(x["counts"], y["counts"])
        assert int(x["offset"]) == int(y["offset"]) and int(x["n_pixels"]) == int(y["n_pixels"])


def test_run_windows_keeps_order_and_propagates_errors() -> None:
    got = []
    with window_executor(None, 2) as pool:
        run_windows(lambda w: w * w, list(range(20)), pool, got.append)
    assert got == [w * w for w in range(20)]

    def boom(w):
        if w == 3:
            raise RuntimeError("window 3 failed")
        return w

    with window_executor(None, 2) as pool, pytest.raises(RuntimeError, match="window 3"):
        run_windows(boom, list(range(10)), pool)
    with pytest.raises(ValueError, match="unknown dask cluster"), window_executor({"cluster": "pbs"}, 1):
        pass


def test_read_ahead_in_order_overlapped_and_errors_at_their_item() -> None:
    import threading
    import time

    started: list[int] = []
    gate = threading.Event()

    def read(i: int) -> int:
        started.append(i)
        if i == 3:
            raise OSError("bad chunk")
        return i * 10

    out = []
    with pytest.raises(OSError, match="bad chunk"):
        for item, value in read_ahead([0, 1, 2, 3, 4], read):
            deadline = time.monotonic() + 5
            while item + 1 not in started and item < 3 and time.monotonic() < deadline:
                gate.wait(0.01)  # the next read starts while this item is being used
            assert item >= 3 or item + 1 in started
            out.append((item, value))
    assert out == [(0, 0), (1, 10), (2, 20)]
    assert 4 not in started or started.index(4) > started.index(3)
