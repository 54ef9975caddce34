"""National mosaic: arbitration on hand-drawn overlapping tiles, the national grid's checks, true
pixel areas against geodesic polygons, and tiles in two UTM zones against an independent lookup."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from pyproj import Geod, Transformer
from rasterio.crs import CRS
from rasterio.windows import Window

from pipeline.config import ClassDef
from pipeline.errors import PipelineError
from pipeline.io.cog import CONFIDENCE_NODATA, cog_writer, confidence_writer, margin_writer, write_class_map
from pipeline.io.tilestore import Grid
from pipeline.mosaic import (
    CLEAR_NODATA,
    AreaTally,
    TileLayers,
    _centres,
    _dist2,
    arbitrate,
    build_mosaic,
    cell_areas,
    fuse_block,
    national_grid,
    pixel_areas,
    take,
)

CLASSES = [ClassDef(c, f"C{c}", f"class {c}", f"#{c:02x}{(3 * c) % 256:02x}40") for c in range(1, 251)]
UTM31 = CRS.from_epsg(32631)


def _grid(ulx: float, uly: float, w: int, h: int, res: float = 10.0, crs: CRS = UTM31) -> Grid:
    return Grid(crs, Affine(res, 0, ulx, 0, -res, uly), w, h)


def _tile(
    tmp: Path, name: str, grid: Grid, classes: np.ndarray, conf=None, clear=None, margin=None
) -> TileLayers:
    """Write one tile's three layers (class map, confidence, clear count), and its margin layer when
    given, as the chain does."""
    layers = TileLayers(
        name,
        tmp / f"{name}.tif",
        tmp / f"{name}_conf.tif",
        tmp / f"{name}_clear.tif",
        None if margin is None else tmp / f"{name}_margin.tif",
    )
    if margin is not None:
        with margin_writer(layers.margin, grid) as sink:
            sink.write(Window(0, 0, grid.width, grid.height), margin)
    write_class_map(layers.classes, grid, CLASSES, classes.astype(np.uint8))
    conf = np.full(classes.shape, 50, np.uint8) if conf is None else conf
    clear = np.full(classes.shape, 7, np.uint16) if clear is None else clear
    with confidence_writer(layers.confidence, grid) as sink:
        sink.write(Window(0, 0, grid.width, grid.height), conf)
    with cog_writer(layers.clear, grid, "uint16", nodata=None, resampling="AVERAGE") as sink:
        sink.write(Window(0, 0, grid.width, grid.height), clear)
    return layers


def _read(path: Path) -> tuple[np.ndarray, rasterio.Affine, CRS]:
    with rasterio.open(path) as src:
        return src.read(1), src.transform, src.crs


# --- arbitration, by hand ---------------------------------------------------------------------


def _reference_block(stacks, centres, grid, win, tally):
    """The numpy path :func:`fuse_block` replaces: arbitrate, take each layer, tally."""
    cls, conf, clear, extra = stacks
    idx = arbitrate(cls != 0, _dist2(grid, win, centres))
    out = (take(cls, idx, 0), take(conf, idx, CONFIDENCE_NODATA), take(clear, idx, CLEAR_NODATA))
    tally.add(out[0], cell_areas(grid, win), out[1])
    return (*out, None if extra is None else take(extra, idx, CONFIDENCE_NODATA))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_fused_block_equals_the_numpy_path(k, dtype):
    """The compiled pass gives the numpy functions' layers and tally exactly: random stacks with
    no-data holes, tiles equidistant from some pixels (ties go to the first tile), a block off the
    16-px area lattice, and (uint16 maps) a code outside the nomenclature, counted by numpy."""
    rng = np.random.default_rng(k)
    grid = _grid(300000, 5000000, 400, 300)
    win = Window(37, 21, 83, 61)
    codes = [1, 2, 3, 7, 200] + ([300] if dtype is np.uint16 else [])
    pool = np.array([0, 0, *codes] + ([4000] if dtype is np.uint16 else []), dtype)
    cls = pool[rng.integers(0, pool.size, (k, 61, 83))]
    conf = rng.integers(0, 256, (k, 61, 83)).astype(np.uint8)  # 255 (no data) included
    clear = rng.integers(0, 65536, (k, 61, 83)).astype(np.uint16)
    extra = rng.integers(0, 256, (k, 61, 83)).astype(np.uint8)
    x, y = _centres(grid, win)
    # tile 1's centre mirrors tile 0's about a column of pixel centres: ties along it
    centres = [(x[40] - 500.0, y[30]), (x[40] + 500.0, y[30]), (x[0], y[0]), (x[-1], y[-1])][:k]
    for with_extra in (True, False):
        got_t, want_t = AreaTally(4001, codes), AreaTally(4001, codes)
        stacks = (cls, conf, clear, extra if with_extra else None)
        got = fuse_block(*stacks, centres, x, y, cell_areas(grid, win), got_t)
        want = _reference_block(stacks, centres, grid, win, want_t)
        for g, w in zip(got, want, strict=True):
            assert (g is None) == (w is None)
            if g is not None:
                assert g.dtype == w.dtype and np.array_equal(g, w)
        for field in ("pixels", "conf_n", "conf_sum"):
            assert np.array_equal(getattr(got_t, field), getattr(want_t, field)), field
        np.testing.assert_allclose(got_t.area_m2, want_t.area_m2, rtol=1e-12)
    if k == 2:  # the ties happened and went to tile 0
        both = (cls[0] != 0) & (cls[1] != 0)
        assert both[:, 40].any() and np.array_equal(got[0][both[:, 40], 40], cls[0][both[:, 40], 40])


def test_arbitrate_takes_the_nearest_tile_with_data():
    has = np.array(
        [
            [[1, 1, 1, 0]],  # tile 0
            [[1, 1, 1, 1]],  # tile 1
            [[0, 0, 0, 0]],  # tile 2: no data anywhere here
        ],
        bool,
    )
    d2 = np.array([[[1.0, 4.0, 9.0, 1.0]], [[9.0, 4.0, 1.0, 9.0]], [[0.0, 0.0, 0.0, 0.0]]])
    # px 0: tile 0 nearer; px 1: a tie goes to the first tile; px 2: tile 1 nearer;
    # px 3: tile 0 nearer but without data -> tile 1; tile 2 is nearest everywhere but has no data
    assert arbitrate(has, d2).tolist() == [[0, 0, 1, 1]]
    none = np.zeros((2, 1, 3), bool)
    assert arbitrate(none, np.zeros((2, 1, 3))).tolist() == [[-1, -1, -1]]
    layers = np.array([[[5, 6, 7, 8]], [[50, 60, 70, 80]], [[0, 0, 0, 0]]])
    assert take(layers, np.array([[0, -1, 1, 2]]), 255).tolist() == [[5, 255, 70, 0]]


def test_overlapping_tiles_split_at_the_midline_and_fill_each_others_gaps(tmp_path):
    # two 10x6 tiles, B 6 px right of A: columns 6-9 of A overlap columns 0-3 of B. Centres at
    # x = 50 (A) and x = 110 (B) m: the midline is x = 80, so mosaic columns 0-7 come from A, 8-15 from B
    a = np.full((6, 10), 3, np.uint8)
    b = np.full((6, 10), 9, np.uint8)
    a[2, 9] = 0  # A has no data at mosaic column 9: B fills it (B's side anyway)
    a[4, 7] = 0  # ... and at column 7 (A's side): B fills it
    b[1, 0] = 0  # B has no data at mosaic column 6 (A's side: A is used anyway)
    b[3, 9] = 0  # nor at column 15, where only B covers: no data in the mosaic
    ta = _tile(tmp_path, "T31AAA", _grid(0, 60, 10, 6), a, conf=np.full((6, 10), 80, np.uint8))
    tb = _tile(
        tmp_path,
        "T31BBB",
        _grid(60, 60, 10, 6),
        b,
        conf=np.full((6, 10), 20, np.uint8),
        clear=np.full((6, 10), 3, np.uint16),
    )
    out = [tmp_path / "m" / n for n in ("classes.tif", "confidence.tif", "clear.tif")]
    res = build_mosaic([tb, ta], CLASSES, *out)  # order given does not matter

    expect = np.zeros((6, 16), np.uint8)
    expect[:, :8] = 3
    expect[:, 8:] = 9
    expect[4, 7] = 9
    expect[3, 15] = 0
    cls, transform, crs = _read(out[0])
    assert crs == UTM31 and transform == Affine(10, 0, 0, 0, -10, 60)
    np.testing.assert_array_equal(cls, expect)
    conf = _read(out[1])[0]
    np.testing.assert_array_equal(
        conf, np.where(expect == 3, 80, np.where(expect == 9, 20, CONFIDENCE_NODATA))
    )
    clear = _read(out[2])[0]
    np.testing.assert_array_equal(clear, np.where(expect == 3, 7, np.where(expect == 9, 3, CLEAR_NODATA)))
    # counted once: 16 x 6 - 1 px mapped, not 2 x 60 - 4
    assert res.tally.pixels[3] == (expect == 3).sum() and res.tally.pixels[9] == (expect == 9).sum()
    with rasterio.open(out[0]) as src:
        assert src.nodata == 0 and src.colormap(1)[3][:3] == CLASSES[2].rgb
        assert src.tags()["TILES"] == "T31AAA,T31BBB"


def test_the_margin_mosaic_follows_the_class_arbitration(tmp_path):
    """The uncertainty layer comes from the tile whose class a pixel shows, in every block size; a
    tile without its margin layer is refused by name."""
    a = np.full((6, 10), 3, np.uint8)
    b = np.full((6, 10), 9, np.uint8)
    a[4, 7] = 0  # A has no data on its side of the midline: B fills class and margin there
    b[3, 9] = 0  # nor B at mosaic column 15: no data in either layer
    ma = np.arange(60, dtype=np.uint8).reshape(6, 10)  # each pixel its own margin
    mb = (40 + np.arange(60)).astype(np.uint8).reshape(6, 10)
    ta = _tile(tmp_path, "T31AAA", _grid(0, 60, 10, 6), a, margin=ma)
    tb = _tile(tmp_path, "T31BBB", _grid(60, 60, 10, 6), b, margin=mb)
    expect = np.full((6, 16), CONFIDENCE_NODATA, np.uint8)
    expect[:, :8] = ma[:, :8]
    expect[:, 8:] = mb[:, 2:]
    expect[4, 7] = mb[4, 1]
    expect[3, 15] = CONFIDENCE_NODATA
    for block in (4096, 3):
        out = [tmp_path / f"m{block}" / n for n in ("c.tif", "f.tif", "k.tif")]
        margin = tmp_path / f"m{block}" / "margin.tif"
        build_mosaic([tb, ta], CLASSES, *out, out_margin=margin, block=block)
        np.testing.assert_array_equal(_read(margin)[0], expect)
        np.testing.assert_array_equal(_read(out[0])[0] == 0, expect == CONFIDENCE_NODATA)
        with rasterio.open(margin) as src:
            assert src.nodata == CONFIDENCE_NODATA and "margin" in src.tags()["MEANING"]
    (tmp_path / "bare").mkdir()
    bare = _tile(tmp_path / "bare", "T31BBB", _grid(60, 60, 10, 6), b)
    out = [tmp_path / "m2" / n for n in ("c.tif", "f.tif", "k.tif")]
    with pytest.raises(PipelineError, match="tile T31BBB: no margin layer"):
        build_mosaic([ta, bare], CLASSES, *out, out_margin=tmp_path / "m2" / "margin.tif")


def test_the_mosaic_streams_in_blocks_with_the_same_result(tmp_path):
    """Blocks smaller than the tiles (and not dividing them) give the one-block mosaic."""
    rng = np.random.default_rng(0)
    layers = [
        _tile(tmp_path, f"T31A{i}A", _grid(x, y, 40, 30), rng.integers(1, 6, (30, 40)))
        for i, (x, y) in enumerate([(0, 300), (330, 300), (150, 120)])
    ]
    one = [tmp_path / "one" / n for n in ("c.tif", "f.tif", "k.tif")]
    many = [tmp_path / "many" / n for n in ("c.tif", "f.tif", "k.tif")]
    r1 = build_mosaic(layers, CLASSES, *one, block=4096)
    r2 = build_mosaic(layers, CLASSES, *many, block=7)
    for p, q in zip(one, many, strict=True):
        np.testing.assert_array_equal(_read(p)[0], _read(q)[0])
    np.testing.assert_array_equal(r1.tally.pixels[1:], r2.tally.pixels[1:])  # 0: no data
    np.testing.assert_allclose(r1.tally.area_m2[1:], r2.tally.area_m2[1:], rtol=1e-12)


# --- the national grid ------------------------------------------------------------------------


def test_national_grid_is_the_union_on_the_tiles_pixel_grid():
    g = national_grid({"A": _grid(300000, 5000000, 100, 80), "B": _grid(300500, 4999400, 50, 50)})
    assert g.crs == UTM31 and g.transform == Affine(10, 0, 300000, 0, -10, 5000000)
    assert (g.width, g.height) == (100, 110)


def test_a_tile_off_the_grid_is_refused_naming_it():
    with pytest.raises(PipelineError, match=r"B.tif: tile B's grid is offset by \(3.000, 0.000\) m"):
        national_grid(
            {"A": _grid(300000, 5000000, 10, 10), "B": _grid(300103, 5000000, 10, 10)},
            sources={"B": "B.tif"},
        )
    with pytest.raises(PipelineError, match="tile B has 20 m pixels"):
        national_grid({"A": _grid(300000, 5000000, 10, 10), "B": _grid(300100, 5000000, 10, 10, res=20)})


def test_tiles_in_two_crss_need_a_national_crs():
    grids = {
        "A": _grid(600000, 5000000, 10, 10),
        "B": _grid(300000, 5000000, 10, 10, crs=CRS.from_epsg(32632)),
    }
    with pytest.raises(PipelineError, match="tiles are in 2 CRSs .* set mosaic.crs"):
        national_grid(grids)
    with pytest.raises(PipelineError, match="must be a projected CRS in metres"):
        national_grid(grids, "EPSG:4326")
    with pytest.raises(PipelineError, match="not a CRS GDAL knows"):
        national_grid(grids, "EPSG:999999")
    g = national_grid(grids, "EPSG:32631")
    assert g.crs == UTM31 and g.transform.c % 10 == 0 and g.transform.f % 10 == 0


# --- true pixel areas -------------------------------------------------------------------------


def _geodesic_pixel_area(transform: Affine, crs: CRS, row: int, col: int) -> float:
    """Area of one pixel on the WGS84 ellipsoid: its outline (densified) as a geodesic polygon."""
    t = np.linspace(0, 1, 9)
    ring = np.concatenate(
        [
            np.c_[col + t, np.full_like(t, row)],
            np.c_[np.full_like(t, col + 1), row + t],
            np.c_[col + 1 - t, np.full_like(t, row + 1)],
            np.c_[np.full_like(t, col), row + 1 - t],
        ]
    )
    x, y = transform @ (ring[:, 0], ring[:, 1])
    lon, lat = Transformer.from_crs(crs.to_wkt(), "EPSG:4326", always_xy=True).transform(x, y)
    area, _ = Geod(ellps="WGS84").polygon_area_perimeter(lon, lat)
    return abs(area)


@pytest.mark.parametrize(
    ("crs", "ulx", "uly"),
    [
        (32631, 199980.0, 5000040.0),  # far west of the central meridian: scale 1.0005
        (32631, 499980.0, 4400000.0),  # on it: scale 0.9996
        (2154, 650000.0, 6860000.0),  # Lambert-93 (Paris)
        (3035, 3800000.0, 2900000.0),  # ETRS89-LAEA, equal area: every pixel 100 m²
    ],
)
def test_pixel_areas_match_geodesic_polygons(crs, ulx, uly):
    c = CRS.from_epsg(crs)
    g = _grid(ulx, uly, 40, 40, crs=c)
    areas = pixel_areas(g, Window(0, 0, 40, 40))
    for r, col in [(0, 0), (5, 33), (39, 39), (20, 7)]:
        oracle = _geodesic_pixel_area(g.transform, c, r, col)
        assert areas[r, col] == pytest.approx(oracle, rel=2e-6), (r, col)
    if crs == 3035:
        np.testing.assert_allclose(areas, 100.0, rtol=2e-6)
    else:  # a conformal projection: the true area is not the grid's 100 m²
        assert abs(areas.mean() - 100.0) > 0.02


def test_area_tally_sums_areas_and_confidence_per_class():
    tally = AreaTally(6)
    codes = np.array([[1, 1, 5], [0, 5, 5]])
    areas = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    conf = np.array([[10, 20, 30], [99, CONFIDENCE_NODATA, 60]], np.uint8)
    tally.add(codes, areas, conf)
    assert tally.pixels.tolist() == [1, 2, 0, 0, 0, 3]
    assert tally.area_m2.tolist() == [4.0, 3.0, 0, 0, 0, 14.0]
    assert tally.conf_sum[5] / tally.conf_n[5] == 45.0  # the no-data confidence is left out


def test_the_cell_tally_equals_the_pixel_tally():
    """The (cell, code) and (code, confidence) bincounts give the per-pixel weighted bincounts'
    counts, areas and confidence sums, on a window across cell edges and in a far CRS."""
    g = Grid(CRS.from_epsg(32631), Affine(10, 0, 699960, 0, -10, 5500000), 700, 500)
    win = Window(37, 91, 300, 200)  # not on the 16-px lattice
    rng = np.random.default_rng(3)
    codes = rng.choice([0, 11, 12, 41, 211], size=(200, 300)).astype(np.uint8)
    conf = rng.integers(0, 101, (200, 300)).astype(np.uint8)
    conf[rng.random((200, 300)) < 0.1] = CONFIDENCE_NODATA
    by_pixel, by_cell = AreaTally(256), AreaTally(256, [11, 12, 41, 211])
    by_pixel.add(codes, pixel_areas(g, win), conf)
    by_cell.add(codes, cell_areas(g, win), conf)
    assert by_cell.pixels.tolist() == by_pixel.pixels.tolist()
    np.testing.assert_allclose(by_cell.area_m2, by_pixel.area_m2, rtol=1e-12)
    assert by_cell.conf_sum.tolist() == by_pixel.conf_sum.tolist()
    assert by_cell.conf_n.tolist() == by_pixel.conf_n.tolist()
    assert by_cell.area_m2[11] != pytest.approx(
        100.0 * by_cell.pixels[11], rel=1e-4
    )  # true areas, not 100 m²
    codes[5, 5] = 99  # a value that is no class: that block is counted pixel by pixel, the same way
    by_pixel.add(codes, pixel_areas(g, win), conf)
    by_cell.add(codes, cell_areas(g, win), conf)
    assert by_cell.pixels[99] == 1 and by_cell.pixels.tolist() == by_pixel.pixels.tolist()
    np.testing.assert_allclose(by_cell.area_m2, by_pixel.area_m2, rtol=1e-12)


# --- two UTM zones ----------------------------------------------------------------------------


def test_tiles_in_two_utm_zones_are_reprojected_by_nearest_neighbour(tmp_path):
    """A zone-31 tile and a zone-32 tile straddling 6° E, mosaicked in zone 31: each mosaic pixel
    holds the value of the source pixel its centre falls in (an independent pyproj lookup)."""
    w = h = 60
    codes = (1 + np.arange(w * h).reshape(h, w) % 250).astype(np.uint8)  # every pixel its own code
    # zone 31 tile ends at ~6.0 E (x 740,000 at 45.5 N); the zone-32 tile starts just west of 6 E
    g31 = _grid(739500, 5041000, w, h)
    x32, y32 = Transformer.from_crs(32631, 32632, always_xy=True).transform(739800, 5040800)
    z32 = CRS.from_epsg(32632)
    g32 = _grid(round(x32, -1), round(y32, -1), w, h, crs=z32)
    t31 = _tile(tmp_path, "T31TGL", g31, codes)
    t32 = _tile(tmp_path, "T32TKR", g32, codes[::-1].copy())
    out = [tmp_path / "m" / n for n in ("c.tif", "f.tif", "k.tif")]
    res = build_mosaic([t31, t32], CLASSES, *out, crs="EPSG:32631")
    assert res.reprojected == ["T32TKR"]
    mosaic, tr, crs = _read(out[0])
    assert crs == UTM31 and tr.c % 10 == 0

    rows, cols = np.mgrid[0 : mosaic.shape[0], 0 : mosaic.shape[1]]
    x, y = tr @ (cols + 0.5, rows + 0.5)
    # which tile: the nearest centre among those that contain the pixel (both in zone-31 metres)
    c31 = np.array(g31.transform @ (w / 2, h / 2))
    c32 = np.array(
        Transformer.from_crs(32632, 32631, always_xy=True).transform(*(g32.transform @ (w / 2, h / 2)))
    )
    x2, y2 = Transformer.from_crs(32631, 32632, always_xy=True).transform(x, y)
    col32, row32 = ~g32.transform @ (x2, y2)
    col31, row31 = ~g31.transform @ (x, y)
    in31 = (col31 >= 0) & (col31 < w) & (row31 >= 0) & (row31 < h)
    in32 = (col32 >= 0) & (col32 < w) & (row32 >= 0) & (row32 < h)
    d31 = (x - c31[0]) ** 2 + (y - c31[1]) ** 2
    d32 = (x - c32[0]) ** 2 + (y - c32[1]) ** 2
    use32 = in32 & (~in31 | (d32 < d31))
    expect = np.zeros_like(mosaic)
    expect[in31 & ~use32] = codes[row31[in31 & ~use32].astype(int), col31[in31 & ~use32].astype(int)]
    flipped = codes[::-1]
    expect[use32] = flipped[row32[use32].astype(int), col32[use32].astype(int)]
    assert use32.sum() > 1000 and (in31 & ~use32).sum() > 1000  # both tiles feed the mosaic
    # GDAL's warper approximates the transform to 1/8 px: pixels on a source pixel's edge may differ
    agree = (mosaic == expect).mean()
    assert agree > 0.995, agree
    # the areas: every mapped pixel once, each at its true (zone-31, off-meridian) area
    assert res.tally.pixels[1:].sum() == (mosaic > 0).sum()


# --- bad input --------------------------------------------------------------------------------


def test_a_missing_tile_map_names_the_tile(tmp_path):
    a = _tile(tmp_path, "T31AAA", _grid(0, 60, 10, 6), np.ones((6, 10)))
    gone = TileLayers("T31ZZZ", tmp_path / "nope.tif", a.confidence, a.clear)
    out = [tmp_path / "m" / n for n in ("c.tif", "f.tif", "k.tif")]
    with pytest.raises(PipelineError, match="nope.tif: tile T31ZZZ: its class map is missing"):
        build_mosaic([a, gone], CLASSES, *out)
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").iterdir())


def test_mosaic_stage_writes_areas_and_summary(tmp_path, monkeypatch):
    """The CLI stage on two tiles: areas.csv sums to the mapped pixels' true areas, once."""
    import yaml

    from pipeline.cli import main
    from tests.conftest import tiny_demo_config

    raw = tiny_demo_config()
    raw["run"]["workdir"] = str(tmp_path / "w")
    cfgfile = tmp_path / "config.yaml"
    cfgfile.write_text(yaml.safe_dump(raw))
    from pipeline.config import load_config
    from pipeline.layout import Layout

    cfg = load_config(cfgfile)
    lay = Layout(cfg.workdir)
    tiles = list(cfg.tiles)
    codes = [c.code for c in cfg.classes]
    for i, t in enumerate(tiles):
        g = _grid(300000 + i * 400, 5000000, 50, 40)
        lab = np.full((40, 50), codes[i % len(codes)], np.uint16)
        lay.class_map("rf", t).parent.mkdir(parents=True, exist_ok=True)
        write_class_map(lay.class_map("rf", t), g, cfg.classes, lab)
        with confidence_writer(lay.confidence("rf", t), g) as sink:
            sink.write(Window(0, 0, 50, 40), np.full((40, 50), 90, np.uint8))
        lay.validity(t).parent.mkdir(parents=True, exist_ok=True)
        with cog_writer(lay.validity(t), g, "uint16", nodata=None, resampling="AVERAGE") as sink:
            sink.write(Window(0, 0, 50, 40), np.full((40, 50), 5, np.uint16))
    assert main(["mosaic", "--config", str(cfgfile), "--model", "rf"]) == 0
    with open(lay.mosaic("rf", "areas")) as f:
        rows = list(csv.DictReader(f))
    summary = json.loads(lay.mosaic("rf", "summary").read_text())
    # two 50x40 tiles 400 m apart, 100 m overlap: 90 columns x 40 rows mapped once
    assert summary["mapped_pixels"] == 90 * 40 == sum(int(r["pixels"]) for r in rows)
    oracle = _geodesic_pixel_area(Affine(10, 0, 300000, 0, -10, 5000000), UTM31, 20, 45)
    total = sum(float(r["area_ha"]) for r in rows)
    assert total == pytest.approx(90 * 40 * oracle / 1e4, rel=1e-5)
    assert sum(float(r["grid_area_ha"]) for r in rows) == pytest.approx(90 * 40 * 100 / 1e4)
    assert sum(float(r["share"]) for r in rows) == pytest.approx(1.0, abs=1e-5)
