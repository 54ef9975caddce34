"""Regional statistics: hand-counted regions on a hand-drawn mosaic, regional areas adding up to the
national ones, the regions layer's checks, and the demo's regions."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import shapely
from rasterio.crs import CRS

from pipeline.errors import PipelineError
from pipeline.mosaic import build_mosaic
from pipeline.regions import OUTSIDE, read_regions, region_rows, tally_regions, write_layer
from tests.test_mosaic import CLASSES, UTM31, _grid, _tile


def _regions(tmp_path, polygons, crs="EPSG:32631", **fields):
    path = tmp_path / "regions.gpkg"
    data = {
        "id": [f"R{i}" for i in range(len(polygons))],
        "name": [f"region {i}" for i in range(len(polygons))],
    }
    data |= fields
    gpd.GeoDataFrame(data, geometry=polygons, crs=crs).to_file(path, engine="pyogrio")
    return path


@pytest.fixture
def mosaic(tmp_path):
    """One 20x10 tile at x 0-200, y 0-100 m: classes 1 (left 8 columns) and 2, clear counts 2 on
    row 0 and 9 elsewhere, confidence 40 / 80."""
    codes = np.where(np.arange(20)[None, :] < 8, 1, 2).repeat(10, axis=0).astype(np.uint8)
    clear = np.full((10, 20), 9, np.uint16)
    clear[0] = 2
    conf = np.where(codes == 1, 40, 80).astype(np.uint8)
    layers = _tile(tmp_path, "T31AAA", _grid(0, 100, 20, 10), codes, conf=conf, clear=clear)
    out = [tmp_path / "m" / n for n in ("classes.tif", "confidence.tif", "clear.tif")]
    res = build_mosaic([layers], CLASSES, *out, block=7)
    return out, res


def test_regions_are_counted_by_pixel_centre_and_add_up_to_the_nation(tmp_path, mosaic):
    out, res = mosaic
    # R0: x 0-53 m, R1: x 53-150 m; a pixel goes to the region holding its centre (x = 5, 15, ...)
    polys = [shapely.box(0, 0, 53, 100), shapely.box(53, 0, 150, 100)]
    regions = read_regions(_regions(tmp_path, polys), "id", "name", UTM31)
    tally = tally_regions(regions, CLASSES[:2], *out, few_clear=5, block=6)
    # columns 0-4 (centres 5..45) in R0, 5-14 in R1, 15-19 outside
    assert tally.pixels[0].tolist() == [50, 0]
    assert tally.pixels[1].tolist() == [30, 70]  # columns 5-7 class 1, 8-14 class 2
    assert tally.pixels[2].tolist() == [0, 50]
    assert tally.few_clear[1].tolist() == [3, 7]  # row 0
    assert tally.conf_sum[1, 0] / tally.conf_n[1, 0] == 40 and tally.conf_sum[1, 1] / tally.conf_n[1, 1] == 80
    # the regions' areas and the outside add up to the national table's
    np.testing.assert_allclose(tally.area_m2.sum(axis=0), res.tally.area_m2[[1, 2]], rtol=1e-12)
    rows = region_rows(tally, regions, CLASSES[:2])
    assert [r["region_id"] for r in rows] == ["R0", "R0", "R1", "R1", OUTSIDE, OUTSIDE]
    r1 = [r for r in rows if r["region_id"] == "R1"]
    assert sum(r["share"] for r in r1) == pytest.approx(1.0)
    assert r1[0]["share"] == pytest.approx(0.3, rel=1e-5)  # equal pixel areas, near enough
    assert r1[0]["few_clear_share"] == pytest.approx(0.1)
    write_layer(tally, regions, CLASSES[:2], tmp_path / "regions_out.gpkg")
    back = gpd.read_file(tmp_path / "regions_out.gpkg")
    assert back["ha_C1"].tolist() == pytest.approx((tally.area_m2[:2, 0] / 1e4).tolist())


def test_regions_in_another_crs_are_reprojected(tmp_path, mosaic):
    out, _ = mosaic
    box = shapely.box(0, 0, 53, 100)
    lonlat = gpd.GeoSeries([box], crs=UTM31).to_crs("EPSG:4326").iloc[0]
    regions = read_regions(_regions(tmp_path, [lonlat], crs="EPSG:4326"), "id", None, UTM31)
    assert regions.crs == CRS.from_epsg(32631)
    tally = tally_regions(regions, CLASSES[:2], *out, few_clear=5)
    assert tally.pixels[0].tolist() == [50, 0]
    assert regions["region_name"].tolist() == ["R0"]  # no name field: the id


def test_bad_regions_layers_are_refused_in_one_line(tmp_path):
    ok = _regions(tmp_path, [shapely.box(0, 0, 1, 1)])
    with pytest.raises(PipelineError, match=r"regions.gpkg: no region id field 'code' \(fields: id, name\)"):
        read_regions(ok, "code", None, UTM31)
    bow = shapely.Polygon([(0, 0), (1, 1), (1, 0), (0, 1)])
    (tmp_path / "bad").mkdir()
    bad = _regions(tmp_path / "bad", [shapely.box(0, 0, 1, 1), bow])
    with pytest.raises(PipelineError, match=r"1 invalid region geometries \(first: id R1, Self-intersection"):
        read_regions(bad, "id", None, UTM31)
    (tmp_path / "dup").mkdir()
    dup = _regions(tmp_path / "dup", [shapely.box(0, 0, 1, 1)] * 2, id=["A", "A"])
    with pytest.raises(PipelineError, match="not unique"):
        read_regions(dup, "id", None, UTM31)
    with pytest.raises(PipelineError, match="regions file not found"):
        read_regions(tmp_path / "nope.gpkg", "id", None, UTM31)


def test_the_demo_regions_partition_the_country_across_its_tiles():
    from pipeline.config import Config, validate
    from pipeline.demo.landscape import Country
    from pipeline.demo.regions import region_polygons
    from tests.conftest import tiny_demo_config

    cfg = Config(validate(tiny_demo_config(), "test"))
    c = Country.from_config(cfg)
    regions = region_polygons(c)
    assert regions["id"].tolist() == ["D01", "D02", "D03", "D04"]
    assert regions.geometry.is_valid.all()
    union = shapely.union_all(regions.geometry.to_numpy())
    assert union.area == pytest.approx(sum(g.area for g in regions.geometry), rel=1e-9)  # no overlap
    extent = shapely.union_all([shapely.box(*t.grid.bounds) for t in c.tiles])
    assert union.contains(extent)  # every mapped pixel is in a region
    for t in c.tiles:  # the borders cross the tiles: every tile holds several regions
        tile = shapely.box(*t.grid.bounds)
        assert sum(g.intersects(tile) for g in regions.geometry) >= 2
