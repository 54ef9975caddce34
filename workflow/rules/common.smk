# Shared set-up: validate the config once, fix the run layout, and freeze the effective config
# (file + --config overrides) into the workdir under its digest, the one file every job reads.

import os

import yaml
from pathlib import Path

from pipeline.config import Config
from pipeline.config import validate as _validate_config
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path, file_in_the_way
from pipeline.layout import Layout
from pipeline.models import HYBRIDS, is_network
from pipeline.nets.settings import init_folder
from pipeline.rerun import settings_digest

try:
    RUN_CONFIG = _validate_config(config, "config")
except PipelineError as _exc:
    raise WorkflowError(str(_exc)) from None

LAYOUT = Layout(Path(RUN_CONFIG["run"]["workdir"]))
if _in_the_way := file_in_the_way(LAYOUT.workdir):
    raise WorkflowError(str(_in_the_way))
TILES = list(RUN_CONFIG["inputs"]["tiles"])
CLASSIFIERS = list(RUN_CONFIG["classifiers"])
# run.seeds: every classifier again per extra seed, as <classifier>-s<seed> (mapped and validated;
# compared and QA'd only through the report's kappa +- std)
RUN_CFG = Config(RUN_CONFIG)
SEED_MODELS = [Layout.seed_model(m, s) for s in RUN_CFG.extra_seeds for m in CLASSIFIERS]
MODELS = CLASSIFIERS + SEED_MODELS
_CONFIG_TEXT = yaml.safe_dump(RUN_CONFIG, sort_keys=False)
# Jobs read the config frozen under its digest; nothing is written while the Snakefile is read, so
# a dry run (or a run refused by another's lock) changes nothing on disk (docs/architecture.md).
FROZEN_CONFIG = LAYOUT.frozen_config(RUN_CFG.digest)
LANDCOVER = f"landcover --config {FROZEN_CONFIG}"


def _write_if_changed(path, text):
    if path.exists() and path.read_text() == text:
        return
    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    except PipelineError as exc:  # a read-only or full workdir: one line, before any job starts
        raise WorkflowError(str(exc)) from None


onstart:
    # a real run that holds the workdir's lock and has jobs to run: freeze its config for them, and
    # point run-config.yaml (for people and `landcover` by hand) at the latest one
    _write_if_changed(FROZEN_CONFIG, _CONFIG_TEXT)
    _write_if_changed(LAYOUT.run_config(), _CONFIG_TEXT)


def settings(stage):
    """A rule's `params:`: the digest of the config values its outputs depend on (pipeline/rerun.py).
    Snakemake's params trigger reruns a job when it changes, and only that job."""

    def digest(wildcards):
        tile, model = getattr(wildcards, "tile", None), getattr(wildcards, "model", None)
        return settings_digest(RUN_CFG, stage, tile=tile, model=model)

    return digest


wildcard_constraints:
    tile="T[0-9]{2}[A-Z]{3}",
    model="[a-z0-9_]+(-s[0-9]+)?",


def classifier_of(model):
    """The registry name behind a model name (rf-s7 -> rf)."""
    return Layout.split_seed_model(model)[0]


def tile_products(wildcards):
    """The tile's input product folder (written by the demo rule when the demo is configured)."""
    return RUN_CONFIG["inputs"]["tiles"][wildcards.tile]["path"]


# --- SLURM resources: the config's `resources:` section (docs/slurm.md). Local runs ignore them. ---


def _sbatch(entry):
    """One config entry as the SLURM plugin's resources; partition: the rule's, else the run's."""
    res = {key: entry[key] for key in ("runtime", "mem_mb", "cpus_per_task")}
    partition = entry.get("partition", RUN_CONFIG["resources"].get("partition"))
    if partition:
        res["slurm_partition"] = partition
    return res


def _network_training(entry):
    """nodes x tasks_per_node training processes in one SLURM job, started by the command's `srun`.

    The plugin's `mpi` resource makes it ask SLURM for every task and run the rule's command once,
    in the batch step, instead of inside a one-task `srun`; `launch` is then the `srun` that starts
    one `landcover train` per task (the processes find each other from the allocation,
    pipeline/nets/distributed.py). Locally, and for one task in all, `launch` is empty: one process.
    """
    res = _sbatch(entry) | {"nodes": entry["nodes"], "launch": ""}
    nodes, per_node = entry["nodes"], entry["tasks_per_node"]
    if nodes * per_node == 1:
        return res
    res["mpi"] = "srun"
    if per_node > 1:
        res["tasks_per_node"] = per_node  # the plugin takes tasks or tasks_per_node, not both
    else:
        res["tasks"] = nodes
    if workflow.remote_exec and "SLURM_JOB_ID" in os.environ:  # inside the job Snakemake submitted
        res["launch"] = (
            f"srun --nodes={nodes} --ntasks={nodes * per_node} --ntasks-per-node={per_node}"
            f" --cpus-per-task={entry['cpus_per_task']} --kill-on-bad-exit=1 "
        )
    return res


def _train_resources(wildcards):
    if is_network(classifier_of(wildcards.model)):
        return _network_training(RUN_CONFIG["resources"]["train_network"])
    return _sbatch(RUN_CONFIG["resources"]["train"]) | {"launch": ""}


_TRAIN_KEYS = ("runtime", "mem_mb", "cpus_per_task", "slurm_partition", "nodes", "tasks", "tasks_per_node")


def job_resources(rule):
    """A rule's `resources:`. `train` depends on the model (one task for rf, N for a network)."""
    if rule == "train_reference":  # a reference RF is sized like the RF's training
        return _sbatch(RUN_CONFIG["resources"]["train"])
    if rule != "train":
        return _sbatch(RUN_CONFIG["resources"][rule])
    return {
        key: (lambda wildcards, key=key: _train_resources(wildcards).get(key))
        for key in (*_TRAIN_KEYS, "mpi", "launch")
    }


def all_cores():
    """A local run's --cores (training takes the machine); 1 without, where cpus_per_task sizes jobs."""
    try:
        return workflow.cores
    except WorkflowError:
        return 1
