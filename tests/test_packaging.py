"""The conda environment for cluster users declares what pyproject.toml declares."""

from __future__ import annotations

import re
import tomllib

import yaml

from tests.conftest import REPO


def _name(spec: str) -> str:
    return re.split(r"[<>=!\[ ]", spec, maxsplit=1)[0].lower()


def test_conda_env_matches_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_name(d): d for d in project["dependencies"]}
    env = yaml.safe_load((REPO / "envs" / "environment.yaml").read_text())
    conda = {}
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            for pip_dep in dep["pip"]:
                if not pip_dep.startswith("-e"):
                    conda[_name(pip_dep)] = pip_dep
        elif _name(dep) not in ("python", "pip"):
            conda[_name(dep)] = dep
    assert set(conda) == set(wanted)
    for name, spec in wanted.items():
        # same version constraints (conda writes "dask>=…" where pip writes "dask[array]>=…")
        assert re.sub(r"\[.*\]", "", spec).replace(" ", "") == conda[name].replace(" ", ""), name
    assert wanted["torch"] == "torch==2.13.0"
