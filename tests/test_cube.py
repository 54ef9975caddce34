"""`landcover import`: netCDF/zarr datacubes -> the same ingest store as the product readers give."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from pipeline.cli import main
from pipeline.config import validate
from pipeline.errors import PipelineError
from pipeline.ingest import import_cube, ingest_tile
from pipeline.io.l2a import BANDS, IDX_10M, IDX_20M, NODATA
from pipeline.io.sen2cor import SCL_INVALID
from pipeline.io.tilestore import Grid, open_store
from pipeline.resample import upsample2x
from tests.conftest import REPO
from tests.l2a_synth import read_worldcereal, up2, write_worldcereal_products

ESA = ("B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12")
TEN = {"B02", "B03", "B04", "B08"}
X0, Y0 = 399960.0, 4800000.0


def synthetic_cube(t: int = 5, h: int = 40, w: int = 48, seed: int = 0) -> dict:
    """DN (uint16, 0 = fill) per ESA band at its native resolution, and a 20 m SCL."""
    rng = np.random.default_rng(seed)
    bands = {}
    for b in ESA:
        k = 1 if b in TEN else 2
        dn = rng.integers(1, 6000, (t, h // k, w // k)).astype(np.uint16)
        dn[0, :2, :3] = 0  # fill
        bands[b] = dn
    scl = rng.choice(np.arange(12, dtype=np.uint8), (t, h // 2, w // 2), p=[0.02] + [0.98 / 11] * 11)
    times = np.array(["2019-01-03T10:50:22", "2019-02-12T10:51:00", "2019-04-03T10:50:12",
                      "2019-06-22T10:56:00", "2019-09-10T10:50:40"], dtype="datetime64[ns]")[:t]  # fmt: skip
    return {"bands": bands, "scl": scl, "times": times, "h": h, "w": w}


def to_datasets(c: dict, names: dict[str, str] | None = None, scale: float | None = 1e-4) -> list[xr.Dataset]:
    """The cube as two CF datasets (10 m and 20 m groups), WorldCereal style."""
    names = names or {}
    out = []
    for k in (1, 2):
        size = 10.0 * k
        x = X0 + size / 2 + size * np.arange(c["w"] // k)
        y = Y0 - size / 2 - size * np.arange(c["h"] // k)
        coords = {"t": c["times"], "y": y, "x": x}
        ds = xr.Dataset(coords=coords)
        ds["spatial_ref"] = xr.DataArray(0, attrs={"crs_wkt": Grid.from_attrs(_attrs()).crs.to_wkt()})
        for b, dn in c["bands"].items():
            if (b in TEN) == (k == 1):
                attrs = {"_FillValue": np.uint16(0), "grid_mapping": "spatial_ref"}
                if scale is not None:
                    attrs["scale_factor"] = scale
                ds[names.get(b, b)] = xr.DataArray(dn, dims=("t", "y", "x"), attrs=attrs)
        if k == 2:
            ds["SCL"] = xr.DataArray(c["scl"], dims=("t", "y", "x"), attrs={"grid_mapping": "spatial_ref"})
        out.append(ds)
    return out


def _attrs() -> dict:
    from affine import Affine
    from rasterio.crs import CRS

    return Grid(CRS.from_epsg(32631), Affine(10, 0, X0, 0, -10, Y0), 1, 1).to_attrs()


def write_cube(folder: Path, datasets: list[xr.Dataset], engine: str = "netcdf") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, ds in enumerate(datasets):
        if engine == "netcdf":
            ds.to_netcdf(folder / f"cube_{k}.nc", engine="h5netcdf", encoding={v: {} for v in ds.data_vars})
        else:
            ds.to_zarr(folder / f"cube_{k}.zarr", mode="w", consolidated=False)
    return folder


def expected(c: dict) -> tuple[np.ndarray, np.ndarray]:
    """The store by hand: DN as reflectance x10000 (fill -> NODATA), the 20 m bands upsampled by the
    whole-image bicubic, validity from the nearest-upsampled SCL and the bands' no data."""
    refl = []
    for b in ESA:
        dn = c["bands"][b].astype(np.int16)
        r = np.where(c["bands"][b] == 0, NODATA, dn).astype(np.int16)
        refl.append(r if b in TEN else upsample2x(r, NODATA))
    refl = np.stack(refl, axis=1)
    valid = ~np.isin(up2(c["scl"]), SCL_INVALID) & ~(refl == NODATA).any(axis=1)
    return refl, valid


