"""COG writers: layout, colour table, class names, georeferencing, overviews, atomicity."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.windows import Window

from pipeline.config import ClassDef
from pipeline.io.cog import class_map_writer, cog_writer, parallel_sinks, write_class_map, write_validity
from pipeline.io.tilestore import add_array, create_store, iter_windows, win_slices
from tests.conftest import make_grid

CLASSES = [
    ClassDef(11, "ASC", "Annual summer crops", "#ff5500"),
    ClassDef(31, "BLF", "Broad-leaved forest", "#009c00"),
    ClassDef(222, "VIN", "Vineyards", "#8b1a4a"),
]


def test_class_map_cog(tmp_path):
    grid = make_grid(1100, 900)  # larger than a 512 block: the COG gets overviews
    rng = np.random.default_rng(0)
    labels = rng.choice(np.array([0, 11, 31, 222], np.uint8), (900, 1100))
    out = tmp_path / "maps" / "T31TCJ.tif"
    write_class_map(out, grid, CLASSES, labels, extra_tags={"MODEL": "rf"})
    with rasterio.open(out) as src:
        assert src.driver == "GTiff"
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.overviews(1)  # internal overviews
        assert src.block_shapes == [(512, 512)]
        assert src.crs == grid.crs
        assert src.transform.almost_equals(grid.transform)
        assert src.nodata == 0
        assert src.dtypes[0] == "uint8"
        cmap = src.colormap(1)
        for c in CLASSES:
            assert cmap[c.code] == (*c.rgb, 255)
        assert cmap[0][3] == 0  # no-data transparent
        assert cmap[222] == (0x8B, 0x1A, 0x4A, 255)
        tags = src.tags()
        assert [c["name"] for c in json.loads(tags["CLASSES"])] == ["ASC", "BLF", "VIN"]
        assert tags["MODEL"] == "rf"
        assert src.tags(1)["CLASS_222"] == "VIN: Vineyards"
        np.testing.assert_array_equal(src.read(1), labels)
        # MODE overviews only hold existing codes (averaging would invent values)
        ov = src.read(1, out_shape=(450, 550))
        assert set(np.unique(ov).tolist()) <= {0, 11, 31, 222}
    assert [p.name for p in out.parent.iterdir()] == ["T31TCJ.tif"]  # no staging/temp left


def test_codes_above_255_make_a_uint16_map_with_its_colour_table(tmp_path):
    """A crop-type nomenclature: the map is uint16 (GDAL gives GTiff uint16 colour tables), with
    every class's colour, MODE overviews of existing codes only; under 256 it stays a byte."""
    crops = [ClassDef(1110, "WWH", "Winter wheat", "#ffd700"), ClassDef(9120, "GRA", "Grassland", "#55ff00"),
             ClassDef(11, "ASC", "Annual summer crops", "#ff5500")]  # fmt: skip
    grid = make_grid(1100, 900)
    labels = np.random.default_rng(0).choice(np.array([0, 11, 1110, 9120], np.uint16), (900, 1100))
    out = tmp_path / "crops.tif"
    write_class_map(out, grid, crops, labels)
    with rasterio.open(out) as src:
        assert src.dtypes[0] == "uint16" and src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        cmap = src.colormap(1)
        assert cmap[1110] == (0xFF, 0xD7, 0x00, 255) and cmap[9120] == (0x55, 0xFF, 0x00, 255)
        assert cmap[0][3] == 0 and cmap[11] == (0xFF, 0x55, 0x00, 255)
        np.testing.assert_array_equal(src.read(1), labels)
        assert src.overviews(1)
        assert set(np.unique(src.read(1, out_shape=(450, 550))).tolist()) <= {0, 11, 1110, 9120}
    write_class_map(tmp_path / "small.tif", grid, CLASSES, labels.clip(0, 11).astype(np.uint8))
    with rasterio.open(tmp_path / "small.tif") as src:
        assert src.dtypes[0] == "uint8"


