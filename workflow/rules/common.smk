# Shared set-up: validate the config once, fix the run layout, and freeze the effective config
# (file + --config overrides) into the workdir, the one file every job reads.

import yaml
from pathlib import Path

from pipeline.config import validate as _validate_config
from pipeline.errors import PipelineError
from pipeline.layout import Layout

try:
    RUN_CONFIG = _validate_config(config, "config")
except PipelineError as _exc:
    raise WorkflowError(str(_exc)) from None

LAYOUT = Layout(Path(RUN_CONFIG["run"]["workdir"]))
TILES = list(RUN_CONFIG["inputs"]["tiles"])
CLASSIFIERS = list(RUN_CONFIG["classifiers"])
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
    model="[a-z0-9_]+",


def tile_products(wildcards):
    """The tile's input product folder (written by the demo rule when the demo is configured)."""
    return RUN_CONFIG["inputs"]["tiles"][wildcards.tile]["path"]
