"""Atomic outputs: write under a temporary name in the same folder, rename only on success.

An interrupted rule must never leave something that looks complete to Snakemake or to a user, so
every writer in the package goes through :func:`atomic_path`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


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


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` (file or directory); rename it into place on success.

    The temporary keeps the final suffix (``.tif``, ``.zarr``) so drivers pick the right format.
    On any exception the temporary is removed and ``final`` is left untouched. Temporaries of
    ``final`` left by a killed earlier writer are removed first: on a full tile they are many GB,
    and one output has one writer at a time (Snakemake's lock; see docs/faults.md).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
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
    except BaseException:
        _remove(tmp)
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
