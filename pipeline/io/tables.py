"""Small CSV tables the chain writes for people and reads back (class areas, regional statistics):
written atomically, read with their numeric columns parsed and checked."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path


def write_csv(rows: Sequence[Mapping[str, Any]], fields: Sequence[str], out: Path) -> None:
    """``rows`` as a CSV with columns ``fields`` (None as an empty cell), atomically."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in fields})
    with atomic_path(out) as tmp:
        tmp.write_text(buf.getvalue())


def read_csv(
    path: Path, types: Mapping[str, Callable[[str], Any]], nullable: Collection[str], what: str
) -> list[dict[str, Any]]:
    """The rows of a CSV written by :func:`write_csv`: every column of ``types`` must be there and
    parse (an empty cell is None only in the ``nullable`` columns); one line naming the file else."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            for k, parse in types.items():
                r[k] = None if r[k] == "" and k in nullable else parse(r[k])
        return rows
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise PipelineError(path, f"not {what} ({exc})") from None
