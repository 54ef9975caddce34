"""The conda environment for cluster users declares what pyproject.toml declares."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
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


def _imports(path) -> set[str]:
    """Modules a file imports at module level (imports inside functions are deliberate lazy ones,
    but still edges of the graph: they are counted too, except under ``TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_network_package_has_no_import_cycle():
    """pipeline/nets/ modules import each other along one order (issue 10: models/net.py and
    nettrain.py imported each other); a cycle, even through a lazy import, fails here."""
    pkg = REPO / "pipeline" / "nets"
    mods = {f"pipeline.nets.{p.stem}": p for p in pkg.glob("*.py") if p.stem != "__init__"}
    graph = {m: sorted(_imports(p) & set(mods) - {m}) for m, p in mods.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if state.get(m) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*path, m]))
        if state.get(m) == 2:
            return
        state[m] = 1
        for n in graph[m]:
            visit(n, [*path, m])
        state[m] = 2

    for m in graph:
        visit(m, [])
    assert "pipeline.nets.train" in graph["pipeline.nets.classifier"]  # the graph is really read


def test_config_and_registry_answer_without_torch():
    """The config check (patch size vs pooling) and RF's stages must not load torch."""
    code = (
        "import sys; from pipeline.config import load_config; from pipeline.models import get;"
        f"load_config({str(REPO / 'config.yaml')!r}); get('rf');"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
