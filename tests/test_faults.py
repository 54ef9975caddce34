"""The fault suite: each fault a production run meets (killed jobs, damaged inputs and models,
failed retrains), injected on purpose, and what the chain promises in return (docs/faults.md):
one line naming the file and the cause, a non-zero exit, nothing partial or stale left behind.

Faults whose natural home is a stage's own tests are pinned there and listed in docs/faults.md;
this file holds the ones that cut across stages."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path, leftovers
from pipeline.io.cog import write_class_map
from pipeline.layout import Layout
from tests.conftest import REPO, make_grid, tiny_demo_config


def test_a_killed_writers_temporaries_go_with_the_next_write_of_that_output(tmp_path):
    """kill -9 leaves ``.<stem>.<hex>.tmp<suffix>`` (and a COG's ``.stage`` file, a swap's ``.old``):
    the next write of the same output removes them, and nobody else's."""
    final = tmp_path / "T31TCJ.zarr"
    stale = [
        tmp_path / ".T31TCJ.0a1b2c3d.tmp.zarr",  # a store: a directory
        tmp_path / ".T31TCJ.zarr.deadbeef.old",  # the previous version moved aside mid-swap
    ]
    (stale[0] / "c").mkdir(parents=True)
    (stale[0] / "c" / "0.0").write_bytes(b"x" * 100)
    stale[1].mkdir()
    others = [
        tmp_path / ".T31TDJ.0a1b2c3d.tmp.zarr",  # another tile's writer may be running now
        tmp_path / ".T31TCJ.0a1b2c3d.tmp.tif",  # another output (same stem, other format)
        tmp_path / ".T31TCJ.notahex0.tmp.zarr",
        tmp_path / "T31TCJ.0a1b2c3d.tmp.zarr",  # not hidden: not ours to delete
    ]
    for p in others:
        p.write_text("keep")
    assert leftovers(final) == sorted(stale)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "zarr.json").write_text("{}")
    assert final.is_dir() and not any(p.exists() for p in stale)
    assert all(p.read_text() == "keep" for p in others)
    cog = tmp_path / "map.tif"
    (tmp_path / ".map.12345678.tmp.stage.tif").write_bytes(b"staging")
    (tmp_path / ".map.12345678.tmp.tif").write_bytes(b"half a COG")
    with atomic_path(cog) as tmp:
        tmp.write_bytes(b"COG")
    assert sorted(p.name for p in tmp_path.glob(".map*")) == []


def test_kill_9_mid_write_then_rerun_leaves_one_clean_output(tmp_path):
    """A real SIGKILL while a writer is inside atomic_path, then the same write again."""
    final = tmp_path / "out" / "cube.zarr"
    code = (
        "import sys, time; from pathlib import Path; from pipeline.io.atomic import atomic_path\n"
        f"with atomic_path(Path({str(final)!r})) as tmp:\n"
        "    tmp.mkdir(); (tmp / 'part').write_bytes(b'0' * 1000); print('writing', flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not final.exists() and len(leftovers(final)) == 1  # what kill -9 leaves
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "part").write_bytes(b"1" * 1000)
    assert sorted(p.name for p in final.parent.iterdir()) == ["cube.zarr"]
    assert (final / "part").read_bytes() == b"1" * 1000


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_failed_write_leaves_the_previous_output_untouched(tmp_path, kind):
    """ENOSPC raised inside the writer: the previous version stays, and the error says "disk full"."""
    final = tmp_path / ("a.json" if kind == "file" else "a.zarr")
    with atomic_path(final) as tmp:
        tmp.write_text("v1") if kind == "file" else tmp.mkdir()
    before = final.stat().st_mtime_ns
    with pytest.raises(PipelineError, match="disk full"), atomic_path(final) as tmp:
        tmp.write_text("half") if kind == "file" else tmp.mkdir()
        raise OSError(28, "No space left on device")
    assert final.stat().st_mtime_ns == before and [p.name for p in tmp_path.iterdir()] == [final.name]


