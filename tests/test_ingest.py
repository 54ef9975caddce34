"""Ingest: store contents, streaming == whole image, bad input -> one PipelineError and no output."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import rasterio
import zarr
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from pipeline import ingest
from pipeline.errors import PipelineError
from pipeline.ingest import ingest_tile
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
from pipeline.io.sen2cor import SCL_INVALID
from pipeline.io.tilestore import Grid, open_store
from pipeline.resample import upsample2x
from tests.conftest import make_grid
from tests.l2a_synth import read_worldcereal, up2, write_series, write_worldcereal_products

FORMATS = ("theia", "sen2cor")


@pytest.mark.parametrize("fmt", FORMATS)
def test_ingest_store(tmp_path: Path, fmt: str) -> None:
    grid = make_grid(600, 84)  # two 512-px shard windows, written concurrently
    src = tmp_path / "src"
    write_series(src, fmt, grid, [9, 2, 5])  # written out of order: the store is date-sorted
    products = ingest.find_products(src, fmt, "T31TCJ")
    out = tmp_path / "ingest" / "T31TCJ.zarr"
    ingest_tile(src, fmt, "T31TCJ", out, threads=2)
    g = open_store(out, "ingest", ("reflectance", "valid"))
    assert g.attrs["dates"] == ["2019-05-02", "2019-05-05", "2019-05-09"]
    assert g.attrs["acquired"][0] == "2019-05-02T10:50:39.024000+00:00"
    assert g.attrs["bands"] == list(BANDS) and g.attrs["format"] == fmt and g.attrs["tile"] == "T31TCJ"
    assert g.attrs["products"] == [p.product_id for p in products]
    assert Grid.from_attrs(dict(g.attrs)).same_as(grid)
    refl, valid = g["reflectance"], g["valid"]
    assert refl.shape == (3, 10, 84, 600) and refl.dtype == np.int16 and valid.dtype == np.uint8
    assert refl.chunks == (3, 10, 64, 64) and refl.shards is not None
    for t, p in enumerate(products):
        r, v = p.read_window(Window(0, 0, 600, 84))  # whole image in one go
        np.testing.assert_array_equal(refl[t], r)
        np.testing.assert_array_equal(valid[t], v.astype(np.uint8))
    assert 0 < valid[:].mean() < 1
    assert not [p for p in out.parent.iterdir() if p.name != out.name]


# ------------------------------------------------------------------------------------ bad input


def _theia_file(src: Path, pattern: str) -> Path:
    return next(src.rglob(pattern))


def _corrupt(fmt: str, case: str, src: Path, grid: Grid) -> str:
    """Damage the series in ``src`` and return the file name the error must name."""
    band = "*_FRE_B8.tif" if fmt == "theia" else "*_B08_10m.tif"
    mtd = "*_MTD_ALL.xml" if fmt == "theia" else "MTD_MSIL2A.xml"
    if case == "truncated":
        f = _theia_file(src, band)
        size = f.stat().st_size
        with open(f, "r+b") as fh:
            fh.truncate(size // 2)
        return f.name
    if case == "missing_band":
        f = _theia_file(src, "*_FRE_B11.tif" if fmt == "theia" else "*_B11_20m.tif")
        f.unlink()
        return f.name
    if case == "missing_mask":
        f = _theia_file(src, "*_EDG_R2.tif" if fmt == "theia" else "*_SCL_20m.tif")
        f.unlink()
        return f.name
    if case == "missing_mtd":
        f = _theia_file(src, mtd)
        f.unlink()
        return f.name
    if case == "bad_mtd":
        f = _theia_file(src, mtd)
        f.write_text(f.read_text()[:500])
        return f.name
    if case == "other_tile":
        s = write_series(src, fmt, grid, [20], tile="T31TCK")
        return s.paths[0].name
    if case == "other_crs":
        g2 = Grid(CRS.from_epsg(32632), grid.transform, grid.width, grid.height)
        s = write_series(src, fmt, g2, [21])
        return s.paths[0].name
    if case == "duplicate_date":
        acq = Acquisition("T31TCJ", datetime(2019, 5, 3, 11, 0, tzinfo=UTC), "SENTINEL2B", 8, grid)
        z = np.zeros((grid.height, grid.width), bool)
        with open_writer(fmt, src, acq) as wr:
            wr.write(
                Window(0, 0, grid.width, grid.height),
                np.full((4, grid.height, grid.width), 100, np.int16),
                np.full((6, grid.height // 2, grid.width // 2), 100, np.int16),
                WindowMasks(z, z, z, z),
            )
        return getattr(wr, "id", getattr(wr, "uri", ""))
    if case in ("float_reflectance", "two_bands", "other_nodata"):
        f = _theia_file(src, band)
        with rasterio.open(f) as ds:
            prof, data = ds.profile, ds.read(1)
        if case == "float_reflectance":  # reflectance 0-1 in float32, as many tools export it
            prof.update(dtype="float32", nodata=None)
            data = data.astype(np.float32) / 10000
        elif case == "two_bands":
            prof.update(count=2)
        else:
            prof.update(nodata=-9999 if fmt == "theia" else 65535)
        with rasterio.open(f, "w", **prof) as ds:
            for i in range(1, prof["count"] + 1):
                ds.write(data, i)
        return f.name
    if case == "mask_out_of_range":  # re-encoded (e.g. 0/255 in place of 0/1): not the format's mask
        f = _theia_file(src, "*_EDG_R1.tif" if fmt == "theia" else "*_SCL_20m.tif")
        with rasterio.open(f, "r+") as ds:
            data = ds.read(1)
            data[3, 5] = 255 if fmt == "theia" else 42
            ds.write(data, 1)
        return f.name
    raise AssertionError(case)


WHY = {
    "float_reflectance": "data type float32, the format specifies",
    "two_bands": "2 bands; the format has one band per file",
    "other_nodata": "no-data value",
    "mask_out_of_range": "outside 0..",
}
CASES = [
    "float_reflectance",
    "two_bands",
    "other_nodata",
    "mask_out_of_range",
    "truncated",
    "missing_band",
    "missing_mask",
    "missing_mtd",
    "bad_mtd",
    "other_tile",
    "other_crs",
    "duplicate_date",
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_bad_input(tmp_path: Path, fmt: str, case: str) -> None:
    grid = make_grid(64, 64)
    src = tmp_path / "src"
    write_series(src, fmt, grid, [3, 6])
    name = _corrupt(fmt, case, src, grid)
    out = tmp_path / "out" / "T31TCJ.zarr"
    with pytest.raises(PipelineError) as err:
        ingest_tile(src, fmt, "T31TCJ", out)
    assert Path(name).stem in str(err.value)  # Sen2Cor names files as listed, without extension
    assert WHY.get(case, "") in str(err.value)
    assert "\n" not in str(err.value)
    assert not out.exists()
    assert not out.parent.exists() or not os.listdir(out.parent)


def test_empty_folder_and_unknown_format(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    out = tmp_path / "T31TCJ.zarr"
    with pytest.raises(PipelineError, match=r"src: no theia L2A product of tile T31TCJ"):
        ingest_tile(tmp_path / "src", "theia", "T31TCJ", out)
    with pytest.raises(PipelineError, match=r"src: unknown product format 'landsat'"):
        ingest_tile(tmp_path / "src", "landsat", "T31TCJ", out)
    with pytest.raises(PipelineError, match="nowhere: product folder does not exist"):
        ingest_tile(tmp_path / "nowhere", "sen2cor", "T31TCJ", out)
    assert not out.exists()


def test_existing_output_kept_on_failure(tmp_path: Path) -> None:
    grid = make_grid(32, 32)
    src = tmp_path / "src"
    write_series(src, "theia", grid, [3])
    out = tmp_path / "T31TCJ.zarr"
    ingest_tile(src, "theia", "T31TCJ", out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    shutil.rmtree(next(src.iterdir()) / "MASKS")
    with pytest.raises(PipelineError):
        ingest_tile(src, "theia", "T31TCJ", out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


# ------------------------------------------------------------------------- real WorldCereal patch


@pytest.mark.real
def test_worldcereal_round_trip_both_layouts(real_data: Path, tmp_path: Path) -> None:
    wc = read_worldcereal(real_data, dates=8)
    grid, dates, scl10 = wc["grid"], wc["dates"], up2(wc["scl"])
    assert grid.crs.to_epsg() == 32631
    assert max(wc["r10"].max(), wc["r20"].max()) < 32767  # DN fits int16 x10000 as is
    stores = {}
    for fmt in FORMATS:
        write_worldcereal_products(tmp_path / fmt, fmt, wc)
        out = tmp_path / f"{fmt}.zarr"
        ingest_tile(tmp_path / fmt, fmt, "31UES", out)
        stores[fmt] = open_store(out, "ingest", ("reflectance", "valid"))
    r10 = np.where(wc["r10"] == 0, NODATA, wc["r10"]).astype(np.int16)  # DN 0 = fill
    r20 = np.where(wc["r20"] == 0, NODATA, wc["r20"]).astype(np.int16)
    expected_valid = ~np.isin(scl10, SCL_INVALID)
    for fmt, g in stores.items():
        assert g.attrs["dates"] == [d.date().isoformat() for d in dates]
        got = Grid.from_attrs(dict(g.attrs))
        assert got.crs == grid.crs and got.transform == Affine(10, 0, 574680, 0, -10, 5622440)
        assert (got.width, got.height) == (64, 64)
        refl, valid = g["reflectance"][:], g["valid"][:].astype(bool)
        np.testing.assert_array_equal(refl[:, IDX_10M], r10, err_msg=fmt)
        for t in range(len(dates)):
            np.testing.assert_array_equal(refl[t][IDX_20M], upsample2x(r20[t], NODATA), err_msg=fmt)
        np.testing.assert_array_equal(valid, expected_valid, err_msg=fmt)
        assert 0.2 < valid.mean() < 0.95  # a real mix of clear and cloudy observations
    np.testing.assert_array_equal(stores["theia"]["reflectance"][:], stores["sen2cor"]["reflectance"][:])
    assert isinstance(stores["theia"], zarr.Group)


@pytest.mark.parametrize("fmt", FORMATS)
def test_entries_that_are_not_products_are_named_and_a_misnamed_product_is_explained(tmp_path, fmt, caplog):
    grid = make_grid(32, 32)
    src = tmp_path / "src"
    series = write_series(src, fmt, grid, [3])
    (src / "notes.txt").write_text("downloaded 2019-06")
    (src / ".T31TCJ.0a1b2c3d.tmp.zarr").mkdir()  # the chain's own temporary: silently skipped
    with caplog.at_level("WARNING"):
        ingest_tile(src, fmt, "T31TCJ", tmp_path / "a.zarr")
    assert "skipped, not named as a" in caplog.text and "notes.txt" in caplog.text
    assert ".T31TCJ" not in caplog.text
    # the only product, renamed by hand: the error says what the name should look like
    product = series.paths[0]
    product.rename(src / f"my_{product.name}")
    with pytest.raises(
        PipelineError, match=rf"no {fmt} L2A product of tile T31TCJ in this folder: 2 entries"
    ) as err:
        ingest_tile(src, fmt, "T31TCJ", tmp_path / "b.zarr")
    assert not (tmp_path / "b.zarr").exists()
    rename = product.name if fmt == "theia" else "its product id"
    assert f"my_{product.name} (holds " in str(err.value) and f"rename the folder to {rename})" in str(
        err.value
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_metadata_date_that_contradicts_the_folder_name_is_refused(tmp_path, fmt):
    src = tmp_path / "src"
    series = write_series(src, fmt, make_grid(32, 32), [3, 6])
    mtd = next(series.paths[1].rglob("*MTD_ALL.xml" if fmt == "theia" else "MTD_MSIL2A.xml"))
    mtd.write_text(mtd.read_text().replace("2019-05-06T", "2031-05-06T"))
    with pytest.raises(
        PipelineError, match=r"acquisition date 2031-05-06 contradicts the product folder's name"
    ):
        ingest_tile(src, fmt, "T31TCJ", tmp_path / "a.zarr")
    assert not (tmp_path / "a.zarr").exists()


def test_odd_grid_names_the_crop(tmp_path: Path) -> None:
    """(A product of odd size cannot be written by the synthetic writers: its 20 m twin would not
    exist; the check is fed the product's description with one row more.)"""
    src = tmp_path / "src"
    write_series(src, "theia", make_grid(32, 32), [3])
    product = find_products(src, "theia", "T31TCJ")[0]
    odd = dataclasses.replace(product, grid=make_grid(32, 33))
    expected = r"grid size 32x33 px is not even: .* to 32x32 px \(drop the last row, 20 m bands alike\)"
    with pytest.raises(PipelineError, match=expected):
        ingest.check_products([odd], src, "theia", "T31TCJ")


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        (
            Affine(9.995, 0, 399960.0, 0, -9.995, 4800000.0),
            "pixel size 9.995 x 9.995 m, not Sentinel-2's 10 m",
        ),
        (Affine(10, 0, 399963.0, 0, -10, 4800000.0), "grid origin (399963, 4.8e+06) is off the 10 m lattice"),
    ],
)
def test_a_grid_off_the_mgrs_lattice_is_ingested_with_a_warning(tmp_path, caplog, transform, message) -> None:
    src = tmp_path / "src"
    write_series(src, "theia", Grid(CRS.from_epsg(32631), transform, 32, 32), [3])
    with caplog.at_level("WARNING"):
        ingest_tile(src, "theia", "T31TCJ", tmp_path / "a.zarr")
    assert message in caplog.text


