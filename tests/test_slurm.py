"""The chain under a real SLURM (munged, slurmctld, slurmd started here on this one machine).

`snakemake --profile slurm` runs the tiny demo (2 tiles, rf + fgunet) with every rule as a SLURM job
and fgunet's training as one 2-task job started by srun; then one tile's map is rebuilt alone.
The cluster is built by tests/slurm_cluster.py. They skip where slurmctld, slurmd, slurm-client or
munge are not installed; CI (.ci/run) installs them and sets LANDCOVER_REQUIRE_SLURM=1, which turns
that skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.config import load_config
from pipeline.gapfill import gapfill_tile
from pipeline.io.tilestore import open_store
from pipeline.layout import Layout
from pipeline.nets.weights import WEIGHTS, load_weights
from tests.conftest import REPO, tiny_demo_config
from tests.slurm_cluster import SlurmCluster, missing_binaries
from tests.test_distributed import ADAM_ATOL
from tests.test_gapfill import make_ingest

pytestmark = pytest.mark.slurm

# The plugin's first status check waits 40 s by default; jobs here last seconds. The cluster's
# MinJobAge (300 s) stays above 3 x this, as the plugin requires for squeue status checks.
FAST_STATUS = ["--slurm-init-seconds-before-status-checks", "1"]
PROFILE_RUN = ["--snakefile", str(REPO / "Snakefile"), "--profile", "slurm", *FAST_STATUS]
TASKS, B = 2, 4  # fgunet's training processes, patches per process and step


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        why = (
            f"SLURM/munge not installed ({', '.join(missing)} missing); "
            "apt-get install slurmctld slurmd slurm-client munge (.ci/run does)"
        )
        if os.environ.get("LANDCOVER_REQUIRE_SLURM"):  # CI: these tests must run
            pytest.fail(why)
        pytest.skip(why)
    # 4 CPUs declared on this node whatever it has (SlurmdParameters=config_overrides): room for
    # the 2-task training job beside other jobs on a 2-core machine
    with SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=max(4, os.cpu_count() or 1)) as c:
        yield c


def _env(cluster: SlurmCluster) -> dict[str, str]:
    env = cluster.env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])  # landcover, snakemake
    return env


def _snakemake(cluster: SlurmCluster, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(cluster), capture_output=True, text=True, timeout=900)


def _ran(proc: subprocess.CompletedProcess) -> list[str]:
    """Rules of the jobs Snakemake started, as it announces them."""
    return re.findall(r"^\s*(?:local)?rule (\w+):$", proc.stdout + proc.stderr, flags=re.M)


def test_sbatch_and_srun(cluster, tmp_path):
    env = _env(cluster)
    out = subprocess.run(["srun", "-n", "2", "hostname"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [cluster.host] * 2
    log = tmp_path / "job.out"
    job = ["sbatch", "--wait", "-n", "2", "-o", str(log), "--wrap", "srun printenv SLURM_PROCID"]
    out = subprocess.run(job, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + cluster.logs()
    assert sorted(log.read_text().split()) == ["0", "1"]


def _demo_config(work: Path) -> None:
    """tests/test_e2e.py's tiny demo with rf and fgunet; jobs sized for the one small node."""
    raw = tiny_demo_config()
    raw["classifiers"] = ["rf", "fgunet"]
    # no dropout and no warm-up: the 2-task training must then equal one process on the same global
    # batch (dropout masks are drawn per process; eq. 3's warm-up depends on the process count).
    # One step per epoch: the claim is per step, and Adam lets float noise in ~0 gradients grow
    # over many steps (see ADAM_ATOL)
    raw["nets"].update(
        unet_filters=[8, 16, 32], mlp_filters=[32, 16, 16], lstm_hidden=16, patch_size=32,
        batch_size=B, epochs=2, steps_per_epoch=1, warmup_epochs=0, selection_patches=8, dropout=0.0,
        head_refit=False,  # the claim is about the trained weights, not a refit on top of them
    )  # fmt: skip
    small = {"runtime": 30, "mem_mb": 1000, "cpus_per_task": 1}
    raw["resources"] = {"partition": "debug"}
    for rule in ("demo", "ingest", "gapfill", "percentiles", "validity", "split", "rasterise",
                 "patches", "train", "predict", "validate", "summarise", "compare"):  # fmt: skip
        raw["resources"][rule] = dict(small)
    raw["resources"]["train_network"] = small | {"nodes": 1, "tasks_per_node": TASKS}
    (work / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def test_profile_is_found_by_name_from_the_repo_root(cluster, tmp_path):
    """The users' command, from the repository root (dry run, outputs in a scratch folder)."""
    _demo_config(tmp_path)
    proc = _snakemake(cluster, REPO, "--profile", "slurm", "--directory", str(tmp_path), "--dry-run")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert re.search(r"Using profiles? slurm\b", log), log[-3000:]
    assert "train" in _ran(proc) and "predict" in _ran(proc)
    # fgunet's training asks for 2 tasks (the plugin's mpi resource: no one-task srun around it)
    pattern = r"output: results/models/fgunet\.trained\.json\n(.*\n)*?\s+resources: .*mpi=srun.*"
    assert re.search(pattern, log), log
    assert "tasks_per_node=2" in log
    # a plain local run does not go to SLURM
    local = _snakemake(cluster, REPO, "--cores", "2", "--directory", str(tmp_path), "--dry-run")
    assert local.returncode == 0, local.stderr[-3000:]
    assert not re.search(r"profiles? slurm\b", local.stdout + local.stderr)


@pytest.fixture(scope="module")
def run(cluster, tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm_e2e")
    _demo_config(work)
    (work / "slurm").symlink_to(REPO / "slurm")  # `--profile slurm` finds ./slurm, as in the repo root
    t0 = time.monotonic()
    proc = _snakemake(cluster, work, *PROFILE_RUN)
    print(f"demo under SLURM: {time.monotonic() - t0:.0f} s")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:] + cluster.logs()
    return work, proc


def test_demo_runs_as_slurm_jobs(run, cluster):
    work, proc = run
    log = proc.stdout + proc.stderr
    assert "SLURM run ID" in log and re.search(r"has been submitted with SLURM jobid \d+", log)
    cfg = load_config(work / "config.yaml")
    lay = Layout(work / cfg.workdir)
    for model in ("rf", "fgunet"):
        for tile in cfg.tiles:
            assert lay.class_map(model, tile).stat().st_size > 0
            assert lay.confidence(model, tile).stat().st_size > 0
            assert json.loads(lay.metrics(model, tile).read_text())["tile"] == tile
        assert json.loads(lay.overall_metrics(model).read_text())["model"] == model
    assert "| fgunet |" in lay.comparison("md").read_text()
    # nothing left in the queue
    queue = subprocess.run(["squeue", "-h"], env=_env(cluster), capture_output=True, text=True)
    assert queue.stdout.strip() == ""


def test_network_trained_as_two_tasks_like_one_process(run, cluster):
    work, _ = run
    lay = Layout(work / "results")
    two = lay.model_dir("fgunet")
    meta = json.loads((two / "model.json").read_text())
    assert meta["training"]["nodes"] == TASKS  # the world size the srun-started processes formed
    assert "nodes" not in json.loads((lay.model_dir("rf") / "model.json").read_text()).get("training", {})
    # process 0 checkpointed every epoch, as one process does (a rerun resumes from there)
    assert list(two.with_name("fgunet.checkpoints").glob("epoch_*.pt"))
    # the same FG-UNET as one process (outside SLURM) trained on the same global batch of TASKS x B
    raw = yaml.safe_load((lay.workdir / "run-config.yaml").read_text())  # the run's frozen config
    raw["nets"]["batch_size"] = TASKS * B
    one_cfg = work / "one-process.yaml"
    one_cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    one = work / "one-process" / "fgunet"
    cmd = ["landcover", "--config", str(one_cfg), "train", "--model", "fgunet", "--out", str(one)]
    cmd += ["--checkpoints", str(one.with_name("fgunet.checkpoints"))]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((one / "model.json").read_text())["training"]["nodes"] == 1
    wa, wb = load_weights(two / WEIGHTS)["state_dict"], load_weights(one / WEIGHTS)["state_dict"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=ADAM_ATOL)


def test_one_tile_rerun(run, cluster):
    work, _ = run
    cfg = load_config(work / "config.yaml")
    lay = Layout(work / cfg.workdir)
    first, second = cfg.tiles[:2]
    target = lay.class_map("rf", first)
    others = [lay.class_map("rf", second), lay.class_map("fgunet", first), lay.class_map("fgunet", second)]
    before = [p.stat().st_mtime_ns for p in others]
    target.unlink()
    proc = _snakemake(cluster, work, *PROFILE_RUN, str(target.relative_to(work)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _ran(proc) == ["predict"], proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(re.findall(r"has been submitted with SLURM jobid", proc.stdout + proc.stderr)) == 1
    assert target.exists()
    assert [p.stat().st_mtime_ns for p in others] == before
    # --forcerun a rule: only that rule's job for the target runs again, under SLURM too
    forced = lay.class_map("fgunet", second)
    proc = _snakemake(
        cluster, work, *PROFILE_RUN, "--forcerun", "predict", "--", str(forced.relative_to(work))
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _ran(proc) == ["predict"], proc.stdout[-3000:] + proc.stderr[-3000:]
    assert forced.stat().st_mtime_ns > before[2]


def test_killed_network_training_resumes_under_slurm(run, cluster):
    """A training job lost after epoch 1 (preempted, timed out): the same command resumes there."""
    work, _ = run
    lay = Layout(work / "results")
    model, ckdir = lay.model_dir("fgunet"), lay.model_dir("fgunet").with_name("fgunet.checkpoints")
    reference = load_weights(model / WEIGHTS)["state_dict"]
    shutil.rmtree(model)
    lay.model_receipt("fgunet").unlink()  # Snakemake deletes it before the job: no receipt, no model
    (ckdir / "epoch_0002.pt").unlink()  # as if killed during epoch 2
    proc = _snakemake(cluster, work, *PROFILE_RUN, str(lay.model_receipt("fgunet").relative_to(work)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _ran(proc) == ["train"], proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming fgunet from epoch_0001.pt" in (lay.workdir / "logs" / "train_fgunet.log").read_text()
    assert json.loads((model / "model.json").read_text())["training"]["nodes"] == TASKS
    resumed = load_weights(model / WEIGHTS)["state_dict"]
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], rtol=0, atol=0)  # exactly, as one process


def test_gapfill_windows_on_dask_slurm_workers(cluster, tmp_path, monkeypatch):
    """dask: {cluster: slurm}: the stage's windows run on dask workers submitted by dask-jobqueue."""
    for key, value in _env(cluster).items():
        monkeypatch.setenv(key, value)
    _, _, dates = make_ingest(tmp_path / "in.zarr")  # two 512-px windows
    grid = dates[0] + np.arange(0, 100, 10).astype("timedelta64[D]")
    gapfill_tile(tmp_path / "in.zarr", tmp_path / "threads.zarr", grid, threads=2)
    slurm = {"jobs": 1, "cores": 1, "memory": "1GB", "walltime": "00:10:00", "log_directory": str(tmp_path)}
    gapfill_tile(
        tmp_path / "in.zarr",
        tmp_path / "dask.zarr",
        grid,
        threads=1,
        dask={"cluster": "slurm", "slurm": slurm},
    )
    a = open_store(tmp_path / "threads.zarr", "gapfilled")
    b = open_store(tmp_path / "dask.zarr", "gapfilled")
    np.testing.assert_array_equal(a["reflectance"][...], b["reflectance"][...])
    np.testing.assert_array_equal(a["clear_count"][...], b["clear_count"][...])
    assert list(tmp_path.glob("dask-worker*.err")) or list(tmp_path.glob("*.err")), (
        "a SLURM job ran the workers"
    )
