"""Sen2Cor SAFE layout: real MTD parsing, DN conversion, SCL rules, writer/reader round trip."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.windows import Window

from pipeline.io import sen2cor
from pipeline.io.l2a import BANDS, IDX_10M, IDX_20M, NODATA, find_products
from pipeline.resample import upsample2x
from tests.conftest import make_grid
from tests.l2a_synth import any2, up2, write_series

GRANULE = "GRANULE/L2A_T31TCJ_A011231_20190501T105819/IMG_DATA"


@pytest.mark.real
def test_parse_real_mtd_20190501(real_data: Path) -> None:
    md = sen2cor.parse_mtd(real_data / "sen2cor_mtd" / "MTD_MSIL2A_20190501.xml")
    assert md.product_uri == "S2B_MSIL2A_20190501T105039_N0211_R051_T31TCJ_20190501T140320.SAFE"
    assert md.tile == "T31TCJ"
    assert md.acquired == datetime(2019, 5, 1, 10, 50, 39, 24000, tzinfo=UTC)
    assert md.platform == "SENTINEL2B" and md.relative_orbit == 51
    assert md.baseline == "02.11"
    assert md.band_files["B2"] == f"{GRANULE}/R10m/T31TCJ_20190501T105039_B02_10m"
    assert md.band_files["B8"] == f"{GRANULE}/R10m/T31TCJ_20190501T105039_B08_10m"
    assert md.band_files["B8A"] == f"{GRANULE}/R20m/T31TCJ_20190501T105039_B8A_20m"
    assert md.band_files["B12"] == f"{GRANULE}/R20m/T31TCJ_20190501T105039_B12_20m"
    assert md.band_files["SCL"] == f"{GRANULE}/R20m/T31TCJ_20190501T105039_SCL_20m"
    assert md.granule == "GRANULE/L2A_T31TCJ_A011231_20190501T105819"
    assert len(md.image_files) == 35
    assert (md.nodata, md.saturated, md.quantification) == (0, 65535, 10000.0)
    assert set(md.offsets.values()) == {0}  # baseline < 04.00: no BOA_ADD_OFFSET


@pytest.mark.real
def test_parse_real_mtd_20190506(real_data: Path) -> None:
    md = sen2cor.parse_mtd(real_data / "sen2cor_mtd" / "MTD_MSIL2A_20190506.xml")
    assert md.product_uri == "S2A_MSIL2A_20190506T105031_N0212_R051_T31TCJ_20190506T140834.SAFE"
    assert md.acquired.date().isoformat() == "2019-05-06"
    assert md.platform == "SENTINEL2A" and md.baseline == "02.12" and md.tile == "T31TCJ"
    assert md.band_files["B5"].endswith("/R20m/T31TCJ_20190506T105031_B05_20m")


def test_dn_conversion_hand_values() -> None:
    dn = np.array([0, 1, 1000, 1234, 65535], np.uint16)
    np.testing.assert_array_equal(sen2cor.dn_to_reflectance(dn, -1000, 10000), [NODATA, -999, 0, 234, NODATA])
    np.testing.assert_array_equal(sen2cor.dn_to_reflectance(dn, 0, 10000), [NODATA, 1, 1000, 1234, NODATA])
    # another quantification value is rescaled to x10000
    np.testing.assert_array_equal(sen2cor.dn_to_reflectance(dn[:4], 0, 1000), [NODATA, 10, 10000, 12340])


def test_scl_rules() -> None:
    scl = np.arange(12)
    np.testing.assert_array_equal(np.flatnonzero(sen2cor.scl_invalid(scl)), [0, 1, 3, 8, 9, 10])
    t, f = np.array([True]), np.array([False])
    ndvi = np.array([0.5])
    base = {k: f for k in ("edge", "saturated", "cloud", "shadow", "snow", "water")}
    assert sen2cor.scl_from_masks(base, ndvi)[0] == 4
    assert sen2cor.scl_from_masks(base, np.array([0.1]))[0] == 5
    order = [("edge", 0), ("saturated", 1), ("cloud", 9), ("shadow", 3), ("snow", 11), ("water", 6)]
    for i, (key, cls) in enumerate(order):
        masks = dict(base, **{k: t for k, _ in order[i:]})  # this flag and every lower-priority one
        assert sen2cor.scl_from_masks(masks, ndvi)[0] == cls, key


@pytest.mark.parametrize("baseline", ["05.10", "02.14"])
def test_round_trip_values_and_validity(tmp_path: Path, baseline: str) -> None:
    grid = make_grid(96, 84)
    s = write_series(tmp_path, "sen2cor", grid, [4, 11], baseline=baseline)
    products = find_products(tmp_path, "sen2cor", "T31TCJ")
    assert [p.date.day for p in products] == [4, 11]
    root = ET.parse(products[0].path / "MTD_MSIL2A.xml").getroot()
    offsets = [e.text for e in root.iter("BOA_ADD_OFFSET")]
    assert offsets == (["-1000"] * 13 if baseline == "05.10" else [])
    for t, p in enumerate(products):
        assert p.grid.same_as(grid) and p.product_id.startswith(f"S2A_MSIL2A_201905{[4, 11][t]:02d}T105039_N")
        refl, valid = p.read_window(Window(0, 0, 96, 84))
        m = s.masks[t]
        edge20 = any2(m["edge"])
        np.testing.assert_array_equal(refl[IDX_10M], np.where(m["edge"], NODATA, s.r10[t]))
        np.testing.assert_array_equal(refl[IDX_20M], upsample2x(np.where(edge20, NODATA, s.r20[t]), NODATA))
        bad20 = any2(m["edge"] | m["saturated"] | m["cloud"] | m["shadow"])
        expected = ~up2(bad20) & ~(refl == NODATA).any(axis=0)
        np.testing.assert_array_equal(valid, expected)
        assert valid[75, 5] and valid[75, 25]  # snow and water stay valid
        r2, v2 = p.read_window(Window(21, 9, 37, 51))
        np.testing.assert_array_equal(r2, refl[:, 9:60, 21:58])
        np.testing.assert_array_equal(v2, valid[9:60, 21:58])


def test_written_scl_and_tile_geocoding(tmp_path: Path) -> None:
    s = write_series(tmp_path, "sen2cor", make_grid(96, 84), [7])
    p = find_products(tmp_path, "sen2cor", "T31TCJ")[0]
    tl = sen2cor.parse_tile_mtd(next(p.path.glob("GRANULE/*/MTD_TL.xml")))
    assert tl.epsg == 32631
    assert tl.geo[20][1:] == (48, 42) and tl.geo[20][0].a == 20 and tl.geo[10][0].c == 399960
    with rasterio.open(p.mask_files["SCL"]) as ds:
        scl = ds.read(1)
    assert scl[7, 7] == 9 and scl[12, 7] == 3 and scl[30, 30] == 1 and scl[37, 2] == 11 and scl[37, 12] == 6
    assert scl[6, 6] == 9  # snow under cloud: cloud wins
    assert set(np.unique(scl)) <= {1, 3, 4, 5, 6, 9, 11}
    assert p.band_files["B2"].suffix == ".tif"
    del s


def test_jp2_option(tmp_path: Path) -> None:
    grid = make_grid(32, 32)
    s = write_series(tmp_path, "sen2cor", grid, [2], jp2=True)
    p = find_products(tmp_path, "sen2cor", "T31TCJ")[0]
    assert {f.suffix for f in p.band_files.values()} == {".jp2"} and p.mask_files["SCL"].suffix == ".jp2"
    assert not list(p.path.rglob("*.tif"))
    refl, _ = p.read_window(Window(0, 0, 32, 32))
    np.testing.assert_array_equal(refl[IDX_10M], s.r10[0])  # lossless
    assert refl.shape == (len(BANDS), 32, 32)
