"""National mosaic time and peak memory against GDAL's own command-line tools, in the same run.

A block of G x G tiles of ``--tile`` px (default 2 x 2 full 10,980 px tiles with the real MGRS
overlap of 984 px) is written as the chain's tile layers (class map, confidence, clear count; the
classes are fields of 64-256 px with 1-4 px specks, the same ground in every overlap). Then, each in
its own process, timed with its peak RSS:

* ``ours``: :func:`pipeline.mosaic.build_mosaic`, the three COGs with overlaps to the nearest tile
  centre and the true-area tally;
* ``gdal``: for each of the three layers, ``gdalbuildvrt`` + ``gdal_translate -of COG`` with the same
  compression, block size, overview resampling and threads (the last tile wins in an overlap: no
  arbitration, no area tally; the same bytes written).

With ``--vector``, also the vector product of the class mosaic in blocks (``ours``: sieve,
polygonise, coverage simplification, statistics) against ``gdal_sieve.py`` + ``gdal_polygonize.py``
on the whole mosaic. Prints one JSON line; docs/benchmarks.md keeps the figures with the machine.

    python bench/bench_mosaic.py [--tile 10980] [--overlap 984] [--grid 2] [--vector] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from affine import Affine
from rasterio.crs import CRS

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from pipeline.config import ClassDef  # noqa: E402
from pipeline.io.cog import class_map_writer, cog_writer, confidence_writer  # noqa: E402
from pipeline.io.tilestore import Grid, iter_windows  # noqa: E402

CLASSES = [
    ClassDef(c, f"C{c}", f"class {c}", f"#{(37 * c) % 256:02x}{(91 * c) % 256:02x}{(53 * c) % 256:02x}")
    for c in range(1, 18)
]
UTM31 = CRS.from_epsg(32631)


def ground(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Classes 1-17 on world pixel indices: fields of 64-256 px, specks of 1-4 px (what a sieve removes)."""
    r, c = rows[:, None], cols[None, :]
    field = ((r // 96) * 7 + (c // 160) * 13 + (r // 256) * 3) % 17
    h = (r * 73856093 ^ c * 19349663) & 0xFFFF
    speck = ((r // 3) * 83492791 ^ (c // 3) * 2654435761) & 0x3FF
    out = np.where(speck < 8, (field + 5 + h % 7) % 17, field)
    return (out + 1).astype(np.uint8)


def write_tiles(root: Path, tile: int, overlap: int, g: int) -> list[tuple[str, Path, Path, Path]]:
    out = []
    for i in range(g):
        for j in range(g):
            name = f"T31T{chr(65 + i)}{chr(65 + j)}X"[:6]
            r0, c0 = i * (tile - overlap), j * (tile - overlap)
            grid = Grid(UTM31, Affine(10, 0, 300000 + c0 * 10, 0, -10, 5000000 - r0 * 10), tile, tile)
            paths = (root / f"{name}.tif", root / f"{name}_confidence.tif", root / f"{name}_clear.tif")
            with (
                class_map_writer(paths[0], grid, CLASSES, threads=2) as cls,
                confidence_writer(paths[1], grid, threads=2) as conf,
                cog_writer(paths[2], grid, "uint16", nodata=None, resampling="AVERAGE", threads=2) as clear,
            ):
                for win in iter_windows(tile, tile, 2048):
                    rows = r0 + int(win.row_off) + np.arange(int(win.height))
                    cols = c0 + int(win.col_off) + np.arange(int(win.width))
                    k = ground(rows, cols)
                    cls.write(win, k)
                    conf.write(win, (40 + (k.astype(np.uint16) * 7) % 60).astype(np.uint8))
                    clear.write(win, (k.astype(np.uint16) % 9 + 3))
            out.append((name, *paths))
    return out


def timed(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in GB, CPU seconds over all threads) of one command, in its own process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(
            f"{cmd[:3]}... failed: {proc.stderr.read().decode()[-2000:] if proc.stderr else ''}"
        )
    return wall, usage.ru_maxrss / 1e6, usage.ru_utime + usage.ru_stime  # kB -> GB


OURS = """
import sys, json
from pathlib import Path
from pipeline.mosaic import TileLayers, build_mosaic
sys.path.insert(0, {bench!r})
from bench_mosaic import CLASSES
tiles = [TileLayers(n, Path(a), Path(b), Path(c)) for n, a, b, c in json.loads({tiles!r})]
out = Path({out!r})
build_mosaic(tiles, CLASSES, out / "classes.tif", out / "confidence.tif", out / "clear.tif")
"""

OURS_VECTOR = """
import sys
from pathlib import Path
import numpy as np, rasterio
from rasterio.windows import Window, transform as wt
from pipeline.io.tilestore import Grid
from pipeline.mosaic import pixel_areas
from pipeline.vector import Part, _grow, parts_of, vectorise_part
src = rasterio.open({mosaic!r})
grid = Grid(src.crs, src.transform, src.width, src.height)
n = 0
for part in parts_of(grid, None, 8192):
    win = _grow(part.window, 10, grid)
    cls = src.read(1, window=win)
    inside = np.zeros(cls.shape, bool)
    r0, c0 = int(part.window.row_off - win.row_off), int(part.window.col_off - win.col_off)
    inside[r0 : r0 + int(part.window.height), c0 : c0 + int(part.window.width)] = True
    g, cols = vectorise_part(cls, np.full(cls.shape, 50, np.uint8), inside, pixel_areas(grid, win),
                             wt(win, grid.transform), 10, 4, 5.0)
    n += len(g)
print(n)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tile", type=int, default=10980, help="tile side, px")
    ap.add_argument("--overlap", type=int, default=984, help="overlap of neighbouring tiles, px")
    ap.add_argument("--grid", type=int, default=2, help="G x G tiles")
    ap.add_argument("--vector", action="store_true", help="also time the vector product against GDAL's")
    ap.add_argument("--keep", type=Path, help="work here and keep the files (default: a temporary folder)")
    args = ap.parse_args()
    for tool in ("gdalbuildvrt", "gdal_translate"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install gdal-bin python3-gdal")
    work = args.keep or Path(tempfile.mkdtemp(prefix="bench_mosaic_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tiles = write_tiles(work / "tiles", args.tile, args.overlap, args.grid)
    setup = time.perf_counter() - t0
    side = args.grid * args.tile - (args.grid - 1) * args.overlap
    res: dict[str, object] = {"bench": "mosaic", "machine": machine(), "tiles": len(tiles)}
    res |= {
        "tile_px": args.tile,
        "overlap_px": args.overlap,
        "mosaic_px": [side, side],
        "setup_s": round(setup, 1),
    }

    code = OURS.format(bench=str(Path(__file__).resolve().parent),
                       tiles=json.dumps([[n, str(a), str(b), str(c)] for n, a, b, c in tiles]),
                       out=str(work / "ours"))  # fmt: skip
    wall, rss, cpu = timed([sys.executable, "-c", code])
    res["ours"] = {"seconds": round(wall, 1), "peak_rss_gb": round(rss, 2), "cpu_s": round(cpu, 1)}

    gdal_wall, gdal_rss, gdal_cpu = 0.0, 0.0, 0.0
    (work / "gdal").mkdir(exist_ok=True)
    for k, (layer, resampling) in enumerate(
        (("classes", "MODE"), ("confidence", "AVERAGE"), ("clear", "AVERAGE"))
    ):
        vrt = work / "gdal" / f"{layer}.vrt"
        w1, r1, c1 = timed(["gdalbuildvrt", "-q", str(vrt), *(str(t[1 + k]) for t in tiles)])
        w2, r2, c2 = timed([
            "gdal_translate", "-q", "-of", "COG", "-co", "COMPRESS=DEFLATE", "-co", "BLOCKSIZE=512",
            "-co", f"RESAMPLING={resampling}", "-co", "NUM_THREADS=2", "-co", "BIGTIFF=IF_SAFER",
            str(vrt), str(work / "gdal" / f"{layer}.tif"),
        ])  # fmt: skip
        gdal_wall += w1 + w2
        gdal_cpu += c1 + c2
        gdal_rss = max(gdal_rss, r1, r2)
    res["gdal"] = {"seconds": round(gdal_wall, 1), "peak_rss_gb": round(gdal_rss, 2),
                   "cpu_s": round(gdal_cpu, 1)}  # fmt: skip
    res["ratio_to_gdal"] = round(float(res["ours"]["seconds"]) / gdal_wall, 2)  # type: ignore[index]

    if args.vector:
        mosaic = str(work / "ours" / "classes.tif")
        wall, rss, _ = timed([sys.executable, "-c", OURS_VECTOR.format(mosaic=mosaic)])
        res["vector_ours"] = {"seconds": round(wall, 1), "peak_rss_gb": round(rss, 2)}
        sieved = str(work / "gdal" / "sieved.tif")
        w1, r1, _ = timed(["gdal_sieve.py", "-q", "-st", "10", "-4", mosaic, sieved])
        w2, r2, _ = timed(["gdal_polygonize.py", "-q", str(work / "gdal" / "sieved.tif"), "-f", "GPKG",
                        str(work / "gdal" / "polygons.gpkg"), "landcover", "class_code"])  # fmt: skip
        res["vector_gdal"] = {"seconds": round(w1 + w2, 1), "peak_rss_gb": round(max(r1, r2), 2),
                              "sieve_s": round(w1, 1), "polygonize_s": round(w2, 1)}  # fmt: skip
    print(json.dumps(res))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