def test_failed_write_leaves_nothing(tmp_path):
    grid = make_grid(64, 64)
    out = tmp_path / "m.tif"
    with pytest.raises(RuntimeError), class_map_writer(out, grid, CLASSES) as sink:
        sink.write(rasterio.windows.Window(0, 0, 64, 64), np.ones((64, 64), np.uint8))
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_validity_cog(tmp_path):
    grid = make_grid(700, 600)
    counts = np.random.default_rng(1).integers(0, 40, (600, 700)).astype(np.uint16)
    g = create_store(tmp_path / "g.zarr", "gapfilled", grid, tile="T31TCJ", dates=["2018-01-05"] * 3)
    add_array(g, "clear_count", (600, 700), "uint16", 0)[...] = counts
    out = tmp_path / "validity" / "T31TCJ.tif"
    write_validity(tmp_path / "g.zarr", out)
    with rasterio.open(out) as src:
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.overviews(1)
        assert src.nodata is None  # 0 clear observations is information, not no-data
        assert src.dtypes[0] == "uint16"
        assert src.crs == grid.crs and src.transform.almost_equals(grid.transform)
        np.testing.assert_array_equal(src.read(1), counts)
        ov = src.read(1, out_shape=(300, 350)).astype(float)
        assert abs(ov.mean() - counts.mean()) < 0.5  # averaged overview


def test_confidence_overviews_are_mean_confidences(tmp_path):
    """The overviews of a paletted confidence COG average the values, not the palette's colours
    (GDAL does the latter when the colour table is there before the overviews are built: off by up
    to 24 points on this test before the fix)."""
    from pipeline.io.cog import confidence_writer, overview_factors

    rng = np.random.default_rng(1)
    values = rng.integers(0, 101, (1100, 1100)).astype(np.uint8)
    grid = make_grid(1100, 1100)
    with confidence_writer(tmp_path / "conf.tif", grid) as sink:
        sink.write(Window(0, 0, 1100, 1100), values)
    with rasterio.open(tmp_path / "conf.tif") as src:
        assert src.overviews(1) == overview_factors(1100, 1100) == [2, 4]
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert src.colormap(1)[100][:3] == (0, 255, 0)  # the colour table is still there
        ov = src.read(1, out_shape=(550, 550), resampling=Resampling.nearest)
    mean = values.astype(float).reshape(550, 2, 550, 2).mean((1, 3))
    assert np.abs(ov - mean).max() <= 0.5


def _writers(tmp_path, grid):
    return [
        cog_writer(tmp_path / f"{name}.tif", grid, "uint16", nodata=0, resampling="AVERAGE")
        for name in ("a", "b", "c")
    ]


def test_parallel_sinks_write_what_one_writer_writes(tmp_path):
    grid = make_grid(1200, 700)
    data = np.arange(700 * 1200, dtype=np.uint32).reshape(700, 1200) % 60000 + 1
    with contextlib.ExitStack() as stack:
        sinks = stack.enter_context(parallel_sinks(*_writers(tmp_path, grid), depth=2))
        for win in iter_windows(700, 1200, 256):
            for k, sink in enumerate(sinks):
                sink.write(win, (data[win_slices(win)] + k).astype(np.uint16))
    with cog_writer(tmp_path / "one.tif", grid, "uint16", nodata=0, resampling="AVERAGE") as sink:
        for win in iter_windows(700, 1200, 256):
            sink.write(win, (data[win_slices(win)] + 1).astype(np.uint16))
    with rasterio.open(tmp_path / "b.tif") as b, rasterio.open(tmp_path / "one.tif") as one:
        assert b.profile == one.profile and b.overviews(1) == one.overviews(1)
        np.testing.assert_array_equal(b.read(1), one.read(1))
        np.testing.assert_array_equal(b.read(1, out_shape=(88, 150)), one.read(1, out_shape=(88, 150)))


