"""Ingest: one tile's L2A products (Theia or Sen2Cor) -> the per-tile ``ingest`` zarr store.

The store holds ``reflectance`` int16 (T, 10, H, W) x10000 (NODATA fill, bands in
:data:`~pipeline.io.l2a.BANDS` order, 20 m bands bicubic-upsampled) and ``valid`` uint8 (T, H, W),
1 = clear observation. It is streamed in 512 px shards across all dates, ``threads`` shards at a time
(or on dask workers, see :mod:`pipeline.parallel`), so memory is bounded by a few
T x 10 x 512 x 512 x 2 bytes whatever the tile size, and written under a temporary
name: any bad input ends in a :class:`PipelineError` naming the file and leaves no output.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window

from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path
from pipeline.io.l2a import BANDS, FORMATS, NODATA, Product, find_products, kept_open, normalise_tile
from pipeline.io.tilestore import Grid, add_array, create_store, for_each_window, win_slices
from pipeline.parallel import window_executor

log = logging.getLogger(__name__)


def warn_off_grid(grid: Grid, where: Path) -> None:
    """Sentinel-2 L2A is on MGRS tiles: 10 m pixels whose corners lie on multiples of 10 m. A
    converted product off that lattice still maps, but its areas and its seams with the
    neighbouring tiles are off; say so once, naming the product."""
    t = grid.transform
    if abs(t.a - 10) > 1e-6 or abs(t.e + 10) > 1e-6 or t.b or t.d:
        log.warning(
            "%s: pixel size %g x %g m, not Sentinel-2's 10 m: areas use it as given", where, t.a, -t.e
        )
    elif abs(t.c / 10 - round(t.c / 10)) > 1e-6 or abs(t.f / 10 - round(t.f / 10)) > 1e-6:
        log.warning(
            "%s: grid origin (%g, %g) is off the 10 m lattice of MGRS tiles: its maps will not line up "
            "with those of neighbouring tiles",
            where, t.c, t.f,
        )  # fmt: skip


def check_products(products: list[Product], folder: Path, fmt: str, tile: str) -> None:
    """Refuse an empty series, products on another CRS/grid than the first, and duplicate dates."""
    if not products:
        raise PipelineError(folder, f"no {fmt} L2A product of tile {normalise_tile(tile)} in this folder")
    ref = products[0]
    w, h = ref.grid.width, ref.grid.height
    if w % 2 or h % 2:
        raise PipelineError(
            ref.path,
            f"grid size {w}x{h} px is not even: each 20 m pixel covers 2x2 of the 10 m grid, so crop every "
            f"product of the tile to {w // 2 * 2}x{h // 2 * 2} px (drop the last "
            f"{' and '.join(x for x, odd in (('column', w % 2), ('row', h % 2)) if odd)}, 20 m bands alike)",
        )
    warn_off_grid(ref.grid, ref.path)
    seen: dict[object, Product] = {}
    for p in products:
        if p.grid.crs != ref.grid.crs:
            raise PipelineError(p.path, f"CRS {p.grid.crs} differs from {ref.grid.crs} of {ref.path.name}")
        if not p.grid.same_as(ref.grid):
            raise PipelineError(p.path, f"pixel grid differs from the one of {ref.path.name}")
        if p.date in seen:
            raise PipelineError(p.path, f"same acquisition date {p.date} as {seen[p.date].path.name}")
        seen[p.date] = p
    if no_orbit := [p.path.name for p in products if p.relative_orbit is None]:
        log.warning(
            "%d products without a relative orbit number in their metadata (provenance only: the report "
            "lists it per product), e.g. %s",
            len(no_orbit), no_orbit[0],
        )  # fmt: skip


def ingest_tile(
    products_dir: Path,
    fmt: str,
    tile: str,
    out: Path,
    threads: int = 1,
    dask: Mapping[str, Any] | None = None,
) -> None:
    """Build the ingest store ``out`` for ``tile`` from the ``fmt`` products found in ``products_dir``."""
    products_dir, out = Path(products_dir), Path(out)
    if fmt == "cube":
        raise PipelineError(products_dir, f"tile {tile} is a cube (format: cube): landcover import reads it")
    if fmt not in FORMATS:
        raise PipelineError(
            products_dir, f"unknown product format {fmt!r} (expected one of {', '.join(FORMATS)})"
        )
    products = find_products(products_dir, fmt, tile)
    check_products(products, products_dir, fmt, tile)

    def read(win) -> tuple[np.ndarray, np.ndarray]:
        results = [p.read_window(win) for p in products]
        return np.stack([r for r, _ in results]), np.stack([v for _, v in results])

    with kept_open():  # each file opened once per thread, not once per window
        write_store(
            out,
            tile,
            products[0].grid,
            read,
            {
                "format": fmt,
                "dates": [p.date.isoformat() for p in products],
                "acquired": [p.acquired.isoformat() for p in products],
                "products": [p.product_id for p in products],
                # provenance for the QA report: where each date came from
                "source": str(products_dir),
                "product_dirs": [p.path.name for p in products],
                "platforms": [p.platform for p in products],
                "relative_orbits": [p.relative_orbit for p in products],
            },
            threads=threads,
            dask=dask,
        )


def import_cube(
    path: Path,
    tile: str,
    out: Path,
    settings: Mapping[str, Any] | None = None,
    threads: int = 1,
    dask: Mapping[str, Any] | None = None,
) -> None:
    """Build the ingest store ``out`` for ``tile`` from a netCDF/zarr cube (:mod:`pipeline.io.cube`):
    the same store, window for window, as the product readers give for the same data."""
    from pipeline.io.cube import Cube

    cube = Cube(Path(path), settings)
    warn_off_grid(cube.grid, cube.path)
    info = cube.describe()
    write_store(
        out,
        tile,
        cube.grid,
        cube.read_window,
        {
            "format": "cube",
            "dates": [t.date().isoformat() for t in cube.times],
            "acquired": [t.isoformat() for t in cube.times],
            "source": str(cube.path),
            **info,
        },
        threads=threads,
        dask=dask,
    )


def write_store(
    out: Path,
    tile: str,
    grid: Grid,
    read: Callable[[Window], tuple[np.ndarray, np.ndarray]],
    attrs: Mapping[str, Any],
    threads: int = 1,
    dask: Mapping[str, Any] | None = None,
) -> None:
    """The ingest store of one tile, shard by shard: ``read(window)`` gives every date of a 10 m
    window as (int16 (T, 10, h, w) reflectance, bool (T, h, w) valid). Written under a temporary
    name: a failure leaves no output."""
    out = Path(out)
    n, h, w = len(attrs["dates"]), grid.height, grid.width
    log.info("ingest %s: %d dates (%s), %dx%d px", tile, n, attrs["format"], w, h)
    with atomic_path(out) as tmp:
        group = create_store(tmp, "ingest", grid, tile=normalise_tile(tile), bands=list(BANDS), **attrs)
        refl = add_array(group, "reflectance", (n, len(BANDS), h, w), "int16", NODATA)
        valid = add_array(group, "valid", (n, h, w), "uint8", 0)

        def one(win) -> None:
            # self-contained (may run on a dask worker): every date of one shard, read then written
            r, v = read(win)
            ys, xs = win_slices(win)
            refl[:, :, ys, xs] = r
            valid[:, ys, xs] = v.astype(np.uint8)

        with window_executor(dask, threads) as pool:
            for_each_window(one, h, w, threads, f"ingest {tile}", executor=pool)
