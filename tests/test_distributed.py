"""Distributed sampling and training on 2 real processes (torch.distributed, gloo, one machine)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml

from pipeline.config import Config, load_config, validate
from pipeline.layout import Layout
from pipeline.models.features import Normalisation
from pipeline.nets.data import PatchData
from pipeline.nets.distributed import BatchSource, World, owners, process_group, tile_holders, world_from_env
from pipeline.nets.patches import ClassFirstSampler, augment_batch, index_patches
from pipeline.nets.train import train_network
from pipeline.nets.weights import WEIGHTS, load_weights
from tests.test_nettrain import net_config
from tests.test_rf import make_scene

WORLD, B = 2, 3  # processes, patches per process
# Adam normalises every step to about lr (1e-3): summing the same gradients in another order (2
# processes, other batch shapes for oneDNN) can move a weight whose gradient is ~0 by a fraction of
# lr, so weights are compared to 10 % of one step, not to float epsilon.
ADAM_ATOL = 1e-4
STEPS = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    scene = make_scene(tmp)
    cfg = _config(tmp)
    patches = {t: tmp / f"{t}.train.npz" for t in scene.labels}
    for tile, lab in scene.labels.items():
        index_patches(cfg, tile, lab, patches[tile])
    return tmp, scene, patches


def _config(tmp: Path, **nets) -> Config:
    raw = net_config(tmp, dropout=0.0, warmup_epochs=0, **nets).data
    raw["run"]["threads"] = 1  # two processes on two cores
    return Config(validate(raw))


def _data(scene, patches, cfg) -> tuple[PatchData, ClassFirstSampler]:
    norm = Normalisation.from_percentiles(scene.percentiles)
    data = PatchData(scene.gapfilled, scene.labels, patches, norm, cfg["nets"]["patch_size"])
    return data, ClassFirstSampler(list(data.train_index.values()), codes=[int(c) for c in cfg.class_codes])


def _sampling_worker(rank: int, port: int, tmp: str, scene, patches) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = _config(Path(tmp))
    data, sampler = _data(scene, patches, cfg)
    with process_group(World(rank, WORLD), backend="gloo") as world:
        source = BatchSource(data, sampler, world, B, augment=True)
        rng = np.random.default_rng(7)
        xs, ys, owner, dest = [], [], [], []
        for _ in range(STEPS):
            x, y = source(rng)
            xs.append(x)
            ys.append(y)
            owner.append(source.last_plan.owner)
            dest.append(source.last_plan.dest)
    np.savez(Path(tmp) / f"rank{rank}.npz", x=np.stack(xs), y=np.stack(ys), owner=owner, dest=dest)


def test_two_processes_sample_exchange_and_match_the_plan(setup):
    tmp, scene, patches = setup
    port = _free_port()
    mp.start_processes(
        _sampling_worker, args=(port, str(tmp), scene, patches), nprocs=WORLD, start_method="spawn"
    )
    got = [np.load(tmp / f"rank{r}.npz") for r in range(WORLD)]
    # the reference: process 0's draws, replayed here with the same seed, read and augmented locally
    cfg = _config(tmp)
    data, sampler = _data(scene, patches, cfg)
    planner = BatchSource(data, sampler, World(0, WORLD), B, augment=True)  # draw() is collective-free
    rng = np.random.default_rng(7)
    holders = tile_holders(list(scene.labels), WORLD)
    codes_drawn = []
    moved = 0
    for step in range(STEPS):
        refs, ks = planner.draw(rng)
        codes_drawn += [r.code for r in refs]
        owner = owners(refs, holders, WORLD)
        np.testing.assert_array_equal(got[0]["owner"][step], owner)  # every process saw the same plan
        np.testing.assert_array_equal(got[1]["owner"][step], owner)
        dest = got[0]["dest"][step]
        x, y = data.read(refs)
        x, y = augment_batch(x, y, ks)
        for r in range(WORLD):
            mine = np.flatnonzero(dest == r)
            assert mine.size == B  # each process trains on exactly b patches
            np.testing.assert_array_equal(got[r]["x"][step], x[mine])  # bytes survived the exchange
            np.testing.assert_array_equal(got[r]["y"][step], y[mine])
        moved += int((dest != owner).sum())
    # some patches really travelled (both tiles are drawn from), but never more than needed
    assert moved > 0
    # class-first: every drawable class about equally often
    freq = np.bincount(codes_drawn, minlength=256)[sampler.classes]
    n, k = len(codes_drawn), len(sampler.classes)
    assert (np.abs(freq - n / k) < 5 * np.sqrt(n * (1 / k) * (1 - 1 / k))).all(), freq


def _training_worker(rank: int, port: int, tmp: str, scene, patches) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = _config(Path(tmp), batch_size=B, epochs=1, steps_per_epoch=2)
    out = Path(tmp) / "two" / "fgunet"
    with process_group(World(rank, WORLD), backend="gloo") as world:
        train_network(
            cfg, "fgunet", scene.gapfilled, scene.labels, scene.percentiles, out,
            patches=patches, world=world,
        )  # fmt: skip


def test_two_process_training_equals_one_process_on_the_same_global_batch(setup):
    tmp, scene, patches = setup
    port = _free_port()
    mp.start_processes(
        _training_worker, args=(port, str(tmp), scene, patches), nprocs=WORLD, start_method="spawn"
    )
    two = load_weights(tmp / "two" / "fgunet" / WEIGHTS)["state_dict"]
    # one process, batch = world x b: the same draws, the same initial weights, the same steps
    cfg = _config(tmp, batch_size=WORLD * B, epochs=1, steps_per_epoch=2)
    out = tmp / "one" / "fgunet"
    train_network(cfg, "fgunet", scene.gapfilled, scene.labels, scene.percentiles, out, patches=patches)
    one = load_weights(out / WEIGHTS)["state_dict"]
    assert one.keys() == two.keys()
    start = load_weights(out.with_name("fgunet.checkpoints") / "epoch_0001.pt")  # not vacuous: weights moved
    assert start["history"][0]["train_loss"] > 0
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=ADAM_ATOL)
    meta = json.loads((tmp / "two" / "fgunet" / "model.json").read_text())
    assert meta["training"]["nodes"] == WORLD


def test_world_from_env():
    assert world_from_env({}) == World()
    assert world_from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == World(1, 4, 1)
    slurm = {"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0"}
    assert world_from_env(slurm) == World(2, 3, 0)
    # a batch job's shell (no step: not started by srun) is one process even with several tasks
    assert world_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "3"}) == World()


def test_tile_holders():
    assert tile_holders(["b", "a", "c"], 2) == {"a": [0], "b": [1], "c": [0]}
    assert tile_holders(["a", "b"], 5) == {"a": [0, 2, 4], "b": [1, 3]}


def _layout_run(tmp: Path, scene, patches, name: str, **nets) -> Path:
    """A run folder in the standard layout (symlinks to the scene) and its frozen config."""
    cfg = _config(tmp / name, **nets)
    lay = Layout(cfg.workdir)
    for tile in scene.gapfilled:
        for src, dst in (
            (scene.gapfilled[tile], lay.gapfilled(tile)),
            (scene.labels[tile], lay.labels(tile)),
        ):
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
        for split in ("train", "selection"):
            dst = lay.patches(tile, split)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(patches[tile].with_name(f"{tile}.{split}.npz"))
    lay.percentiles().parent.mkdir(parents=True, exist_ok=True)
    lay.percentiles().symlink_to(scene.percentiles)
    path = tmp / name / "run-config.yaml"
    path.write_text(yaml.safe_dump(cfg.data))
    return path


def test_torchrun_cli_trains_like_one_process(setup):
    """The users' launch: ``torchrun --nproc-per-node 2 landcover train`` (what srun does under SLURM)."""
    tmp, scene, patches = setup
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun, "torchrun is installed with torch"
    two = _layout_run(tmp, scene, patches, "cli2", batch_size=B, epochs=1, steps_per_epoch=2)
    one = _layout_run(tmp, scene, patches, "cli1", batch_size=WORLD * B, epochs=1, steps_per_epoch=2)
    port = str(_free_port())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [torchrun, "--nproc-per-node", str(WORLD), "--master-port", port, "--no-python"]
    cmd += ["landcover", "--config", str(two), "train", "--model", "fgunet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = ["landcover", "--config", str(one), "train", "--model", "fgunet"]
    proc = subprocess.run(single, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = Layout(load_config(two).workdir).model_dir("fgunet")
    b = Layout(load_config(one).workdir).model_dir("fgunet")
    assert json.loads((a / "model.json").read_text())["training"]["nodes"] == WORLD
    wa, wb = load_weights(a / WEIGHTS)["state_dict"], load_weights(b / WEIGHTS)["state_dict"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=ADAM_ATOL)
