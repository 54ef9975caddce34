"""Run configuration: one YAML file validated against ``workflow/schema/config.schema.json``.

The config is parsed once (safe loader), validated with defaults filled in, and handed to stages as
a read-only :class:`Config`. Stages never re-read the file.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import yaml

from pipeline.errors import PipelineError

SCHEMA_PATH = Path(str(resources.files("pipeline") / "schema" / "config.schema.json"))


def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def _with_defaults(validator_cls: type) -> type:
    """A validator that fills schema defaults in as it validates (jsonschema FAQ recipe)."""
    validate_props = validator_cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub:
                    instance.setdefault(name, sub["default"])
        yield from validate_props(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_cls, {"properties": set_defaults})


def _plain(obj: Any) -> Any:
    """YAML dates -> ISO strings, so the schema sees what a user typed."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, dt.date):
        return obj.isoformat()
    return obj


def validate(raw: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate ``raw`` (a copy is made) and return it with defaults filled in."""
    data = _plain(raw)
    validator = _with_defaults(jsonschema.Draft202012Validator)(
        _schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise PipelineError(source, f"invalid config at '{where}': {err.message}")
    _check_semantics(data, source)
    return data


def _check_semantics(data: dict[str, Any], source: str) -> None:
    """Rules a JSON schema cannot state."""
    codes = [c["code"] for c in data["nomenclature"]]
    names = [c["name"] for c in data["nomenclature"]]
    if len(set(codes)) != len(codes):
        raise PipelineError(source, "invalid config at 'nomenclature': duplicate class codes")
    if len(set(names)) != len(names):
        raise PipelineError(source, "invalid config at 'nomenclature': duplicate class names")
    grid = data["date_grid"]
    if dt.date.fromisoformat(grid["end"]) < dt.date.fromisoformat(grid["start"]):
        raise PipelineError(source, "invalid config at 'date_grid': end is before start")
    norm = data["normalisation"]
    if norm["low_percentile"] >= norm["high_percentile"]:
        raise PipelineError(
            source, "invalid config at 'normalisation': low_percentile must be < high_percentile"
        )
    ref = data["reference"]
    remap = {int(k): v for k, v in ref["remap"].items()}
    if off := sorted({v for v in remap.values()} - set(codes)):
        raise PipelineError(
            source, f"invalid config at 'reference/remap': target codes {off} are not in the nomenclature"
        )
    if both := sorted(set(remap) & set(ref["ignore_codes"])):
        raise PipelineError(
            source, f"invalid config at 'reference': codes {both} are both in ignore_codes and remapped"
        )
    for name, spec in data["inputs"]["tiles"].items():
        if "cube" in spec and spec["format"] != "cube":
            raise PipelineError(
                source,
                f"invalid config at 'inputs/tiles/{name}/cube': only for format: cube, not {spec['format']}",
            )
    if "demo" in data:
        _check_demo(data, source)
    from pipeline.nets.settings import check_config  # torch-free

    check_config(data, source)


def _check_demo(data: dict[str, Any], source: str) -> None:
    """A `demo:` section maps the generated country and nothing else. Its inputs must be the files the
    generator writes, so that the user's own tiles never end up beside the demo's (the usual cause:
    the repository's config.yaml merged under the user's file, `--configfile config.yaml my.yaml`)."""
    demo = data["demo"]
    out = os.path.normpath(demo["out"])
    made = {t["name"]: t.get("format", "theia") for t in demo["tiles"]}
    own = sorted(set(data["inputs"]["tiles"]) - set(made))
    remedy = (
        "drop the demo: section to map your own data, and give your config file alone "
        "(--configfile my.yaml, without config.yaml)"
    )
    if own:
        raise PipelineError(
            source,
            f"invalid config at 'inputs/tiles': {', '.join(own)} not in the demo: section's tiles "
            f"({', '.join(made)}), which would be generated and mapped beside them; {remedy}",
        )
    for name, spec in data["inputs"]["tiles"].items():
        where = os.path.join(out, name)
        if os.path.normpath(spec["path"]) != where or spec["format"] != made[name]:
            raise PipelineError(
                source,
                f"invalid config at 'inputs/tiles/{name}': the demo writes this tile as "
                f"{made[name]} products in {where}, not {spec['format']} in {spec['path']}; {remedy}",
            )
    zones = sorted({int(t.get("epsg") or demo.get("epsg", 32631)) for t in demo["tiles"]})
    if len(zones) > 1 and not data.get("mosaic", {}).get("crs"):
        raise PipelineError(
            source,
            f"invalid config at 'mosaic/crs': the demo's tiles are in {len(zones)} CRSs"
            f" ({', '.join(f'EPSG:{z}' for z in zones)}); set mosaic.crs to the one national CRS the"
            " mosaic reprojects them into",
        )
    for key, name in (("reference", "reference.gpkg"), ("regions", "regions.gpkg")):
        made_path, given = os.path.join(out, name), data["inputs"].get(key)
        if given is not None and os.path.normpath(given) != made_path:
            raise PipelineError(
                source,
                f"invalid config at 'inputs/{key}': the demo writes its {key} as {made_path}, "
                f"not {given}; {remedy}",
            )


def map_dtype(codes: Any) -> np.dtype:
    """uint8 when every class code fits (1-255, 0 = no data), else uint16 (crop-type nomenclatures):
    the smallest type GDAL gives a colour table, so maps of the usual nomenclatures stay a byte."""
    codes = np.asarray(codes)
    return np.dtype(np.uint8) if codes.size == 0 or int(codes.max()) <= 255 else np.dtype(np.uint16)


def load_config(path: str | os.PathLike[str]) -> Config:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as exc:
        raise PipelineError(path, "config file not found") from exc
    except yaml.YAMLError as exc:
        raise PipelineError(path, f"not valid YAML ({exc})") from exc
    if not isinstance(raw, dict):
        raise PipelineError(path, "config must be a YAML mapping")
    return Config(validate(raw, str(path)))


@dataclass(frozen=True)
class ClassDef:
    code: int
    name: str
    label: str
    colour: str

    @property
    def rgb(self) -> tuple[int, int, int]:
        return tuple(int(self.colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


class Config:
    """Validated, read-only view of a run's configuration."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    @property
    def data(self) -> dict[str, Any]:
        return self._data

    @cached_property
    def digest(self) -> str:
        """Short hash of the validated config, recorded in every output's provenance."""
        return hashlib.sha256(json.dumps(self._data, sort_keys=True).encode()).hexdigest()[:12]

    @property
    def workdir(self) -> Path:
        return Path(self._data["run"]["workdir"])

    @property
    def seed(self) -> int:
        return int(self._data["run"]["seed"])

    @property
    def extra_seeds(self) -> list[int]:
        """``run.seeds`` other than ``run.seed``, in order: each trains one more model per classifier."""
        return [int(s) for s in self._data["run"].get("seeds", []) if int(s) != self.seed]

    def with_seed(self, seed: int) -> Config:
        """This config with ``run.seed`` = ``seed``: a model trained from it draws all its randomness
        (sampling, initialisation, batches) from that seed; the labels it reads keep the run's split."""
        data = copy.deepcopy(self._data)
        data["run"]["seed"] = int(seed)
        return Config(data)

    @property
    def tiles(self) -> list[str]:
        return list(self._data["inputs"]["tiles"])

    @cached_property
    def classes(self) -> list[ClassDef]:
        return [
            ClassDef(int(c["code"]), c["name"], c.get("label", c["name"]), c["colour"])
            for c in self._data["nomenclature"]
        ]

    @cached_property
    def class_codes(self) -> np.ndarray:
        return np.array([c.code for c in self.classes], dtype=self.map_dtype)

    @cached_property
    def map_dtype(self) -> np.dtype:
        """What class maps and label stores hold: :func:`map_dtype` of the nomenclature."""
        return map_dtype([c.code for c in self.classes])

    @cached_property
    def date_grid(self) -> np.ndarray:
        """The regular output date grid as ``datetime64[D]`` (start, start+step, ... <= end)."""
        g = self._data["date_grid"]
        start = np.datetime64(g["start"], "D")
        end = np.datetime64(g["end"], "D")
        return np.arange(start, end + np.timedelta64(1, "D"), np.timedelta64(int(g["step_days"]), "D"))

    def named(self, codes: Any) -> str:
        """Class codes with their names for messages: ``53 GPS, 211 ...``; a mapping code -> value
        gives ``53 GPS (12), ...``."""
        names = {c.code: c.name for c in self.classes}
        if isinstance(codes, dict):
            return ", ".join(f"{int(c)} {names.get(int(c), '?')} ({v})" for c, v in codes.items())
        return ", ".join(f"{int(c)} {names.get(int(c), '?')}" for c in codes)

    def threads(self) -> int:
        """Threads for this job: config value, else the scheduler's allocation, else usable cores."""
        n = int(self._data["run"].get("threads", 0))
        if n > 0:
            return n
        env = os.environ.get("SLURM_CPUS_PER_TASK")
        if env and env.isdigit():
            return int(env)
        return len(os.sched_getaffinity(0))
