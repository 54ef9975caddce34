"""Training on several processes (seed §3.3.2, §3.3.6): tile ownership, the batch plan, the exchange.

Every process holds a share of the tiles (reads patches only from those; tiles are never loaded
whole, zarr is read per patch). Per batch, process 0 draws ``B = world * b`` patches class-first plus
their augmentation, and broadcasts that list; every process derives from it the same minimal
transfer plan (:mod:`pipeline.transfer`), reads the patches it owns, sends its surplus point to
point and receives what it lacks, and ends with exactly ``b`` patches, in global batch order.
Gradients are then averaged by DistributedDataParallel, so a step on ``world`` processes equals
one step of a single process on the same ``B`` patches.

A single process is the special case ``world = 1`` of the same code (no collective is called), so
the one-process run and the distributed run share every line of sampling.

Launch: ``torchrun --nproc-per-node N landcover train ...`` (RANK / WORLD_SIZE / MASTER_ADDR /
MASTER_PORT from torchrun), or ``srun`` under SLURM (SLURM_PROCID / SLURM_NTASKS; the rendezvous
host is the allocation's first node, the port derives from the job id unless MASTER_PORT is set).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from pipeline.nets.patches import PatchRef, augment_batch
from pipeline.transfer import TransferPlan, plan_transfers

if TYPE_CHECKING:
    from pipeline.nets.data import PatchData
    from pipeline.nets.patches import ClassFirstSampler

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_from_env(env: dict[str, str] | None = None) -> World:
    """torchrun's RANK/WORLD_SIZE, else srun's SLURM_PROCID/SLURM_NTASKS, else one process."""
    env = dict(os.environ if env is None else env)
    if "WORLD_SIZE" in env and "RANK" in env:
        return World(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return World(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)))
    return World()


def rendezvous(env: dict[str, str] | None = None) -> tuple[str, int]:
    """MASTER_ADDR/MASTER_PORT, or under SLURM the first host of the job and a port from the job id."""
    env = dict(os.environ if env is None else env)
    addr = env.get("MASTER_ADDR")
    if not addr and (nodes := env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")):
        try:
            cmd = ["scontrol", "show", "hostnames", nodes]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            addr = out.stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            addr = nodes.split(",")[0]
    port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return addr or "127.0.0.1", int(port)


@contextlib.contextmanager
def process_group(world: World, backend: str | None = None) -> Iterator[World]:
    """Join the training processes for the duration of the block (no-op for one process)."""
    if world.size == 1:
        yield world
        return
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    addr, port = rendezvous()
    url = f"tcp://{addr}:{port}"
    dist.init_process_group(backend, init_method=url, rank=world.rank, world_size=world.size)
    log.info("process %d of %d joined %s at %s:%d", world.rank, world.size, backend, addr, port)
    try:
        yield world
    finally:
        dist.destroy_process_group()


def tile_holders(tiles: Sequence[str], world: int) -> dict[str, list[int]]:
    """Ranks reading each tile: tiles dealt round-robin; with more processes than tiles, shared."""
    tiles = sorted(tiles)
    if len(tiles) >= world:
        return {t: [i % world] for i, t in enumerate(tiles)}
    holders: dict[str, list[int]] = {t: [] for t in tiles}
    for r in range(world):
        holders[tiles[r % len(tiles)]].append(r)
    return holders


def owners(refs: Sequence[PatchRef], holders: dict[str, list[int]], world: int) -> np.ndarray:
    """The process reading each patch: its tile's holder, the least loaded one when the tile is shared."""
    load = np.zeros(world, np.int64)
    out = np.empty(len(refs), np.int64)
    for k, ref in enumerate(refs):
        cands = holders[ref.tile]
        r = min(cands, key=lambda c: (load[c], c))
        out[k] = r
        load[r] += 1
    return out


