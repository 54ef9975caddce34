"""``landcover demo``: write the demo country's L2A products (Theia / Sen2Cor layouts) and reference.

Why dates outer, windows inner: a writer holds one product at a time, and a date of a full
10980 px tile is never in memory (one 512 px window at a time). The date-independent ground
(classes, textures, phenology parameters) is rendered once per window and cached: in memory for
small tiles, in compact ``.npy`` files beside the output for big ones (a full tile would
otherwise be re-rendered for each of its ~40 dates).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from rasterio.windows import Window
from tqdm import tqdm

from pipeline.demo.landscape import Country, TileSpec
from pipeline.demo.reference import write_reference
from pipeline.demo.regions import write_regions
from pipeline.demo.render import render_window, static_for
from pipeline.demo.sensor import Pass, tile_passes
from pipeline.demo.zones import render_zone_window
from pipeline.io.atomic import atomic_path
from pipeline.io.tilestore import iter_windows

log = logging.getLogger(__name__)

_IN_MEMORY_PX = 2048 * 2048
# dtype of each cached static layer: small enough for a disk cache of a full tile (~22 B/px)
_CACHE_DTYPES = {"cls": np.uint8, "elev": np.float16, "tex": np.float16, "tex2": np.float16,
                 "pvar": np.float16, "shift": np.float16, "amp": np.float16, "dzdx": np.float16,
                 "dzdy": np.float16, "soil": np.float16, "frac": np.float16, "mode": np.float16}  # fmt: skip


class StaticCache:
    """Date-independent ground per window, rendered once; memory for small tiles, disk for large."""

    def __init__(self, c: Country, tile: TileSpec, folder: Path | None) -> None:
        self.c, self.tile, self.folder = c, tile, folder
        self.mem: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    def get(self, win: Window) -> dict[str, np.ndarray]:
        key = (int(win.row_off), int(win.col_off))
        if key in self.mem:
            return self.mem[key]
        path = None if self.folder is None else self.folder / f"{key[0]}_{key[1]}.npz"
        if path is not None and path.exists():
            with np.load(path) as z:
                return {k: z[k].astype(np.float32) if k != "cls" else z[k] for k in _CACHE_DTYPES}
        st = static_for(self.c, self.tile, win)
        small = {k: st[k].astype(v) for k, v in _CACHE_DTYPES.items()}
        if path is None:
            self.mem[key] = {k: v.astype(np.float32) if k != "cls" else v for k, v in small.items()}
            return self.mem[key]
        np.savez(path, **small)
        return {k: v.astype(np.float32) if k != "cls" else v for k, v in small.items()}


def write_tile(c: Country, tile: TileSpec, root: Path, passes: list[Pass] | None = None) -> list[Pass]:
    """Write every product of ``tile`` under ``root`` (replaced atomically as a whole)."""
    from pipeline.io.l2a import Acquisition, WindowMasks, open_writer

    passes = tile_passes(c, tile) if passes is None else passes
    grid = tile.product_grid  # its own grid: the rendering grid, or another UTM zone's (zones.py)
    zone = grid is not tile.grid
    windows = list(iter_windows(grid.height, grid.width, c.window))
    big = grid.width * grid.height > _IN_MEMORY_PX
    t0 = time.perf_counter()
    with (
        atomic_path(root) as tmp,
        tempfile.TemporaryDirectory(dir=root.parent, prefix=".demo-static-") as cdir,
    ):
        tmp.mkdir(parents=True)
        cache = StaticCache(c, tile, Path(cdir) if big else None)
        for p in tqdm(passes, desc=f"demo {tile.name}", unit="date", disable=None):
            acq = Acquisition(tile.name, p.acquired, p.platform, p.orbit, grid)
            with open_writer(tile.fmt, tmp, acq) as w:
                for win in windows:
                    if zone:
                        rw = render_zone_window(c, tile, p, win, cache.get)
                    else:
                        rw = render_window(c, tile, p, win, cache.get(win))
                    w.write(win, rw.r10, rw.r20, WindowMasks(**rw.masks()))
    log.info(
        "%s: %d %s products (%d orbits) in %.1f s -> %s",
        tile.name,
        len(passes),
        tile.fmt,
        len({p.orbit for p in passes}),
        time.perf_counter() - t0,
        root,
    )
    return passes


def generate(cfg) -> None:
    """Write the demo country described by ``cfg['demo']``: one folder of products per tile + reference."""
    c = Country.from_config(cfg)
    out = Path(c.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log.info(
        "demo country: %d tiles of %d px (overlap %d px), seed %d, EPSG:%d -> %s",
        len(c.tiles),
        c.size,
        c.overlap,
        c.seed,
        c.epsg,
        out,
    )
    for tile in c.tiles:
        write_tile(c, tile, out / tile.name)
    write_reference(c, out / "reference.gpkg")
    write_regions(c, out / "regions.gpkg")
    for stale in out.glob(".demo-static-*"):  # a killed run's cache
        shutil.rmtree(stale, ignore_errors=True)
    log.info("demo country written in %.1f s", time.perf_counter() - t0)