def test_missing_orbit_numbers_are_reported(tmp_path: Path, caplog) -> None:
    src = tmp_path / "src"
    write_series(src, "theia", make_grid(32, 32), [3, 6])
    for mtd in src.rglob("*_MTD_ALL.xml"):
        mtd.write_text(re.sub(r"<ORBIT_NUMBER[^>]*>\d+</ORBIT_NUMBER>", "", mtd.read_text()))
    with caplog.at_level("WARNING"):
        ingest_tile(src, "theia", "T31TCJ", tmp_path / "a.zarr")
    assert "2 products without a relative orbit number" in caplog.text


def test_ingest_opens_each_file_once_per_thread_and_closes_it(tmp_path: Path, monkeypatch) -> None:
    """With the handles kept open, a file is opened once per worker thread instead of once per
    window (1100 x 600 px: six windows), the store is the same, and nothing stays open."""
    import rasterio

    from pipeline.io import l2a

    grid = make_grid(1100, 600)
    src = tmp_path / "src"
    write_series(src, "theia", grid, [2, 5], win=128)
    files = {
        f
        for p in find_products(src, "theia", "T31TCJ")
        for f in (*p.band_files.values(), *p.mask_files.values())
    }
    ingest_tile(src, "theia", "T31TCJ", tmp_path / "plain.zarr", threads=2)  # reference run
    real_open, opened = rasterio.open, []

    def counting(path, *a, **k):
        ds = real_open(path, *a, **k)
        if Path(path) in files:
            opened.append(ds)
        return ds

    monkeypatch.setattr(l2a.rasterio, "open", counting)
    ingest_tile(src, "theia", "T31TCJ", tmp_path / "kept.zarr", threads=2)
    per_file = {f: sum(Path(ds.name) == f for ds in opened) for f in files}
    # once when the products are checked, then once per worker thread (two), not once per window (six)
    assert max(per_file.values()) <= 3 and min(per_file.values()) >= 1
    assert all(ds.closed for ds in opened) and l2a._HANDLES is None
    a = open_store(tmp_path / "plain.zarr", "ingest", ("reflectance", "valid"))
    b = open_store(tmp_path / "kept.zarr", "ingest", ("reflectance", "valid"))
    np.testing.assert_array_equal(a["reflectance"][...], b["reflectance"][...])
    np.testing.assert_array_equal(a["valid"][...], b["valid"][...])
    # with no handle to spare, files are opened per read, with the same result
    opened.clear()
    with l2a.kept_open(limit=0):
        p = find_products(src, "theia", "T31TCJ")[0]
        p.read_window(Window(0, 0, 64, 64))
        p.read_window(Window(64, 0, 64, 64))
    assert len(opened) >= 2 * len(p.band_files) and all(ds.closed for ds in opened)
