"""Common model of a Sentinel-2 L2A product, whatever its distribution layout (Theia or Sen2Cor).

Ingest only sees :class:`Product` (read a 10 m window of all 10 bands plus a validity mask)
and the demo generator only sees :func:`open_writer`; the layout details live in
:mod:`pipeline.io.theia` and :mod:`pipeline.io.sen2cor`. Reflectances are int16 x10000 with
``NODATA`` everywhere in between, 20 m bands are brought to 10 m by :mod:`pipeline.resample`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import resource
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.windows import Window

from pipeline.errors import PipelineError
from pipeline.io.tilestore import Grid

BANDS = ("B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12")
BANDS_10M = ("B2", "B3", "B4", "B8")
BANDS_20M = ("B5", "B6", "B7", "B8A", "B11", "B12")
NODATA = -10000
FORMATS = ("theia", "sen2cor")
log = logging.getLogger(__name__)
# position of each 10 m / 20 m band in the cube band order
IDX_10M = [BANDS.index(b) for b in BANDS_10M]
IDX_20M = [BANDS.index(b) for b in BANDS_20M]


@dataclass(frozen=True)
class Acquisition:
    """What a writer needs to name and georeference one product."""

    tile: str  # "T31TCJ" (a leading "T" is added when missing)
    acquired: datetime  # UTC
    platform: str  # "SENTINEL2A" / "SENTINEL2B"
    relative_orbit: int
    grid: Grid  # the 10 m grid; the 20 m grid has the same origin, 20 m pixels, half the size

    @property
    def tile_id(self) -> str:
        return self.tile if self.tile.startswith("T") else f"T{self.tile}"


@dataclass
class WindowMasks:
    """Per-pixel flags of one 10 m window, all bool (h, w)."""

    cloud: np.ndarray
    shadow: np.ndarray
    saturated: np.ndarray
    edge: np.ndarray
    snow: np.ndarray | None = None
    water: np.ndarray | None = None


def grid20(grid: Grid) -> Grid:
    """The 20 m grid sharing the 10 m grid's origin."""
    t = grid.transform
    return Grid(grid.crs, Affine(t.a * 2, t.b, t.c, t.d, t.e * 2, t.f), grid.width // 2, grid.height // 2)


def normalise_tile(tile: str) -> str:
    return tile if tile.startswith("T") else f"T{tile}"


@dataclass(frozen=True)
class Product:
    """One L2A product on disk, parsed from its metadata and checked against its rasters."""

    path: Path
    fmt: str
    tile: str
    acquired: datetime
    product_id: str
    grid: Grid
    band_files: dict[str, Path]
    mask_files: dict[str, Path]  # theia: CLM_R1, SAT_R1, SAT_R2, EDG_R1, EDG_R2; sen2cor: SCL
    metadata: Path
    platform: str = ""
    relative_orbit: int | None = None
    offsets: dict[str, int] = field(default_factory=dict)  # sen2cor BOA_ADD_OFFSET per band
    quantification: float = 10000.0

    @property
    def date(self) -> date:
        return self.acquired.date()

    def read_window(self, win: Window) -> tuple[np.ndarray, np.ndarray]:
        """(int16 (10, h, w) reflectance x10000 in BANDS order at 10 m, bool (h, w) valid)."""
        if self.fmt == "theia":
            from pipeline.io import theia

            return theia.read_window(self, win)
        from pipeline.io import sen2cor

        return sen2cor.read_window(self, win)


def combine_validity(reflectance: np.ndarray, *invalid: np.ndarray) -> np.ndarray:
    """Clear observation = no band at NODATA and no invalidity layer set (pure, no I/O)."""
    valid = ~(reflectance == NODATA).any(axis=0)
    for layer in invalid:
        valid &= ~layer.astype(bool)
    return valid


def find_products(folder: Path, fmt: str, tile: str) -> list[Product]:
    """All products of ``fmt`` in ``folder``, sorted by acquisition time.

    A product of another tile in the folder is an error (a mis-filed download would otherwise
    be silently dropped or, worse, mixed in), and so is a product whose metadata date contradicts
    its folder name (one of the two is damaged). Entries that are not product folders by the
    format's name pattern are skipped with a warning naming them; hidden ones (the chain's own
    temporaries) silently.
    """
    folder = Path(folder)
    if fmt not in FORMATS:
        raise PipelineError(folder, f"unknown product format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if not folder.is_dir():
        raise PipelineError(folder, "product folder does not exist")
    if fmt == "theia":
        from pipeline.io import theia as module
    else:
        from pipeline.io import sen2cor as module
    products, skipped = [], []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and module.NAME_RE.match(entry.name):
            products.append(module.open_product(entry))
        else:
            skipped.append(entry.name + _near_miss(entry, module.METADATA))
    if skipped:
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        names = ", ".join(skipped[:5]) + more
        log.warning(
            "%s: skipped, not named as a %s product folder (%s): %s", folder, fmt, module.NAME_FORM, names
        )
    want = normalise_tile(tile)
    for p in products:
        if p.tile != want:
            raise PipelineError(p.path, f"product of tile {p.tile} found in the folder of tile {want}")
        named = name_date(p.path.name)
        if named is not None and named != p.date:
            raise PipelineError(
                p.metadata,
                f"acquisition date {p.date} contradicts the product folder's name ({named}): "
                "one of the two is damaged",
            )
    if not products and skipped:
        raise PipelineError(
            folder,
            f"no {fmt} L2A product of tile {want} in this folder: {len(skipped)} entries skipped whose "
            f"names do not follow the pattern {module.NAME_FORM} (e.g. {skipped[0]})",
        )
    return sorted(products, key=lambda p: p.acquired)


def _near_miss(entry: Path, metadata: str) -> str:
    """For a skipped folder that holds the format's metadata file (``metadata``, a glob): what to
    rename it to. A ``*<suffix>`` file (Theia) is named after its product, so it gives the name."""
    found = next(iter(sorted(entry.glob(metadata))), None) if entry.is_dir() else None
    if found is None:
        return ""
    name = found.name.removesuffix(metadata[1:]) if metadata.startswith("*") else "its product id"
    return f" (holds {found.name}: a product whose folder name does not match; rename the folder to {name})"


def name_date(name: str) -> date | None:
    """The acquisition date in a product folder name (Theia ``SENTINEL2A_20190501-105039-...``,
    Sen2Cor ``S2A_MSIL2A_20190501T105039_...``): the first 8-digit group after an underscore."""
    m = re.search(r"_(\d{4})(\d{2})(\d{2})[-T]", name)
    if not m:
        return None
    try:
        return date(int(m[1]), int(m[2]), int(m[3]))
    except ValueError:
        return None


class ProductWriter(Protocol):
    def write(self, window: Window, r10: np.ndarray, r20: np.ndarray, masks: WindowMasks) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> ProductWriter: ...

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None: ...


def open_writer(fmt: str, root: Path, acq: Acquisition, **options: Any) -> ProductWriter:
    """A writer for one product of ``fmt`` under ``root`` (see the format modules for options)."""
    if fmt == "theia":
        from pipeline.io import theia

        return theia.TheiaWriter(Path(root), acq, **options)
    if fmt == "sen2cor":
        from pipeline.io import sen2cor

        return sen2cor.Sen2CorWriter(Path(root), acq, **options)
    raise ValueError(f"unknown product format {fmt!r}")


# ---------------------------------------------------------------- helpers shared by the layouts


def check_raster(
    path: Path,
    crs: CRS,
    transform: Affine,
    width: int,
    height: int,
    *,
    dtype: str | None = None,
    nodata: float | None = None,
    spec: str = "",
) -> None:
    """The file exists, opens, sits on the georeferencing the metadata announces, and holds what the
    format specifies: one band of ``dtype``, no-data ``nodata`` where it declares one. A float
    reflectance in 0-1 where the format stores int16 x 10000 would otherwise read as 0 and count
    as clear."""
    if not path.is_file():
        raise PipelineError(path, "file listed in the product metadata is missing")
    try:
        with rasterio.open(path) as ds:
            got_crs, got_t, w, h = ds.crs, ds.transform, ds.width, ds.height
            count, got_dtype, got_nodata = ds.count, ds.dtypes[0], ds.nodata
    except rasterio.errors.RasterioError as exc:
        raise PipelineError(path, f"unreadable raster ({exc})") from exc
    if count != 1:
        raise PipelineError(path, f"{count} bands; the format has one band per file ({spec})")
    if dtype is not None and got_dtype != dtype:
        raise PipelineError(path, f"data type {got_dtype}, the format specifies {dtype} ({spec})")
    if nodata is not None and got_nodata is not None and got_nodata != nodata:
        raise PipelineError(path, f"no-data value {got_nodata:g}, the format specifies {nodata:g} ({spec})")
    if got_crs is None or got_crs != crs:
        raise PipelineError(path, f"CRS {got_crs} differs from the metadata's {crs}")
    if not got_t.almost_equals(transform, precision=1e-6) or (w, h) != (width, height):
        raise PipelineError(
            path,
            f"georeferencing {tuple(got_t)[:6]} {w}x{h} differs from the metadata's "
            f"{tuple(transform)[:6]} {width}x{height}",
        )


def check_domain(values: np.ndarray, path: Path, low: int, high: int, what: str) -> np.ndarray:
    """Values outside ``[low, high]`` mean the file is not what the format says (another product
    level, a rescaled or re-encoded band): refused, naming the file, rather than read as data."""
    if values.size and (values.min() < low or values.max() > high):
        bad = values.min() if values.min() < low else values.max()
        raise PipelineError(path, f"value {bad} outside {low}..{high}, the format's range for {what}")
    return values


class _Handles:
    """Open datasets kept per thread while a stage reads the same files window after window.

    Ingest reads every band and mask file of every product once per 512-px window: on a full tile
    (~480 windows x ~1,500 files for a year) opening each file anew (GDAL open, TIFF directory,
    rasterio's environment) is a large share of the stage. Each thread keeps its own handles (a
    GDAL dataset is not to be read by two threads at once), at most ``limit`` in all; beyond that,
    files are opened per read as before."""

    def __init__(self, limit: int) -> None:
        self.local = threading.local()
        self.lock = threading.Lock()
        self.opened: list[Any] = []
        self.limit = limit

    def get(self, path: Path) -> Any | None:
        mine = getattr(self.local, "open", None)
        if mine is None:
            mine = self.local.open = {}
        ds = mine.get(path)
        if ds is None:
            with self.lock:
                if len(self.opened) >= self.limit:
                    return None
                ds = rasterio.open(path)
                self.opened.append(ds)
            mine[path] = ds
        return ds

    def close(self) -> None:
        with self.lock:
            for ds in self.opened:
                ds.close()
            self.opened.clear()


_HANDLES: _Handles | None = None


@contextlib.contextmanager
def kept_open(limit: int | None = None) -> Iterator[None]:
    """Within this block, :func:`read_raster` keeps each thread's files open (see :class:`_Handles`);
    all are closed on leaving it. ``limit``: default a quarter of the process's file-descriptor
    limit. Windows run on dask workers (other processes) open their files per read."""
    global _HANDLES
    if limit is None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        limit = 4096 if soft == resource.RLIM_INFINITY else max(0, soft // 4)
    previous, _HANDLES = _HANDLES, _Handles(limit)
    try:
        yield
    finally:
        _HANDLES.close()
        _HANDLES = previous


def read_raster(path: Path, win: Window) -> np.ndarray:
    """Read band 1 of ``win``; any GDAL failure (truncated/corrupt file) names the file."""
    try:
        handles = _HANDLES
        ds = handles.get(path) if handles is not None else None
        if ds is not None:
            return ds.read(1, window=win)
        with rasterio.open(path) as ds:
            return ds.read(1, window=win)
    except rasterio.errors.RasterioError as exc:
        causes, e = [], exc  # GDAL's real reason ("TIFFReadEncodedTile() failed") sits in the chain
        while e is not None and len(causes) < 4:
            causes.append(str(e))
            e = e.__cause__ or e.__context__
        raise PipelineError(
            path, f"cannot read raster, corrupt or truncated ({'; '.join(causes[::-1])})"
        ) from exc


class WindowTracker:
    """Checks windows handed to a writer: even, inside the grid, no overlap, full coverage at the end."""

    def __init__(self, grid: Grid) -> None:
        if grid.width % 2 or grid.height % 2:
            raise ValueError(f"grid size {grid.width}x{grid.height} must be even (20 m = half the 10 m size)")
        self.grid = grid
        self.windows: list[tuple[int, int, int, int]] = []
        self.area = 0

    def add(self, win: Window) -> tuple[int, int, int, int]:
        r0, c0, h, w = int(win.row_off), int(win.col_off), int(win.height), int(win.width)
        if min(r0, c0, h, w) < 0 or r0 + h > self.grid.height or c0 + w > self.grid.width:
            raise ValueError(f"window {win} outside the {self.grid.height}x{self.grid.width} grid")
        if r0 % 2 or c0 % 2 or h % 2 or w % 2:
            raise ValueError(f"window {win} must have even offsets and sizes (20 m alignment)")
        for q0, d0, qh, qw in self.windows:
            if r0 < q0 + qh and q0 < r0 + h and c0 < d0 + qw and d0 < c0 + w:
                raise ValueError(f"window {win} overlaps a window already written")
        self.windows.append((r0, c0, h, w))
        self.area += h * w
        return r0, c0, h, w

    def check_complete(self) -> None:
        if self.area != self.grid.width * self.grid.height:
            raise ValueError(
                f"windows cover {self.area} of {self.grid.width * self.grid.height} pixels: grid not covered"
            )


def check_window_arrays(win: Window, r10: np.ndarray, r20: np.ndarray, masks: WindowMasks) -> None:
    h, w = int(win.height), int(win.width)
    if r10.shape != (len(BANDS_10M), h, w) or r20.shape != (len(BANDS_20M), h // 2, w // 2):
        raise ValueError(f"r10 {r10.shape} / r20 {r20.shape} do not fit window {h}x{w}")
    for name in ("cloud", "shadow", "saturated", "edge", "snow", "water"):
        m = getattr(masks, name)
        if m is not None and m.shape != (h, w):
            raise ValueError(f"mask {name} {m.shape} does not fit window {h}x{w}")


def any2x2(mask: np.ndarray) -> np.ndarray:
    """20 m flag = any of its four 10 m pixels flagged (conservative for cloud/edge/saturation)."""
    h, w = mask.shape
    return mask.reshape(h // 2, 2, w // 2, 2).any(axis=(1, 3))


def mean2x2(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[-2:]
    return img.reshape(*img.shape[:-2], h // 2, 2, w // 2, 2).astype(np.float64).mean(axis=(-3, -1))


class ProductWriterBase:
    """Lifecycle shared by the format writers: open band files in a temporary product folder, accept
    windows, and on :meth:`close` check coverage, let the format write its metadata, rename into place.
    Any failure (or an exception inside ``with``) closes the files and leaves nothing behind.
    """

    def _start(self, grid: Grid, final: Path) -> None:
        self.tracker = WindowTracker(grid)
        self._folder = AtomicFolder(final)
        self._ds: dict[str, Any] = {}

    def _finalise(self, folder: Path) -> None:
        """Format-specific last step (metadata files), run after every raster is closed."""
        raise NotImplementedError

    def _close_datasets(self) -> None:
        for ds in self._ds.values():
            if not ds.closed:
                ds.close()

    def _abort(self, exc: BaseException | None) -> None:
        self._close_datasets()
        self._folder.abort(exc)

    def close(self) -> None:
        try:
            self.tracker.check_complete()
            self._close_datasets()
            self._finalise(self._folder.tmp)
        except BaseException as exc:
            self._abort(exc)
            raise
        self._folder.commit()

    def __enter__(self) -> ProductWriterBase:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if ev is None:
            self.close()
        else:
            self._abort(ev)


class AtomicFolder:
    """Enter :func:`atomic_path` by hand so a writer object can own it across method calls."""

    def __init__(self, final: Path) -> None:
        from pipeline.io.atomic import atomic_path

        self._cm = atomic_path(final)
        self.tmp = self._cm.__enter__()
        self.tmp.mkdir(parents=True)

    def commit(self) -> None:
        self._cm.__exit__(None, None, None)

    def abort(self, exc: BaseException | None = None) -> None:
        err = exc or RuntimeError("writer aborted")
        with contextlib.suppress(BaseException):
            self._cm.__exit__(type(err), err, err.__traceback__)
