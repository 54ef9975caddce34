# Shared set-up: validate the config once, fix the run layout, and freeze the effective config
# (file + --config overrides) into the workdir, the one file every job reads.

import os

import yaml
from pathlib import Path

from pipeline.config import Config
from pipeline.config import validate as _validate_config
from pipeline.errors import PipelineError
from pipeline.layout import Layout
from pipeline.models import HYBRIDS, is_network
from pipeline.nets.settings import init_folder

try:
    RUN_CONFIG = _validate_config(config, "config")
except PipelineError as _exc:
    raise WorkflowError(str(_exc)) from None

LAYOUT = Layout(Path(RUN_CONFIG["run"]["workdir"]))
TILES = list(RUN_CONFIG["inputs"]["tiles"])
CLASSIFIERS = list(RUN_CONFIG["classifiers"])
# run.seeds: every classifier again per extra seed, as <classifier>-s<seed> (mapped and validated;
# compared and QA'd only through the report's kappa +- std)
SEED_MODELS = [Layout.seed_model(m, s) for s in Config(RUN_CONFIG).extra_seeds for m in CLASSIFIERS]
MODELS = CLASSIFIERS + SEED_MODELS
CONFIG_FILE = LAYOUT.workdir / "run-config.yaml"

_text = yaml.safe_dump(RUN_CONFIG, sort_keys=False)
if not CONFIG_FILE.exists() or CONFIG_FILE.read_text() != _text:
    CONFIG_FILE.parent.mkdir(parents=True, exist_ok=True)
    _tmp = CONFIG_FILE.with_suffix(".tmp")
    _tmp.write_text(_text)
    _tmp.replace(CONFIG_FILE)

LANDCOVER = "landcover --config {config_file}".format(config_file=CONFIG_FILE)

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
