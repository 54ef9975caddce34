"""Benchmark: distributed class-first sampling + exchange, and training steps, vs process count.

For P = 1, 2, 4 processes on this machine (gloo over loopback), each holding its share of 4
synthetic tiles (33 dates x 10 bands, 64-px patches, b = 8 per process):

- ``sampling``: patches/s of the whole batch pipeline (process 0 draws B = P x b patches class-first
  and broadcasts them, every process reads its own from zarr, the transfer plan moves the surplus
  point to point); bytes actually sent per batch against the plan's lower bound (the total surplus
  times the patch size), a ratio that must be 1.0;
- ``train_step``: seconds per FG-UNET training step (paper sizes: 11 groups of 30 channels, K = 17)
  with DDP, per process and for the global batch.

Processes share the machine's cores (threads per process = cores / P), so on 2 cores the step time
per global batch is what to compare, not per-process speed-ups.

    python bench/bench_distributed.py [--quick] [--procs 1,2,4] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from pipeline.io.tilestore import add_array, create_store  # noqa: E402
from pipeline.models.features import Normalisation  # noqa: E402
from pipeline.nets.arch import NetSpec, build  # noqa: E402
from pipeline.nets.data import PatchData  # noqa: E402
from pipeline.nets.distributed import BatchSource, World, process_group  # noqa: E402
from pipeline.nets.loss import weighted_sparse_ce  # noqa: E402
from pipeline.nets.patches import ClassFirstSampler, index_tile, patch_inputs  # noqa: E402
from pipeline.transfer import lower_bound  # noqa: E402

BANDS = ["B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B11", "B12"]
CODES = list(range(1, 18))  # 17 classes
N, B = 64, 8


def emit(**rec: object) -> None:
    print(json.dumps({"bench": "distributed", **rec}), flush=True)


def make_tiles(root: Path, n_tiles: int, size: int, n_dates: int) -> tuple[dict, dict, dict, Path]:
    """Tiles of random reflectance with blocky labels; percentiles 0..6000 for every channel."""
    from affine import Affine
    from rasterio.crs import CRS

    from pipeline.io.tilestore import Grid

    rng = np.random.default_rng(0)
    dates = [str(np.datetime64("2018-01-05") + 11 * i) for i in range(n_dates)]
    gap, lab, pat = {}, {}, {}
    for i in range(n_tiles):
        tile = f"T31T{chr(65 + i)}J"
        grid = Grid(CRS.from_epsg(32631), Affine(10, 0, 399960 + i * size * 10, 0, -10, 4800000), size, size)
        g = create_store(root / f"g{i}.zarr", "gapfilled", grid, tile=tile, bands=BANDS, dates=dates)
        arr = add_array(g, "reflectance", (n_dates, 10, size, size), "int16", -10000)
        for r in range(0, size, 512):
            arr[:, :, r : r + 512] = rng.integers(0, 6000, (n_dates, 10, min(512, size - r), size), np.int16)
        add_array(g, "clear_count", (size, size), "uint16", 0)[...] = n_dates
        blocks = rng.integers(0, 18, (size // 32 + 1, size // 32 + 1)).astype(np.uint8)
        labels = np.kron(blocks, np.ones((32, 32), np.uint8))[:size, :size]
        lstore = create_store(root / f"l{i}.zarr", "reference", grid, tile=tile)
        add_array(lstore, "train", (size, size), "uint8", 0)[...] = labels
        add_array(lstore, "validation", (size, size), "uint8", 0)[...] = 0
        add_array(lstore, "selection", (size, size), "uint8", 0)[...] = 0  # no model selection here
        index_tile(root / f"l{i}.zarr", tile, root / f"{tile}.train.npz", N, 16, 0.1, CODES)
        index_tile(
            root / f"l{i}.zarr", tile, root / f"{tile}.selection.npz", N, N, 0.5 / N**2, CODES, "selection"
        )
        gap[tile], lab[tile], pat[tile] = root / f"g{i}.zarr", root / f"l{i}.zarr", root / f"{tile}.train.npz"
    channels = [f"{d}/{b}" for d in dates for b in BANDS]
    doc = {"low_percentile": 3, "high_percentile": 97, "bands": BANDS, "dates": dates, "channels": channels}
    pct = root / "percentiles.json"
    pct.write_text(json.dumps(doc | {"low": [0.0] * len(channels), "high": [6000.0] * len(channels)}))
    return gap, lab, pat, pct


def worker(rank: int, world: int, port: int, args: dict, paths: tuple, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args["cores"] // world))
    gap, lab, pat, pct = paths
    norm = Normalisation.from_percentiles(pct)
    data = PatchData(gap, lab, pat, norm, N)
    sampler = ClassFirstSampler(list(data.train_index.values()), codes=CODES)
    with process_group(World(rank, world), backend="gloo") as w:
        src = BatchSource(data, sampler, w, B, augment=True)
        rng = np.random.default_rng(1)
        src(rng)  # warm-up
        src.sent_bytes = 0
        minimum = 0
        t0 = time.perf_counter()
        for _ in range(args["steps"]):
            x, _ = src(rng)
            minimum += lower_bound(src.last_plan.owner, world, B)
        if world > 1:
            torch.distributed.barrier()
        dt = time.perf_counter() - t0
        patch_bytes = x[0].nbytes + N * N
        sent = torch.tensor([src.sent_bytes], dtype=torch.int64)
        if world > 1:
            torch.distributed.all_reduce(sent)
        # a training step on the same pipeline: FG-UNET at paper size, DDP over the processes
        net = build(NetSpec("fgunet", 30, 11, 17))
        model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
        opt = torch.optim.Adam(net.parameters())
        weights = torch.ones(17)
        times = []
        for i in range(args["train_steps"] + 1):
            t = time.perf_counter()
            x, y = src(rng)
            xt = torch.from_numpy(patch_inputs(x, norm, ()))
            yt = torch.from_numpy(np.where(y > 0, y.astype(np.int64) - 1, -1))
            loss = weighted_sparse_ce(model(xt), yt, weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - t)
        if rank == 0:
            Path(out).write_text(
                json.dumps(
                    {
                        "procs": world,
                        "patches_per_s": args["steps"] * world * B / dt,
                        "bytes_sent_per_batch": int(sent.item()) / args["steps"],
                        "lower_bound_bytes_per_batch": minimum * patch_bytes / args["steps"],
                        "train_step_s": float(np.median(times)),
                        "global_batch": world * B,
                    }
                )
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--procs", default="1,2,4")
    ap.add_argument("--steps", type=int, default=0)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    emit(kind="machine", **machine())
    with tempfile.TemporaryDirectory() as tmp:
        size = 512 if args.quick else 1024
        paths = make_tiles(Path(tmp), 4, size, 33)
        for world in [int(p) for p in args.procs.split(",")]:
            steps = args.steps or (10 if args.quick else 40)
            opts = {"steps": steps, "train_steps": 2 if args.quick else 4, "cores": cores}
            out = Path(tmp) / f"r{world}.json"
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.start_processes(
                worker, args=(world, port, opts, paths, str(out)), nprocs=world, start_method="spawn"
            )
            rec = json.loads(out.read_text())
            lb = rec["lower_bound_bytes_per_batch"]
            rec["sent_over_lower_bound"] = rec["bytes_sent_per_batch"] / lb if lb else None
            emit(kind="result", tile_px=size, tiles=4, **rec)


if __name__ == "__main__":
    main()
