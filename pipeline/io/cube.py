"""Datacubes (netCDF or zarr, as most training datasets ship) read as one tile's L2A time series.

A cube tile (``inputs.tiles.<T>: {format: cube, path: ...}``) is one xarray-readable file or a
folder of them. Each variable the chain needs is looked up by name across the files:

- the ten bands of :data:`~pipeline.io.l2a.BANDS`, named ``B02``/``B2`` ... ``B8A`` ... ``B12``
  (ESA or Theia spelling; ``cube.bands`` maps other names), dims (time, y, x);
- optionally a Sen2Cor scene classification ``SCL`` (``cube.scl``) and/or a ``cube.cloud`` mask
  (non-zero = not a clear observation);
- x/y pixel-centre coordinates (north-up: x increasing, y decreasing) and a CRS from the CF
  ``grid_mapping`` variable (``crs_wkt``/``spatial_ref``) or an ``epsg``/``crs`` attribute
  (``cube.epsg`` overrides).

Each variable sits on the 10 m grid (read as it is) or on the 20 m grid of the same origin (bands
bicubic-upsampled, masks nearest, exactly as the Sen2Cor reader does with its R20m files). Values
become reflectance x10000 through the variable's CF ``scale_factor``/``add_offset`` (``cube.scale``
and ``cube.offset`` override); its ``_FillValue`` and, for unsigned integers, the type's maximum
(saturation) are no data. The result is the same ``ingest`` store as the product readers give,
read window by window (never the whole cube).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.windows import Window

from pipeline.errors import PipelineError
from pipeline.io.l2a import BANDS, NODATA, check_domain, combine_validity
from pipeline.io.sen2cor import SCL_MAX, scl_invalid
from pipeline.io.tilestore import Grid
from pipeline.resample import nearest_block, nearest_window, pad_edge, source_window, upsample_block

log = logging.getLogger(__name__)

SUFFIXES = (".nc", ".nc4", ".h5", ".zarr")
# accepted spellings of each band's variable: ESA's (B02), then Theia's (B2, the chain's own)
SPELLINGS = {b: (esa, b) if esa != b else (b,) for b, esa in zip(BANDS, (
    "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A", "B11", "B12"), strict=True)}  # fmt: skip
# a median reflectance above this means the values are not scaled to reflectance (DN read as is)
IMPLAUSIBLE = 1.5


@dataclass(frozen=True)
class Source:
    """One dataset: a file, or a group inside it (a netCDF/zarr group of 20 m bands, say)."""

    path: Path
    group: str | None = None

    @property
    def name(self) -> str:
        return self.path.name + (f"/{self.group}" if self.group else "")

    def __str__(self) -> str:
        return str(self.path) + (f" (group {self.group})" if self.group else "")


@dataclass(frozen=True)
class CubeVariable:
    """Where one variable lives, and how its values become what the chain stores."""

    file: Source
    name: str
    time: str  # its time dimension (any name; the dims may come in any order)
    level: int  # 1: 10 m grid, 2: 20 m grid
    scale: float
    offset: float
    fill: float | None
    saturated: int | None


def _is_zarr(path: Path) -> bool:
    return path.suffix == ".zarr" or (path / "zarr.json").exists() or (path / ".zgroup").exists()


def _open(src: Source) -> Any:
    import xarray as xr

    try:
        engine = "zarr" if _is_zarr(src.path) else "h5netcdf"
        with warnings.catch_warnings():  # a zarr store without consolidated metadata reads fine
            warnings.filterwarnings("ignore", "Failed to open Zarr store with consolidated")
            kw = {"engine": engine, "group": src.group, "mask_and_scale": False, "chunks": None}
            return xr.open_dataset(src.path, **kw)
    except Exception as exc:  # xarray raises many types for a damaged or foreign file
        raise PipelineError(src, f"cannot open as a netCDF/zarr cube ({type(exc).__name__}: {exc})") from exc


def sources(path: Path) -> list[Source]:
    """The file's root and every group below it (netCDF4/HDF5 or zarr)."""
    groups: list[str] = []
    try:
        if _is_zarr(path):
            import zarr

            groups = [name for name, _ in zarr.open_group(str(path), mode="r").groups()]
        else:
            import h5py

            with h5py.File(path, "r") as f:
                f.visititems(lambda name, obj: groups.append(name) if isinstance(obj, h5py.Group) else None)
    except Exception:  # not readable as such: _open says why
        groups = []
    return [Source(path), *(Source(path, g) for g in sorted(groups))]