@pytest.mark.parametrize("engine", ["netcdf", "zarr"])
def test_a_cube_imports_as_computed_by_hand(tmp_path, engine):
    c = synthetic_cube()
    src = write_cube(tmp_path / "cube", to_datasets(c), engine)
    import_cube(src, "T31TCJ", tmp_path / "ingest.zarr")
    g = open_store(tmp_path / "ingest.zarr", "ingest", ("reflectance", "valid"))
    refl, valid = expected(c)
    np.testing.assert_array_equal(g["reflectance"][:], refl)
    np.testing.assert_array_equal(g["valid"][:].astype(bool), valid)
    assert 0.3 < valid.mean() < 0.9
    assert g.attrs["dates"] == ["2019-01-03", "2019-02-12", "2019-04-03", "2019-06-22", "2019-09-10"]
    assert g.attrs["acquired"][0] == "2019-01-03T10:50:22+00:00" and g.attrs["format"] == "cube"
    grid = Grid.from_attrs(dict(g.attrs))
    assert grid.crs.to_epsg() == 32631 and tuple(grid.transform)[:6] == (10, 0, X0, 0, -10, Y0)
    assert (grid.width, grid.height) == (48, 40) and g.attrs["bands"] == list(BANDS)
    assert g.attrs["variables"]["B8A"] == "cube_1." + ("nc" if engine == "netcdf" else "zarr") + ":B8A"


def test_other_names_a_mask_and_a_scale_from_the_config(tmp_path):
    """Theia-style names mapped by cube.bands, DN without CF attributes scaled by cube.scale, and a
    cloud mask variable instead of SCL."""
    c = synthetic_cube()
    names = {b: f"band_{b.lower()}" for b in ESA}
    ds10, ds20 = to_datasets(c, names, scale=None)
    ds20 = ds20.drop_vars("SCL")
    cloud = up2(np.isin(c["scl"], SCL_INVALID)).astype(np.uint8)
    ds10["clouds"] = xr.DataArray(cloud, dims=("t", "y", "x"))
    src = write_cube(tmp_path / "cube", [ds10, ds20])
    settings = {"bands": {b: names[e] for b, e in zip(BANDS, ESA, strict=True)}, "cloud": "clouds",
                "scale": 0.0001}  # fmt: skip
    import_cube(src, "T31TCJ", tmp_path / "a.zarr", settings)
    g = open_store(tmp_path / "a.zarr", "ingest", ("reflectance", "valid"))
    refl, valid = expected(c)
    np.testing.assert_array_equal(g["reflectance"][:], refl)
    np.testing.assert_array_equal(g["valid"][:].astype(bool), valid)
    # without the scale the DN would be read as reflectance: refused, with the remedy
    with pytest.raises(PipelineError, match=r"not scaled to reflectance; set cube.scale"):
        import_cube(src, "T31TCJ", tmp_path / "b.zarr", {**settings, "scale": 1.0})
    assert not (tmp_path / "b.zarr").exists()


@pytest.mark.parametrize("engine", ["netcdf", "zarr"])
def test_one_file_with_a_group_per_resolution(tmp_path, engine):
    """The 10 m and 20 m bands as two groups of one file (netCDF4 groups, zarr groups)."""
    c = synthetic_cube()
    path = tmp_path / ("cube.nc" if engine == "netcdf" else "cube.zarr")
    for k, (group, ds) in enumerate(zip(("r10m", "r20m"), to_datasets(c), strict=True)):
        if engine == "netcdf":
            ds.to_netcdf(path, engine="h5netcdf", group=group, mode="w" if k == 0 else "a")
        else:
            ds.to_zarr(path, group=group, mode="w" if k == 0 else "a", consolidated=False)
    import_cube(path, "T31TCJ", tmp_path / "a.zarr")
    g = open_store(tmp_path / "a.zarr", "ingest", ("reflectance", "valid"))
    refl, valid = expected(c)
    np.testing.assert_array_equal(g["reflectance"][:], refl)
    np.testing.assert_array_equal(g["valid"][:].astype(bool), valid)
    assert g.attrs["variables"]["B11"] == f"{path.name}/r20m:B11"


def test_lowercase_names_other_dim_order_and_float_reflectance(tmp_path):
    """Another common writer: float32 reflectance 0-1 with NaN for no data, names in lower case,
    dims (y, x, time). Same store."""
    c = synthetic_cube()
    out = []
    for ds in to_datasets(c, scale=None):
        conv = xr.Dataset(coords=ds.coords)
        conv["spatial_ref"] = ds["spatial_ref"]
        for name, var in ds.data_vars.items():
            if name == "spatial_ref":
                continue
            if name != "SCL":
                var = (var.where(var != 0) * 1e-4).astype(np.float32)
                var.attrs = {"grid_mapping": "spatial_ref"}
            conv[name.lower()] = var.transpose("y", "x", "t")
        out.append(conv)
    src = write_cube(tmp_path / "cube", out)
    import_cube(src, "T31TCJ", tmp_path / "a.zarr")
    g = open_store(tmp_path / "a.zarr", "ingest", ("reflectance", "valid"))
    refl, valid = expected(c)
    np.testing.assert_array_equal(g["reflectance"][:], refl)
    np.testing.assert_array_equal(g["valid"][:].astype(bool), valid)


def _broken(tmp_path, change) -> Path:
    c = synthetic_cube()
    datasets = to_datasets(c)
    change(datasets)
    return write_cube(tmp_path / "cube", datasets)


def _same_day(d):
    times = d[0].t.values[[0, 0, 2, 3, 4]]
    d[0], d[1] = d[0].assign_coords(t=times), d[1].assign_coords(t=times)


