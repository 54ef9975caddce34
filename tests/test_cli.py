"""The entry point: one subcommand per stage, bad input ends in one line and leaves no output."""

from __future__ import annotations

import logging
import os
import re
import resource
import subprocess
import sys

import pytest
import yaml

from pipeline.cli import INGEST_GDAL_CACHE_MB, main
from tests.conftest import REPO


def _config(tmp_path, **inputs) -> str:
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["run"]["workdir"] = str(tmp_path / "run")
    del raw["demo"]  # the user's own inputs (the demo's section would refuse other tile paths first)
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
    assert err.startswith(f"error: {missing}") and "\n" not in err, err
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


def test_a_finished_stage_logs_what_it_used(tmp_path, caplog):
    from tests.test_cube import _cube_config, synthetic_cube, to_datasets, write_cube

    cfg = _cube_config(tmp_path, write_cube(tmp_path / "cube", to_datasets(synthetic_cube())), scl="SCL")
    before = resource.getrusage(resource.RUSAGE_SELF)
    with caplog.at_level(logging.INFO, logger="pipeline"):
        assert main(["import", "--config", str(cfg), "--tile", "T31TCJ"]) == 0
    m = re.search(r"landcover import: wall ([\d.]+) s, CPU ([\d.]+) s .* peak RSS (\d+) MiB", caplog.text)
    assert m, caplog.text
    # the process's own counters only grow: CPU at least what this process had used, peak at least its peak
    assert float(m[2]) >= before.ru_utime + before.ru_stime - 0.05
    assert int(m[3]) >= before.ru_maxrss // 1024 - 1


@pytest.mark.parametrize("user", [None, "1024"])
def test_ingest_bounds_gdals_block_cache_unless_the_user_set_it(tmp_path, monkeypatch, user):
    # ingest keeps every product file open: GDAL's default cache (5 % of RAM) would fill with its blocks
    if user is None:
        monkeypatch.delenv("GDAL_CACHEMAX", raising=False)
    else:
        monkeypatch.setenv("GDAL_CACHEMAX", user)
    cfg = _config(tmp_path, tiles={"T31TCJ": {"format": "theia", "path": str(tmp_path / "absent")}})
    assert main(["ingest", "--config", cfg, "--tile", "T31TCJ", "--out", str(tmp_path / "x.zarr")]) == 2
    assert os.environ["GDAL_CACHEMAX"] == (user or str(INGEST_GDAL_CACHE_MB))
