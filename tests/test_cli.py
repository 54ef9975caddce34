"""The entry point: one subcommand per stage, bad input ends in one line and leaves no output."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from pipeline.cli import main
from tests.conftest import REPO


def _config(tmp_path, **inputs) -> str:
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["run"]["workdir"] = str(tmp_path / "run")
    raw["inputs"].update(inputs)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_every_stage_has_a_subcommand():
    cmd = [sys.executable, "-m", "pipeline", "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    stages = (
        "demo ingest gapfill histogram percentiles split rasterise train predict validity validate summarise"
        " mosaic regions vector design interpret estimate suggest catalogue report compare"
    )
    for stage in stages.split():
        assert f"    {stage}" in out.stdout
        with pytest.raises(SystemExit) as done:  # its own help formats (argparse reads % in it)
            main([stage, "--help"])
        assert done.value.code == 0


def test_missing_products_folder_is_one_line_and_no_output(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    cfg = _config(tmp_path, tiles={"T31TCJ": {"format": "theia", "path": str(missing)}})
    out = tmp_path / "T31TCJ.zarr"
    assert main(["ingest", "--config", cfg, "--tile", "T31TCJ", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(missing) in err and "\n" not in err
    assert not out.exists()


def test_bad_config_stops_before_any_work(tmp_path, capsys):
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["rf"]["max_depth"] = "deep"
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["split", "--config", str(path), "--out", str(tmp_path / "s.gpkg")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {path}: invalid config at 'rf/max_depth': 'deep' is not of type 'integer'"
    assert not (tmp_path / "s.gpkg").exists()


def test_unknown_tile(tmp_path, capsys):
    cfg = _config(tmp_path)
    assert main(["ingest", "--config", cfg, "--tile", "T99XXX"]) == 2
    assert "T99XXX is not listed" in capsys.readouterr().err