class BatchSource:
    """Each step's ``b`` raw patches and labels for this process (one code path for 1..N processes)."""

    def __init__(
        self,
        data: PatchData,
        sampler: ClassFirstSampler,
        world: World,
        per_process: int,
        augment: bool,
    ) -> None:
        self.data, self.sampler, self.world = data, sampler, world
        self.b, self.augment = per_process, augment
        self.tiles = sorted(data.refl)
        self.holders = tile_holders(self.tiles, world.size)
        self.last_plan: TransferPlan | None = None
        self.sent_bytes = 0  # payload this process has sent (patches + labels), for the benchmark

    def draw(self, rng: np.random.Generator) -> tuple[list[PatchRef], np.ndarray]:
        """Process 0's draw of the global batch: B patches class-first, then one D4 element each."""
        n = self.world.size * self.b
        refs = self.sampler.draw(n, rng)
        ks = rng.integers(0, 8, size=n) if self.augment else np.zeros(n, np.int64)
        return refs, ks

    def _broadcast(
        self, refs: list[PatchRef] | None, ks: np.ndarray | None
    ) -> tuple[list[PatchRef], np.ndarray]:
        """Process 0's draw to every process, as one (B, 5) int64 table: tile, row, col, class, D4."""
        n = self.world.size * self.b
        table = torch.zeros((n, 5), dtype=torch.int64)
        if self.world.is_main:
            pairs = zip(refs, ks, strict=True)
            rows = [(self.tiles.index(r.tile), r.row, r.col, r.code, int(k)) for r, k in pairs]
            table[:] = torch.tensor(rows, dtype=torch.int64)
        dist.broadcast(table, src=0)
        t = table.numpy()
        out = [PatchRef(self.tiles[int(a)], int(b), int(c), int(d)) for a, b, c, d, _ in t]
        return out, t[:, 4].copy()

    def __call__(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        world = self.world
        if world.size == 1:
            refs, ks = self.draw(rng)
            x, y = self.data.read(refs)
            self.last_plan = plan_transfers(np.zeros(len(refs), np.int64), 1, self.b)
            return augment_batch(x, y, ks)
        refs, ks = self._broadcast(*(self.draw(rng) if world.is_main else (None, None)))
        plan = plan_transfers(owners(refs, self.holders, world.size), world.size, self.b)
        self.last_plan = plan
        mine = np.flatnonzero(plan.owner == world.rank)
        got: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        if mine.size:
            x, y = self.data.read([refs[k] for k in mine])
            got = {int(k): (x[i], y[i]) for i, k in enumerate(mine)}
        got |= self._exchange(plan, got)
        batch = plan.batch_of(world.rank)
        x = np.stack([got[int(k)][0] for k in batch])
        y = np.stack([got[int(k)][1] for k in batch])
        return augment_batch(x, y, ks[batch])

    def _exchange(
        self, plan: TransferPlan, own: dict[int, tuple[np.ndarray, np.ndarray]]
    ) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Send this process's surplus and receive what it lacks, one message per patch (tag = index)."""
        rank = self.world.rank
        refl = self.data.refl[self.tiles[0]]
        t, c = refl.shape[:2]
        n = self.data.size
        x_bytes = t * c * n * n * np.dtype(refl.dtype).itemsize
        code = self.data.code_dtype
        size = x_bytes + n * n * code.itemsize
        reqs, bufs = [], {}
        for k, to in plan.sends(rank):
            x, y = own[k]
            y = np.ascontiguousarray(y, dtype=code)
            msg = np.concatenate([np.ascontiguousarray(x).view(np.uint8).ravel(), y.ravel().view(np.uint8)])
            reqs.append(dist.isend(torch.from_numpy(msg), dst=to, tag=k))
            self.sent_bytes += msg.nbytes
        for k, frm in plan.receives(rank):
            bufs[k] = torch.empty(size, dtype=torch.uint8)
            reqs.append(dist.irecv(bufs[k], src=frm, tag=k))
        for req in reqs:
            req.wait()
        out = {}
        for k, buf in bufs.items():
            raw = buf.numpy()
            x = raw[:x_bytes].view(refl.dtype).reshape(t, c, n, n)
            out[k] = (x, raw[x_bytes:].view(code).reshape(n, n).copy())
        return out
