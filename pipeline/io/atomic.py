"""Atomic outputs: write under a temporary name in the same folder, rename only on success.

An interrupted rule must never leave something that looks complete to Snakemake or to a user, so
every writer in the package goes through :func:`atomic_path`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _discard(tmp: Path, settle: float = 0.2, limit: float = 5.0) -> None:
    """Remove a failed writer's temporary for good. zarr writes chunks as concurrent tasks on its own
    event loop, and when one fails (a full disk) the others still run after the exception has
    reached us, re-creating chunk folders under a temporary already removed. So remove it again
    until it has stayed away for ``settle`` seconds (at most ``limit`` seconds, failure path only)."""
    deadline = time.monotonic() + limit
    _remove(tmp)
    gone_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        if tmp.exists() or tmp.is_symlink():
            _remove(tmp)
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since >= settle:
            return


def leftovers(final: str | os.PathLike[str]) -> list[Path]:
    """Temporaries of ``final`` that a killed writer left behind (``kill -9``, node failure, time limit):
    ``.<stem>.<hex>.tmp<suffix>``, a COG's ``.<stem>.<hex>.tmp.stage<suffix>``, and the previous
    version ``.<name>.<hex>.old`` moved aside during a swap."""
    final = Path(final)
    ours = re.compile(
        rf"\.{re.escape(final.stem)}\.[0-9a-f]{{8}}\.tmp(\.stage)?{re.escape(final.suffix)}"
        rf"|\.{re.escape(final.name)}\.[0-9a-f]{{8}}\.old"
    )
    try:
        return sorted(p for p in final.parent.iterdir() if ours.fullmatch(p.name))
    except FileNotFoundError:
        return []


# A write that fails with less than this left on the file system failed for want of space, whatever
# words the library found for it (GDAL "Write error at scanline", SQLite "no such table:
# gpkg_contents", torch "unexpected pos")
LOW_SPACE = 16 << 20
_WORDS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}
_TEXTS = {
    "No space left on device": "disk full",
    "database or disk is full": "disk full",
    "Disk quota exceeded": "disk quota exceeded",
    "Read-only file system": "read-only file system",
}


def write_fault(exc: BaseException, folder: Path) -> str | None:
    """Why a write under ``folder`` failed when the cause is the file system, not the data; None
    when the file system looks fine (the error is then the writer's own, and is raised as it is)."""
    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    why = next((_WORDS[e.errno] for e in chain if isinstance(e, OSError) and e.errno in _WORDS), None)
    why = why or next((w for e in chain for t, w in _TEXTS.items() if t in str(e)), None)
    try:
        st = os.statvfs(folder)
        free = st.f_bavail * st.f_frsize
    except OSError:
        free = None
    if why is None and free is not None and free < LOW_SPACE:
        why = "disk full"
    why = why or _unwritable(folder)
    if why is None:
        return None
    space = f" ({free / 2**20:.1f} MiB free)" if free is not None and why.startswith("disk") else ""
    return f"{why} in {folder}{space}; nothing was written"


def _unwritable(folder: Path) -> str | None:
    """Why ``folder`` cannot be written (None: it can)."""
    if os.access(folder, os.W_OK):
        return None
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return "read-only file system" if read_only else "permission denied"


def file_in_the_way(folder: str | os.PathLike[str]) -> PipelineError | None:
    """The error for a file standing where ``folder`` or one of its parents should be (None: none)."""
    folder = Path(folder)
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is None or blocker.is_dir():
        return None
    return PipelineError(blocker, "is a file, where the run needs a folder (check run.workdir)")


def _make_folder(folder: Path) -> None:
    """``mkdir -p`` with one line for what users meet: a run.workdir (or a folder in it) that is a
    file, a read-only or foreign file system."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:
        raise file_in_the_way(folder) or PipelineError(
            folder, f"cannot create folder ({exc.strerror})"
        ) from exc
    except OSError as exc:
        near = next((p for p in folder.parents if p.exists()), folder)
        raise PipelineError(
            folder, write_fault(exc, near) or f"cannot create folder ({exc.strerror})"
        ) from exc


def check_workdir(workdir: str | os.PathLike[str]) -> None:
    """Before any stage reads its inputs: the run's folder is a folder (or can become one) that can
    be written, so a misplaced run.workdir fails in one line, not after an hour of compute."""
    if exc := file_in_the_way(workdir):
        raise exc
    workdir = Path(workdir)
    nearest = next((p for p in (workdir, *workdir.parents) if p.exists()), None)
    if nearest is not None and (why := _unwritable(nearest)):
        raise PipelineError(workdir, f"{why} in {nearest}: the run cannot write its outputs")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` (file or directory); rename it into place on success.

    The temporary keeps the final suffix (``.tif``, ``.zarr``) so drivers pick the right format.
    On any exception the temporary is removed and ``final`` is left untouched. Temporaries of
    ``final`` left by a killed earlier writer are removed first: on a full tile they are many GB,
    and one output has one writer at a time (Snakemake's lock; see docs/faults.md).
    """
    final = Path(final)
    _make_folder(final.parent)
    for stale in leftovers(final):
        _remove(stale)
    tmp = final.with_name(f".{final.stem}.{uuid.uuid4().hex[:8]}.tmp{final.suffix}")
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"{final}: writer produced nothing")
        if final.exists() or final.is_symlink():
            # a directory cannot be replaced by os.replace: move the old one aside first
            old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
    except PipelineError:
        _discard(tmp)
        raise
    except Exception as exc:
        fault = write_fault(exc, final.parent)  # while the temporary still holds the space
        _discard(tmp)
        if fault is None:
            raise
        raise PipelineError(final, fault) from exc
    except BaseException:
        _discard(tmp)
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