def test_parallel_sinks_leave_nothing_when_the_caller_or_a_writer_fails(tmp_path):
    grid = make_grid(600, 400)
    win = Window(0, 0, 256, 256)
    with pytest.raises(RuntimeError, match="caller"), parallel_sinks(*_writers(tmp_path, grid)) as sinks:
        for sink in sinks:
            sink.write(win, np.ones((256, 256), np.uint16))
        raise RuntimeError("caller")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # a window of the wrong shape fails in writer "b" only; the caller goes on writing meanwhile
    with pytest.raises(ValueError), parallel_sinks(*_writers(tmp_path, grid)) as sinks:
        for _ in range(20):
            sinks[0].write(win, np.ones((256, 256), np.uint16))
            sinks[1].write(win, np.ones((3, 256, 256, 2), np.uint16))
            sinks[2].write(win, np.ones((256, 256), np.uint16))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _mode_by_hand(a: np.ndarray, nodata: int) -> np.ndarray:
    """Each 2x2 cell's most frequent valid value, the first in row-major order on a tie."""
    h, w = -(-a.shape[0] // 2), -(-a.shape[1] // 2)
    out = np.full((h, w), nodata, a.dtype)
    for r in range(h):
        for c in range(w):
            cell = [v for v in a[2 * r : 2 * r + 2, 2 * c : 2 * c + 2].ravel() if v != nodata]
            if cell:
                out[r, c] = max(cell, key=lambda v: (cell.count(v), -cell.index(v)))
    return out


def test_mode2x2_against_a_hand_count():
    from pipeline.io.cog import mode2x2

    rng = np.random.default_rng(4)
    for shape in ((8, 8), (7, 9), (1, 5)):
        a = rng.integers(0, 4, shape).astype(np.uint8)  # 0 is no-data: many ties and empty cells
        np.testing.assert_array_equal(mode2x2(a, 0), _mode_by_hand(a, 0))


def test_streamed_overviews_are_the_mode_and_the_exact_mean_of_the_base(tmp_path):
    """Written block by block (as the mosaic does), the overview levels equal, at every level, the
    hierarchical mode of the class map and the mean of the valid base pixels (rounded half up)."""
    from pipeline.io.cog import confidence_writer, overview_factors

    h, w = 2300, 1700  # 3 levels, odd edges
    grid = make_grid(w, h)
    rng = np.random.default_rng(2)
    classes = np.repeat(np.repeat(rng.integers(1, 6, (h // 8 + 1, w // 8 + 1)), 8, 0), 8, 1)[:h, :w]
    classes = np.where(rng.random((h, w)) < 0.2, rng.integers(0, 6, (h, w)), classes)
    classes = np.array([0, 11, 31, 222, 11, 31], np.uint8)[classes]  # the nomenclature's codes, 0 no data
    conf = rng.integers(0, 101, (h, w)).astype(np.uint8)
    conf[rng.random((h, w)) < 0.1] = 255
    with (
        class_map_writer(tmp_path / "c.tif", grid, CLASSES, stream_overviews=True) as cs,
        confidence_writer(tmp_path / "f.tif", grid, stream_overviews=True) as fs,
    ):
        for win in iter_windows(h, w, 1024):
            cs.write(win, classes[win_slices(win)])
            fs.write(win, conf[win_slices(win)])
    factors = overview_factors(w, h)
    assert factors == [2, 4, 8]
    with rasterio.open(tmp_path / "c.tif") as c, rasterio.open(tmp_path / "f.tif") as f:
        assert c.overviews(1) == f.overviews(1) == factors and c.colormap(1)[11][:3] == CLASSES[0].rgb
        np.testing.assert_array_equal(c.read(1), classes)
        level, valid, total = (
            classes,
            (conf != 255).astype(np.int64),
            np.where(conf != 255, conf, 0).astype(float),
        )
        for i, fac in enumerate(factors):
            level = _mode_by_hand(level, 0) if fac <= 2 else _mode_fast(level)
            shape = (-(-h // fac), -(-w // fac))
            with rasterio.open(tmp_path / "c.tif", OVERVIEW_LEVEL=i) as ov:
                np.testing.assert_array_equal(ov.read(1), level)
            cnt = _block_sum(valid, fac)
            mean = np.where(cnt > 0, np.floor(_block_sum(total, fac) / np.maximum(cnt, 1) + 0.5), 255)
            with rasterio.open(tmp_path / "f.tif", OVERVIEW_LEVEL=i) as ov:
                assert ov.read(1).shape == shape
                np.testing.assert_array_equal(ov.read(1), mean.astype(np.uint8))


def _mode_fast(a):
    from pipeline.io.cog import mode2x2

    return mode2x2(a, 0)  # checked against the hand count above


def _block_sum(a: np.ndarray, f: int) -> np.ndarray:
    h, w = -(-a.shape[0] // f), -(-a.shape[1] // f)
    pad = np.zeros((h * f, w * f), a.dtype)
    pad[: a.shape[0], : a.shape[1]] = a
    return pad.reshape(h, f, w, f).sum((1, 3))


def test_a_window_off_the_overview_cells_falls_back_to_gdal(tmp_path):
    grid = make_grid(1100, 1100)
    data = (np.arange(1100 * 1100) % 50 + 1).astype(np.uint16).reshape(1100, 1100)
    with cog_writer(
        tmp_path / "a.tif", grid, "uint16", nodata=0, resampling="AVERAGE", stream_overviews=True
    ) as s:
        s.write(Window(0, 0, 1100, 300), data[:300])
        s.write(Window(0, 300, 1100, 800), data[300:])  # row 300: not on the 4-px cells
    with rasterio.open(tmp_path / "a.tif") as src:
        assert src.overviews(1) == [2, 4]
        np.testing.assert_array_equal(src.read(1), data)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tif"]  # no staging level left behind


@pytest.mark.parametrize("kind", ["MODE", "AVERAGE"])
@pytest.mark.parametrize(
    ("dtype", "nodata"), [("uint8", 0), ("uint8", 255), ("uint16", 65535), ("uint16", None)]
)
def test_compiled_overview_levels_equal_the_numpy_ones(tmp_path, kind, dtype, nodata):
    """The pyramid's compiled kernels give the numpy levels (themselves checked against hand counts
    above) on random blocks with odd sides, no-data, ties and empty cells, at every level."""
    from pipeline.io.cog import _Pyramid

    grid = make_grid(300, 300)
    pyr = _Pyramid(tmp_path / "s.tif", grid, dtype, nodata, kind, [2, 4, 8, 16])
    rng = np.random.default_rng(7)
    top = 4 if kind == "MODE" else np.iinfo(dtype).max
    for shape in ((64, 64), (37, 53), (1, 9), (300, 211)):
        a = rng.integers(0, top, shape, endpoint=True).astype(dtype)
        if nodata is not None:
            a[rng.random(shape) < 0.3] = nodata
            a[:4, :4] = nodata  # an empty cell at every level
        got, want = pyr.levels(a), pyr.levels_numpy(a)
        assert len(got) == len(want) == 4
        for g, w in zip(got, want, strict=True):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(g, w)
    pyr.unlink()


def test_float_overview_levels_take_the_numpy_path(tmp_path):
    from pipeline.io.cog import _Pyramid

    pyr = _Pyramid(tmp_path / "s.tif", make_grid(40, 40), "float32", None, "AVERAGE", [2, 4])
    a = np.arange(35 * 33, dtype=np.float32).reshape(35, 33) / 7
    got = pyr.levels(a)
    assert got[0].dtype == np.float32 and got[0][0, 0] == np.floor((0 + 1 + 33 + 34) / 7 / 4 + 0.5)
    pyr.unlink()