# --- the file system: full, read-only, a file where the run needs a folder ---------------------


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (mount(2) needs root, as on the CI machine; skipped elsewhere with the reason)."""
    where = tmp_path / "fs"
    where.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], check=True,
                       capture_output=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {exc}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False, capture_output=True, timeout=30)


def _fill(fs: Path) -> None:
    """Leave 64 KiB free."""
    st = os.statvfs(fs)
    (fs / "filler").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - (64 << 10)))


def _big_map(cfg):
    rng = np.random.default_rng(0)
    return make_grid(2048, 2048), rng.integers(0, 30, (2048, 2048)).astype(np.uint8)


def test_disk_full_while_writing_is_one_line_and_leaves_nothing(small_fs):
    """A COG (predict), a GeoPackage (split), a checkpoint (training), a zarr store (ingest,
    gapfill): each library words a full disk its own way ("Write error at scanline", "no such
    table: gpkg_contents", "unexpected pos"); the chain says "disk full" and names the file."""
    cfg = load_config(REPO / "config.yaml")
    _fill(small_fs)
    grid, classes = _big_map(cfg)
    writers = {
        "map.tif": lambda out: write_class_map(out, grid, cfg.classes, classes),
        "split.gpkg": lambda out: _gpkg(out),
        "epoch_0001.pt": lambda out: _checkpoint(out),
        "cube.zarr": lambda out: _store(out),
    }
    for name, write in writers.items():
        out = small_fs / "run" / name
        with pytest.raises(PipelineError) as err:
            write(out)
        msg = str(err.value)
        assert msg.startswith(f"{out}: disk full in {out.parent}") and "\n" not in msg, msg
        assert sorted(p.name for p in small_fs.rglob("*")) == ["filler", "run"], name


def _gpkg(out: Path) -> None:
    import geopandas as gpd
    from shapely.geometry import box

    frame = gpd.GeoDataFrame(
        {"id": range(5000)}, geometry=[box(i, 0, i + 1, 1) for i in range(5000)], crs=32631
    )
    with atomic_path(out) as tmp:
        frame.to_file(tmp, layer="reference", driver="GPKG")


def _checkpoint(out: Path) -> None:
    import torch

    with atomic_path(out) as tmp:
        torch.save({"state_dict": {"w": torch.zeros(512, 512)}}, tmp)


def _store(out: Path) -> None:
    import zarr

    with atomic_path(out) as tmp:
        z = zarr.create_array(str(tmp), shape=(1024, 1024), dtype="int16", chunks=(256, 256))
        z[...] = np.random.default_rng(0).integers(0, 1000, (1024, 1024)).astype(np.int16)


def test_a_read_only_workdir_is_one_line(small_fs, tmp_path, capsys):
    (small_fs / "run").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True, capture_output=True)
    cfg = load_config(REPO / "config.yaml")
    for out in (small_fs / "run" / "map.tif", small_fs / "run" / "maps" / "rf" / "map.tif"):
        with pytest.raises(PipelineError, match="read-only file system in") as err:
            write_class_map(out, make_grid(64, 64), cfg.classes, np.zeros((64, 64), np.uint8))
        assert "\n" not in str(err.value)
    # through the entry point: exit 2 and one line
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["run"]["workdir"] = str(small_fs / "run")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["split", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "read-only file system" in err[0], err


def test_a_workdir_that_is_a_file_is_one_line(tmp_path, capsys):
    workdir = tmp_path / "results"
    workdir.write_text("not a folder")
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["run"]["workdir"] = str(workdir)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    assert main(["split", "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {workdir}: is a file, where the run needs a folder (check run.workdir)"
    assert workdir.read_text() == "not a folder"
    # Snakemake stops before any job, with the same line
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--configfile",
           str(tmp_path / "c.yaml"), "-n", "--cores", "1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"{workdir}: is a file, where the run needs a folder" in proc.stdout + proc.stderr


# --- kill -9 in a long stage, then the same command: the same bytes ------------------------------


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A 384-px demo tile, ingested and gapfilled once without interruption (the oracle)."""
    work = tmp_path_factory.mktemp("kill")
    raw = tiny_demo_config(size=384)
    raw["run"]["threads"] = 1
    raw["inputs"]["tiles"] = {"T31TCJ": raw["inputs"]["tiles"]["T31TCJ"]}
    (work / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    tile = ["--tile", "T31TCJ"]
    chain = [
        ["demo"],
        ["ingest", *tile],
        ["gapfill", *tile],
        ["histogram", *tile],
        ["percentiles"],
        ["split"],
    ]
    chain += [["rasterise", *tile], ["train", "--model", "rf"], ["predict", "--model", "rf", *tile]]
    for args in chain:
        done = _landcover(work, *args)
        assert done.returncode == 0, (args, done.stderr[-2000:])
    return work


def _landcover(work: Path, *args: str, wait: bool = True):
    cmd = [sys.executable, "-m", "pipeline", "--config", "config.yaml", *args]
    if wait:
        return subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _files(out: Path) -> dict[str, bytes]:
    if out.is_file():
        return {out.suffix: out.read_bytes()}
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("stage", ["ingest", "gapfill", "predict"])
def test_kill_9_in_a_long_stage_then_the_same_command_gives_the_same_bytes(demo_run, stage):
    """(Training, the longest, resumes from its checkpoints: test_nettrain.py, test_slurm.py.)"""
    lay = Layout(demo_run / "results")
    outputs = {"ingest": lay.ingest("T31TCJ"), "gapfill": lay.gapfilled("T31TCJ")}
    final = outputs.get(stage) or lay.class_map("rf", "T31TCJ")
    want = _files(final)
    out = final.with_name(f"again{final.suffix}")
    args = [stage, "--tile", "T31TCJ", "--out", str(out)]
    if stage == "predict":
        args += ["--model", "rf", "--confidence", str(out.with_name("again_confidence.tif"))]
    killed = False
    for _ in range(20):  # kill it while its temporary is being written
        proc = _landcover(demo_run, *args, wait=False)
        while proc.poll() is None and not leftovers(out):
            time.sleep(0.005)
        if proc.poll() is None:
            time.sleep(0.1)  # some windows written
            os.kill(proc.pid, signal.SIGKILL)
            killed = proc.wait(timeout=60) == -signal.SIGKILL
        if killed:
            break
        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
    assert killed, f"{stage} always finished before it could be killed"
    assert not out.exists() and leftovers(out)  # what kill -9 leaves: a hidden temporary
    done = _landcover(demo_run, *args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not leftovers(out)
    assert _files(out) == want
