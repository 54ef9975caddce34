"""Per-rule SLURM resources from the config's `resources:` section (no cluster needed: dry runs).

The real submission is exercised in tests/test_slurm.py; here only what each job would ask for.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import validate
from pipeline.errors import PipelineError
from tests.conftest import REPO


@pytest.fixture
def raw() -> dict:
    return yaml.safe_load((REPO / "config.yaml").read_text())


def test_defaults_fill_every_rule(raw):
    del raw["resources"]
    res = validate(raw)["resources"]
    assert "partition" not in res  # the cluster's default partition
    assert res["train"] == {"runtime": 720, "mem_mb": 64000, "cpus_per_task": 16}
    assert res["train_network"]["nodes"] == 1 and res["train_network"]["tasks_per_node"] == 1
    raw["resources"] = {"predict": {"mem_mb": 500}}
    res = validate(raw)["resources"]
    assert res["predict"] == {"mem_mb": 500, "runtime": 240, "cpus_per_task": 8}


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({"train": {"nodes": 2}}, "'resources/train'"),  # rf trains as one task
        ({"predict": {"cpus_per_task": 0}}, "'resources/predict/cpus_per_task'"),
        ({"train_network": {"tasks_per_node": 0}}, "'resources/train_network/tasks_per_node'"),
        ({"ingset": {}}, "'resources'"),
        ({"partition": ""}, "'resources/partition'"),
    ],
)
def test_bad_resources_fail_with_their_path(raw, entry, expected):
    bad = copy.deepcopy(raw)
    bad["resources"] = entry
    with pytest.raises(PipelineError) as err:
        validate(bad, "my.yaml")
    assert expected in str(err.value)


def _dry_run(work: Path, resources: dict, *args: str) -> dict[str, str]:
    """Each job's printed resources line, keyed by its output, from a dry run of the tiny demo."""
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["run"]["workdir"] = "results"
    raw["demo"]["out"] = "inputs"
    raw["inputs"]["tiles"] = {t: {"format": "theia", "path": f"inputs/{t}"} for t in raw["inputs"]["tiles"]}
    raw["inputs"]["reference"] = "inputs/reference.gpkg"
    raw["inputs"]["regions"] = "inputs/regions.gpkg"
    raw["classifiers"] = ["rf", "fgunet"]
    raw["resources"] = resources
    (work / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--dry-run", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = re.findall(r"output: (\S+?),?(?: \S+)*\n(?:.*\n)*?\s+resources: (.*)\n", proc.stdout)
    return dict(jobs)


def test_jobs_ask_for_their_rules_resources(tmp_path):
    resources = {
        "partition": "cpu",
        "predict": {"partition": "big", "mem_mb": 7000},
        "train_network": {"nodes": 2, "tasks_per_node": 4, "cpus_per_task": 3, "partition": "gpu"},
    }
    jobs = _dry_run(tmp_path, resources, "--profile", str(REPO / "slurm"))
    rf_train, net_train = jobs["results/models/rf.trained.json"], jobs["results/models/fgunet.trained.json"]
    assert "slurm_partition=cpu" in rf_train and "cpus_per_task=16" in rf_train
    assert "mpi" not in rf_train and "tasks" not in rf_train  # one task, inside the plugin's srun
    # the network: 2 nodes x 4 tasks in one job whose own command starts them (mpi: no srun -n1)
    for item in ("slurm_partition=gpu", "nodes=2", "tasks_per_node=4", "cpus_per_task=3", "mpi=srun"):
        assert item in net_train, net_train
    assert "launch=," in net_train or net_train.endswith("launch=")  # srun only inside the job
    assert "slurm_partition=big" in jobs["results/maps/rf/T31TCJ.tif"]
    assert "mem_mb=7000" in jobs["results/maps/rf/T31TCJ.tif"]
    assert "slurm_partition=cpu" in jobs["results/metrics/comparison.md"]


def test_one_process_per_node_asks_for_tasks(tmp_path):
    jobs = _dry_run(tmp_path, {"train_network": {"nodes": 3, "tasks_per_node": 1}}, "--cores", "2")
    net = jobs["results/models/fgunet.trained.json"]
    assert "nodes=3" in net and "tasks=3" in net and "mpi=srun" in net and "tasks_per_node" not in net
    assert "slurm_partition" not in net  # none configured: the cluster's default
    # one process in all: a plain one-task job
    jobs = _dry_run(tmp_path, {"train_network": {"nodes": 1, "tasks_per_node": 1}}, "--cores", "2")
    assert "mpi" not in jobs["results/models/fgunet.trained.json"]


def test_local_runs_never_oversubscribe_the_cores(tmp_path):
    """A local `--cores 2` run must not start two 2-thread jobs at once (each training takes the
    machine and ~2 GB). Snakemake 9.10-9.26 did when jobs became ready one at a time (its
    snakemake/snakemake#3913: a lone ready job was started without reserving its cores), so three
    FG-UNET trainings ran together on 2 cores; pyproject.toml requires a fixed version. This is the
    issue's reproducer: both `work` jobs become ready when `prepare` ends."""
    (tmp_path / "Snakefile").write_text(
        "rule final:\n"
        "    input: 'file1', 'file2'\n"
        "rule prepare:\n"
        "    output: 'common'\n"
        "    threads: 2\n"
        "    shell: 'touch {output}'\n"
        "rule work:\n"
        "    input: 'common'\n"
        "    output: 'file{n}'\n"
        "    threads: 2\n"
        "    shell: 'date +%s.%N > {output}; sleep 2; date +%s.%N >> {output}'\n"
    )
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "-q"]
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, timeout=120)
    (a0, a1), (b0, b1) = (map(float, (tmp_path / f"file{n}").read_text().split()) for n in (1, 2))
    assert a1 <= b0 or b1 <= a0, "two 2-thread jobs ran at once under --cores 2"
