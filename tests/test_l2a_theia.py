"""Theia/MUSCATE layout: real MTD parsing, writer/reader round trip, mask rule, writer atomicity."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.windows import Window

from pipeline.errors import PipelineError
from pipeline.io import theia
from pipeline.io.l2a import (
    BANDS,
    IDX_10M,
    IDX_20M,
    NODATA,
    Acquisition,
    WindowMasks,
    find_products,
    open_writer,
)
from pipeline.resample import upsample2x
from tests.conftest import make_grid
from tests.l2a_synth import any2, up2, write_series

KPD = "SENTINEL2A_20170203-071245-541_L2A_T38KPD_C_V1-0_MTD_ALL.xml"
KPE = "SENTINEL2A_20170213-071209-461_L2A_T38KPE_C_V1-0_MTD_ALL.xml"


@pytest.mark.real
def test_parse_real_mtd_t38kpd(real_data: Path) -> None:
    md = theia.parse_mtd(real_data / "theia_mtd" / KPD)
    pid = "SENTINEL2A_20170203-071245-541_L2A_T38KPD_D_V1-4"
    assert md.product_id == pid
    assert md.tile == "T38KPD"
    assert md.acquired == datetime(2017, 2, 3, 7, 12, 45, 541000, tzinfo=UTC)
    assert md.platform == "SENTINEL2A"
    assert md.orbit_number == 8454 and md.orbit_type == "Orbit"
    assert md.relative_orbit == 20  # absolute 8454 on S2A
    assert md.epsg == 32738
    assert md.geo["R1"] == theia.GroupGeo(600000, 7900000, 10, -10, 10980, 10980)
    assert md.geo["R2"] == theia.GroupGeo(600000, 7900000, 20, -20, 5490, 5490)
    assert md.fre_files["B2"] == f"{pid}_FRE_B2.tif"
    assert md.fre_files["B8A"] == f"{pid}_FRE_B8A.tif"
    assert set(md.fre_files) == set(BANDS)
    assert md.mask_files["CLM"] == {"R1": f"MASKS/{pid}_CLM_R1.tif", "R2": f"MASKS/{pid}_CLM_R2.tif"}
    assert md.mask_files["SAT"]["R2"] == f"MASKS/{pid}_SAT_R2.tif"
    assert md.mask_files["EDG"]["R1"] == f"MASKS/{pid}_EDG_R1.tif"
    assert md.quantification == 10000 and md.nodata == -10000


@pytest.mark.real
def test_parse_real_mtd_t38kpe(real_data: Path) -> None:
    md = theia.parse_mtd(real_data / "theia_mtd" / KPE)
    pid = "SENTINEL2A_20170213-071209-461_L2A_T38KPE_D_V1-4"
    assert md.product_id == pid and md.tile == "T38KPE"
    assert md.acquired.date().isoformat() == "2017-02-13"
    # the same MTD names the source L1C S2A_MSIL1C_20170213T071211_N0204_R020_T38KPE: relative orbit 20
    assert md.orbit_number == 8597 and md.relative_orbit == 20
    assert md.epsg == 32738
    assert md.geo["R1"] == theia.GroupGeo(600000, 8000020, 10, -10, 10980, 10980)
    assert md.geo["R2"].transform == Affine(20, 0, 600000, 0, -20, 8000020)
    assert md.mask_files["EDG"]["R2"] == f"MASKS/{pid}_EDG_R2.tif"


def test_writer_layout_and_mtd(tmp_path: Path) -> None:
    grid = make_grid(64, 48)
    s = write_series(tmp_path, "theia", grid, [5])
    folder = s.paths[0]
    assert folder.name == "SENTINEL2A_20190505-105039-024_L2A_T31TCJ_C_V1-4"
    assert theia.NAME_RE.match(folder.name)
    md = theia.parse_mtd(folder / f"{folder.name}_MTD_ALL.xml")
    assert md.product_id == folder.name and md.tile == "T31TCJ" and md.relative_orbit == 51
    assert md.geo["R1"] == theia.GroupGeo(399960, 4800000, 10, -10, 48, 64)
    assert md.geo["R2"] == theia.GroupGeo(399960, 4800000, 20, -20, 24, 32)
    with rasterio.open(folder / md.fre_files["B11"]) as ds:
        assert (ds.width, ds.height, ds.dtypes[0], ds.nodata) == (32, 24, "int16", NODATA)
        assert ds.profile["tiled"] and ds.profile["compress"] == "deflate"
    with rasterio.open(folder / md.mask_files["CLM"]["R1"]) as ds:
        clm = ds.read(1)
    m = s.masks[0]
    # hand-defined bits: cloud -> bits 0,1,2 (7); shadow -> bits 0,5 (33)
    assert clm[15, 15] == 7 and clm[25, 15] == 33 and clm[0, 0] == 0
    with rasterio.open(folder / md.mask_files["SAT"]["R2"]) as ds:
        sat2 = ds.read(1)
    np.testing.assert_array_equal(sat2, np.where(any2(m["saturated"]), 0b111111, 0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_round_trip_values_and_validity(tmp_path: Path) -> None:
    grid = make_grid(96, 84)
    s = write_series(tmp_path, "theia", grid, [3, 9])
    products = find_products(tmp_path, "theia", "31TCJ")
    assert [p.date.day for p in products] == [3, 9]
    for t, p in enumerate(products):
        assert p.grid.same_as(grid)
        refl, valid = p.read_window(Window(0, 0, 96, 84))
        m = s.masks[t]
        r10 = np.where(m["edge"], NODATA, s.r10[t])
        r20 = np.where(any2(m["edge"]), NODATA, s.r20[t])
        np.testing.assert_array_equal(refl[IDX_10M], r10)
        np.testing.assert_array_equal(refl[IDX_20M], upsample2x(r20, NODATA))
        bad = (
            m["cloud"]
            | m["shadow"]
            | m["saturated"]
            | m["edge"]
            | up2(any2(m["saturated"]) | any2(m["edge"]))
        )
        expected = ~bad & ~(refl == NODATA).any(axis=0)
        np.testing.assert_array_equal(valid, expected)
        assert not valid[3, 5]  # lone nodata 10 m pixel
        assert valid[75, 5]  # snow is not a Theia CLM flag
        # a window at odd offsets gives the same as the whole image
        r2, v2 = p.read_window(Window(13, 7, 41, 33))
        np.testing.assert_array_equal(r2, refl[:, 7:40, 13:54])
        np.testing.assert_array_equal(v2, valid[7:40, 13:54])


def test_theia_invalid_rule_is_pure() -> None:
    z = np.zeros((2, 2), np.uint8)
    one = np.array([[1, 0], [0, 0]], np.uint8)
    for k in range(5):
        layers = [z] * 5
        layers[k] = one
        np.testing.assert_array_equal(theia.theia_invalid(*layers), one.astype(bool))
    assert not theia.theia_invalid(z, z, z, z, z).any()


def _acq(grid, day: int = 1) -> Acquisition:
    return Acquisition("T31TCJ", datetime(2019, 5, day, 10, 50, tzinfo=UTC), "SENTINEL2B", 51, grid)


def _masks(h: int, w: int) -> WindowMasks:
    z = np.zeros((h, w), bool)
    return WindowMasks(z, z, z, z)


def test_writer_leaves_nothing_on_error(tmp_path: Path) -> None:
    grid = make_grid(32, 32)
    r10, r20 = np.zeros((4, 16, 32), np.int16), np.zeros((6, 8, 16), np.int16)
    with pytest.raises(RuntimeError), open_writer("theia", tmp_path, _acq(grid)) as wr:
        wr.write(Window(0, 0, 32, 16), r10, r20, _masks(16, 32))
        raise RuntimeError("generator crashed")
    assert list(tmp_path.iterdir()) == []
    # incomplete coverage is refused at close, overlap and odd offsets at write
    with pytest.raises(ValueError, match="not covered"), open_writer("theia", tmp_path, _acq(grid)) as wr:
        wr.write(Window(0, 0, 32, 16), r10, r20, _masks(16, 32))
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="overlaps"), open_writer("theia", tmp_path, _acq(grid)) as wr:
        wr.write(Window(0, 0, 32, 16), r10, r20, _masks(16, 32))
        wr.write(Window(0, 14, 32, 16), r10, r20, _masks(16, 32))
    with pytest.raises(ValueError, match="even"), open_writer("theia", tmp_path, _acq(grid)) as wr:
        wr.write(Window(0, 1, 32, 16), r10, r20, _masks(16, 32))
    assert list(tmp_path.iterdir()) == []


def test_georeferencing_mismatch_names_file(tmp_path: Path) -> None:
    s = write_series(tmp_path, "theia", make_grid(32, 32), [2])
    band = next(s.paths[0].glob("*_FRE_B4.tif"))
    with rasterio.open(band, "r+") as ds:
        ds.transform = Affine(10, 0, 399970, 0, -10, 4800000)
    with pytest.raises(PipelineError, match="FRE_B4.tif: georeferencing"):
        find_products(tmp_path, "theia", "T31TCJ")