def _dataset(src: Source) -> Any:
    """One open dataset per file (or group) and process (windows are read from many threads or
    workers); a file rewritten since (another modification time or size) is opened again."""
    st = src.path.stat()
    return _cached(src, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=32)
def _cached(src: Source, mtime_ns: int, size: int) -> Any:
    del mtime_ns, size  # part of the cache key only
    return _open(src)


def cube_files(path: Path) -> list[Path]:
    path = Path(path)
    if not path.exists():
        raise PipelineError(path, "cube file or folder does not exist")
    if path.is_file() or path.suffix == ".zarr":
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and not p.name.startswith("."))
    if not files:
        raise PipelineError(path, f"no cube in this folder (files ending in {', '.join(SUFFIXES)})")
    return files


def _crs(ds: Any, var: Any, where: Path, epsg: int | None) -> CRS:
    if epsg is not None:
        return CRS.from_epsg(epsg)
    mapping = var.attrs.get("grid_mapping") or ds.attrs.get("grid_mapping")
    candidates: list[Any] = []
    if mapping and mapping in ds.variables:
        attrs = ds[mapping].attrs
        candidates += [attrs.get("crs_wkt"), attrs.get("spatial_ref")]
    for key in ("epsg", "crs"):
        candidates += [var.attrs.get(key), ds.attrs.get(key)]
    for c in candidates:
        if c is None or c == "":
            continue
        try:
            if isinstance(c, (int, np.integer)) or (isinstance(c, str) and c.isdigit()):
                return CRS.from_epsg(int(c))
            return CRS.from_user_input(c.decode() if isinstance(c, bytes) else c)
        except CRSError:
            continue
    raise PipelineError(
        where, "no CRS found (a grid_mapping variable with crs_wkt, or an epsg attribute); set cube.epsg"
    )


def _axis(ds: Any, name: str, where: Path) -> tuple[float, float, int]:
    """(first centre, spacing, length) of a regular coordinate."""
    if name not in ds.coords:
        raise PipelineError(where, f"no '{name}' coordinate (pixel centres) to georeference the cube")
    v = np.asarray(ds[name].values, dtype=np.float64)
    if len(v) < 2:
        raise PipelineError(where, f"'{name}' coordinate has {len(v)} value(s): cannot tell the pixel size")
    step = np.diff(v)
    if not np.allclose(step, step[0], rtol=0, atol=abs(step[0]) * 1e-6):
        raise PipelineError(where, f"'{name}' coordinate is not regularly spaced")
    return float(v[0]), float(step[0]), len(v)


