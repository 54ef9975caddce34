"""The fault suite: each fault a production run meets (killed jobs, damaged inputs and models,
failed retrains), injected on purpose, and what the chain promises in return (docs/faults.md):
one line naming the file and the cause, a non-zero exit, nothing partial or stale left behind.

Faults whose natural home is a stage's own tests are pinned there and listed in docs/faults.md;
this file holds the ones that cut across stages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from pipeline.io.atomic import atomic_path, leftovers


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
    final = tmp_path / ("a.json" if kind == "file" else "a.zarr")
    with atomic_path(final) as tmp:
        tmp.write_text("v1") if kind == "file" else tmp.mkdir()
    before = final.stat().st_mtime_ns
    with pytest.raises(OSError, match="No space left"), atomic_path(final) as tmp:
        tmp.write_text("half") if kind == "file" else tmp.mkdir()
        raise OSError(28, "No space left on device")
    assert final.stat().st_mtime_ns == before and [p.name for p in tmp_path.iterdir()] == [final.name]