def _no_crs(d):
    d[0] = d[0].drop_vars("spatial_ref")
    for v in d[0].data_vars:
        d[0][v].attrs.pop("grid_mapping")


BROKEN = {
    "missing band": (lambda d: d.__setitem__(1, d[1].drop_vars("B11")),
                     "no variable B11 for band B11 in cube_0.nc, cube_1.nc (cube.bands maps other names)"),
    "no crs": (_no_crs, "no CRS found"),
    "shifted 20 m grid": (lambda d: d.__setitem__(1, d[1].assign_coords(x=d[1].x + 10)),
                          "does not cover the tile's 10 m grid"),
    "time axes differ": (lambda d: d.__setitem__(1, d[1].assign_coords(t=d[1].t + np.timedelta64(1, "D"))),
                         "its time axis differs from the 10 m bands'"),
    "south-up": (lambda d: d.__setitem__(0, d[0].isel(y=slice(None, None, -1))), "is not north-up"),
    "scl domain": (lambda d: d.__setitem__(1, d[1].assign(SCL=d[1].SCL + 20)),
                   "outside 0..11, the format's range for SCL"),
    "same day": (_same_day, "two acquisitions on 2019-01-03"),
}  # fmt: skip


@pytest.mark.parametrize("case", BROKEN)
def test_bad_cubes_are_refused_in_one_line_with_no_output(tmp_path, case):
    change, message = BROKEN[case]
    src = _broken(tmp_path, change)
    with pytest.raises(PipelineError) as err:
        import_cube(src, "T31TCJ", tmp_path / "out.zarr")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out.zarr").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_a_damaged_file_and_an_empty_folder_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError, match="no cube in this folder"):
        import_cube(tmp_path / "empty", "T31TCJ", tmp_path / "o.zarr")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cube.nc").write_bytes(b"CDF\x01 truncated")
    with pytest.raises(PipelineError, match=r"cube.nc: cannot open as a netCDF/zarr cube"):
        import_cube(tmp_path / "bad", "T31TCJ", tmp_path / "o.zarr")


def _cube_config(tmp_path, path, **cube) -> Path:
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    del raw["demo"]
    raw["run"]["workdir"] = str(tmp_path / "run")
    spec = {"format": "cube", "path": str(path)} | ({"cube": cube} if cube else {})
    raw["inputs"] = {"tiles": {"T31TCJ": spec}, "reference": str(tmp_path / "ref.gpkg")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "c.yaml"


def test_the_subcommands_keep_cubes_and_products_apart(tmp_path, capsys):
    c = synthetic_cube()
    src = write_cube(tmp_path / "cube", to_datasets(c))
    cfg = _cube_config(tmp_path, src, scl="SCL")
    assert main(["import", "--config", str(cfg), "--tile", "T31TCJ"]) == 0
    g = open_store(tmp_path / "run" / "ingest" / "T31TCJ.zarr", "ingest", ("reflectance", "valid"))
    np.testing.assert_array_equal(g["reflectance"][:], expected(c)[0])
    assert main(["ingest", "--config", str(cfg), "--tile", "T31TCJ", "--out", str(tmp_path / "x.zarr")]) == 2
    assert "is a cube (format: cube): landcover import reads it" in capsys.readouterr().err
    # cube settings on a product tile are a config error
    raw = yaml.safe_load(cfg.read_text())
    bad = copy.deepcopy(raw)
    bad["inputs"]["tiles"]["T31TCJ"]["format"] = "theia"
    with pytest.raises(PipelineError, match="'inputs/tiles/T31TCJ/cube': only for format: cube, not theia"):
        validate(bad)


@pytest.mark.real
def test_the_worldcereal_cube_imports_as_its_theia_products_ingest(real_data, tmp_path):
    """The real WorldCereal patch (10 m and 20 m netCDF with SCL, plus the S1 and label files the
    importer must pass over): imported straight from the cube, it equals the Theia path, i.e. the
    same 72 dates written as Theia products by hand (tests/l2a_synth.py) and ingested."""
    wc = read_worldcereal(real_data)
    write_worldcereal_products(tmp_path / "theia", "theia", wc)
    ingest_tile(tmp_path / "theia", "theia", "T31UES", tmp_path / "theia.zarr")
    import_cube(wc["folder"], "T31UES", tmp_path / "cube.zarr")
    a = open_store(tmp_path / "theia.zarr", "ingest", ("reflectance", "valid"))
    b = open_store(tmp_path / "cube.zarr", "ingest", ("reflectance", "valid"))
    assert len(b.attrs["dates"]) == 72 and a.attrs["dates"] == b.attrs["dates"]
    assert Grid.from_attrs(dict(a.attrs)).same_as(Grid.from_attrs(dict(b.attrs)))
    np.testing.assert_array_equal(a["reflectance"][:], b["reflectance"][:])
    np.testing.assert_array_equal(a["valid"][:], b["valid"][:])
    assert b["reflectance"][:, IDX_10M].max() > 1000 and b["reflectance"][:, IDX_20M].max() > 1000
    assert 0.3 < b["valid"][:].mean() < 0.9