class Cube:
    """One tile's cube: its variables located and checked, its 10 m grid and acquisition times."""

    def __init__(self, path: Path, settings: Mapping[str, Any] | None = None) -> None:
        s = dict(settings or {})
        self.path = Path(path)
        self.files = cube_files(self.path)
        self.epsg: int | None = s.get("epsg")
        # the handles the windows read through, one per file and group
        datasets = {src: _dataset(src) for f in self.files for src in sources(f)}
        named = s.get("bands") or {}
        if unknown := sorted(set(named) - set(BANDS)):
            raise PipelineError(self.path, f"cube.bands: {', '.join(unknown)} not among {', '.join(BANDS)}")
        self.bands = {}
        for b in BANDS:
            v = self._find(datasets, (named[b],) if b in named else SPELLINGS[b], f"band {b}")
            # the config's scale/offset replace the file's (a cube of DN without CF attributes)
            v = replace(v, scale=float(s.get("scale", v.scale)), offset=float(s.get("offset", v.offset)))
            if v.scale <= 0:
                raise PipelineError(v.file, f"band {b} ({v.name}): scale {v.scale:g} must be > 0")
            self.bands[b] = v
        self.scl = self._mask(datasets, s, "scl", "SCL")
        self.cloud = self._mask(datasets, s, "cloud", None)
        if self.scl is None and self.cloud is None:
            log.warning(
                "%s: no SCL or cloud mask variable: every observation that is not fill counts as clear", path
            )
        ten = [v for v in self._variables() if v.level == 1]
        if not ten:
            raise PipelineError(self.path, "no variable on a 10 m grid: the tile's grid is the 10 m one")
        self.grid, self.times = self._grid(datasets, ten[0])
        self._check(datasets)

    def _variables(self) -> list[CubeVariable]:
        return [v for v in (*self.bands.values(), self.scl, self.cloud) if v is not None]

    def _mask(self, datasets: dict[Source, Any], s: Mapping[str, Any], key: str, default: str | None):
        if key in s:  # named (or explicitly null) in the config: must be there
            return None if s[key] is None else self._find(datasets, (s[key],), f"cube.{key}")
        names = [str(v).lower() for ds in datasets.values() for v in ds.data_vars]
        if default is None or default.lower() not in names:
            return None  # optional and absent; present but unusable is an error, as when named
        return self._find(datasets, (default,), key)

    def _find(self, datasets: dict[Source, Any], names: tuple[str, ...], what: str) -> CubeVariable:
        # names match whatever their case (B02, b02)
        hits = [(f, v) for n in names for f, ds in datasets.items() for v in ds.data_vars
                if str(v).lower() == n.lower()]  # fmt: skip
        if not hits:
            raise PipelineError(
                self.path,
                f"no variable {' or '.join(names)} for {what} in {', '.join(f.name for f in datasets)}"
                " (cube.bands maps other names)",
            )
        if len(hits) > 1:
            raise PipelineError(
                self.path, f"{what} found more than once: {', '.join(f'{f.name}:{n}' for f, n in hits)}"
            )
        f, name = hits[0]
        ds = datasets[f]
        var = ds[name]
        if var.ndim != 3 or not {"y", "x"} <= set(var.dims):
            raise PipelineError(f, f"variable {name} has dims {var.dims}, expected (time, y, x)")
        time = next(d for d in var.dims if d not in ("y", "x"))
        _, dx, _ = _axis(ds, "x", f)
        _, dy, _ = _axis(ds, "y", f)
        if dy >= 0 or dx <= 0:
            raise PipelineError(f, f"variable {name} is not north-up (x must increase and y decrease)")
        if not np.isclose(dx, -dy):
            raise PipelineError(f, f"variable {name} has non-square pixels ({dx} x {-dy})")
        level = {10.0: 1, 20.0: 2}.get(round(dx, 6))
        if level is None:
            raise PipelineError(
                f, f"variable {name} has {dx:g} m pixels; the chain reads 10 m and 20 m grids"
            )
        attrs, enc = var.attrs, var.encoding
        fill = attrs.get("_FillValue", enc.get("_FillValue"))
        kind = np.dtype(var.dtype)
        return CubeVariable(
            file=f,
            name=name,
            time=str(time),
            level=level,
            scale=float(attrs.get("scale_factor", 1.0)),
            offset=float(attrs.get("add_offset", 0.0)),
            fill=None if fill is None or (isinstance(fill, float) and np.isnan(fill)) else float(fill),
            saturated=int(np.iinfo(kind).max) if kind.kind == "u" else None,
        )

    def _grid(self, datasets: dict[Source, Any], ref: CubeVariable) -> tuple[Grid, list[datetime]]:
        ds = datasets[ref.file]
        x0, dx, w = _axis(ds, "x", ref.file)
        y0, dy, h = _axis(ds, "y", ref.file)
        crs = _crs(ds, ds[ref.name], ref.file, self.epsg)
        grid = Grid(crs, Affine(dx, 0.0, x0 - dx / 2, 0.0, dy, y0 - dy / 2), w, h)
        times = ds[ref.time].values
        if not np.issubdtype(times.dtype, np.datetime64):
            raise PipelineError(ref.file, f"time coordinate '{ref.time}' is not decoded as dates")
        stamps = [datetime.fromtimestamp(int(t.astype("datetime64[s]").astype(np.int64)), UTC) for t in times]
        return grid, stamps

    def _check(self, datasets: dict[Source, Any]) -> None:
        g, t = self.grid.transform, np.array([np.datetime64(x.replace(tzinfo=None)) for x in self.times])
        for v in self._variables():
            ds = datasets[v.file]
            x0, _, w = _axis(ds, "x", v.file)
            y0, _, h = _axis(ds, "y", v.file)
            size = 10.0 * v.level
            origin = (x0 - size / 2, y0 + size / 2)
            if not np.allclose(origin, (g.c, g.f), atol=1e-3) or (w * v.level, h * v.level) != (
                self.grid.width,
                self.grid.height,
            ):
                raise PipelineError(
                    v.file,
                    f"variable {v.name}: {w}x{h} px of {size:g} m from ({origin[0]:g}, {origin[1]:g}) "
                    f"does not cover the tile's 10 m grid ({self.grid.width}x{self.grid.height} px from "
                    f"({g.c:g}, {g.f:g}))",
                )
            times = ds[v.time].values.astype("datetime64[s]")
            if len(times) != len(t) or (times != t.astype("datetime64[s]")).any():
                raise PipelineError(v.file, f"variable {v.name}: its time axis differs from the 10 m bands'")
        if any(v.level == 2 for v in self._variables()) and (self.grid.width % 2 or self.grid.height % 2):
            raise PipelineError(self.path, f"grid size {self.grid.width}x{self.grid.height} px is not even")
        days = [x.date() for x in self.times]
        if len(set(days)) != len(days):
            dup = next(d for d in days if days.count(d) > 1)
            raise PipelineError(self.path, f"two acquisitions on {dup}: the chain keeps one per day")

    # ------------------------------------------------------------------------------------ reading

    def _read(self, v: CubeVariable, win: Window) -> np.ndarray:
        r0, c0 = int(win.row_off), int(win.col_off)
        var = _dataset(v.file)[v.name]
        part = var.isel(y=slice(r0, r0 + int(win.height)), x=slice(c0, c0 + int(win.width)))
        return np.asarray(part.transpose(v.time, "y", "x").values)

    def _reflectance(self, v: CubeVariable, raw: np.ndarray) -> np.ndarray:
        nodata = np.zeros(raw.shape, bool)
        if v.fill is not None:
            nodata |= raw == v.fill
        if v.saturated is not None:
            nodata |= raw == v.saturated
        if raw.dtype.kind == "f":
            nodata |= np.isnan(raw)
        if v.offset == 0 and abs(v.scale * 10000 - 1) < 1e-9 and raw.dtype.kind in "iu":
            r = raw.astype(np.int64)  # DN already x10000: exact, no float round trip
        else:
            r = np.rint(np.where(nodata, 0, raw).astype(np.float64) * (v.scale * 10000) + v.offset * 10000)
        clear = r[~nodata]
        if clear.size and np.median(clear) > IMPLAUSIBLE * 10000:
            raise PipelineError(
                v.file,
                f"variable {v.name}: median reflectance {np.median(clear) / 10000:g} with scale {v.scale:g}: "
                "the values are not scaled to reflectance; set cube.scale (e.g. 0.0001 for DN x10000)",
            )
        out = np.clip(r, NODATA + 1, np.iinfo(np.int16).max).astype(np.int16)
        out[nodata] = NODATA
        return out

    def read_window(self, win: Window) -> tuple[np.ndarray, np.ndarray]:
        """Every date of one 10 m window: (int16 (T, 10, h, w) reflectance x10000, bool (T, h, w) valid)."""
        h, w = int(win.height), int(win.width)
        out = np.empty((len(self.times), len(BANDS), h, w), dtype=np.int16)
        win20, pads = source_window(win, self.grid.height // 2, self.grid.width // 2)
        for i, v in enumerate(self.bands.values()):
            if v.level == 1:
                out[:, i] = self._reflectance(v, self._read(v, win))
            else:
                block = self._reflectance(v, self._read(v, win20))
                out[:, i] = upsample_block(pad_edge(block, pads), win, NODATA)
        invalid = []
        for v, rule in ((self.scl, "scl"), (self.cloud, "cloud")):
            if v is None:
                continue
            raw = (
                self._read(v, win) if v.level == 1 else nearest_block(self._read(v, nearest_window(win)), win)
            )
            if rule == "scl":
                invalid.append(scl_invalid(check_domain(raw, v.file, 0, SCL_MAX, f"SCL ({v.name})")))
            else:
                invalid.append(np.nan_to_num(raw) != 0)
        valid = np.stack([combine_validity(out[t], *(m[t] for m in invalid)) for t in range(len(self.times))])
        return out, valid

    def describe(self) -> dict[str, Any]:
        """Provenance for the ingest store (what the report lists per date)."""
        files = sorted({v.file.name for v in self._variables()})
        return {
            "products": [f"{self.path.name}@{t:%Y-%m-%dT%H:%M:%S}" for t in self.times],
            "product_dirs": [", ".join(files)] * len(self.times),
            "platforms": [""] * len(self.times),
            "relative_orbits": [None] * len(self.times),
            "variables": {b: f"{v.file.name}:{v.name}" for b, v in self.bands.items()}
            | ({"SCL": f"{self.scl.file.name}:{self.scl.name}"} if self.scl else {})
            | ({"cloud": f"{self.cloud.file.name}:{self.cloud.name}"} if self.cloud else {}),
        }
