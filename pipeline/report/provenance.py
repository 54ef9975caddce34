"""Where a map comes from: the config and its hash, the software, the input products, stage times.

Everything here degrades to "unknown" / "not recorded" instead of failing: a report built outside a
git checkout, outside Snakemake (no benchmark files) or after intermediate stores were cleaned up
still builds and says what it could not find.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import pipeline
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.io.tilestore import open_store
from pipeline.layout import Layout
from pipeline.usage import read_usage

DISTRIBUTION = "landcover-pipeline"
UNKNOWN = "unknown"


def config_text(cfg: Config) -> str:
    """The validated config (defaults filled in) as YAML, the text the run froze in run-config.yaml."""
    return yaml.safe_dump(cfg.data, sort_keys=False)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def package_version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return pipeline.__version__


def _git(*args: str, cwd: Path) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_commit(source: Path | None = None) -> str:
    """The commit of the package's checkout, "+ uncommitted changes" when the tracked files differ;
    "unknown" without git or outside a checkout (an installed wheel)."""
    where = Path(source or Path(pipeline.__file__).parent)
    commit = _git("rev-parse", "HEAD", cwd=where)
    if not commit:
        return UNKNOWN
    # --no-optional-locks: never take the index lock of a checkout someone may be working in
    dirty = _git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no", cwd=where)
    return f"{commit} + uncommitted changes" if dirty else commit


def input_products(lay: Layout, tile: str) -> dict[str, Any] | None:
    """The products the tile's ingest store records (one per date), or None when it is gone."""
    try:
        attrs = dict(open_store(lay.ingest(tile), "ingest").attrs)
    except PipelineError:
        return None
    dates = list(attrs.get("dates", []))
    n = len(dates)

    def column(key: str) -> list[Any]:
        values = list(attrs.get(key) or [])
        return values + [None] * (n - len(values))

    rows = [
        {"date": d, "acquired": a, "product": p, "platform": pf, "orbit": o, "folder": f}
        for d, a, p, pf, o, f in zip(
            dates,
            column("acquired"),
            column("products"),
            column("platforms"),
            column("relative_orbits"),
            column("product_dirs"),
            strict=True,
        )
    ]
    return {"format": attrs.get("format"), "source": attrs.get("source"), "products": rows}


@dataclass(frozen=True)
class Job:
    """One Snakemake job's benchmark line: wall-clock seconds, peak memory, CPU seconds."""

    rule: str
    key: str
    seconds: float
    max_rss_mb: float | None
    cpu_seconds: float | None


def _float(v: str | None) -> float | None:
    try:
        return float(v) if v not in (None, "", "NA", "-") else None
    except ValueError:
        return None


def benchmarks(lay: Layout) -> list[Job]:
    """Every ``benchmarks/<rule>/<key>.tsv`` written by Snakemake's ``benchmark:``; [] outside Snakemake.

    A file holds a header and one line per repeat; the first line counts. CPU time and peak memory
    come from the usage line at the end of the job's log where there is one: Snakemake samples
    them every 30 s, the stage's own ``getrusage`` counts them exactly (:mod:`pipeline.usage`).
    """
    root = lay.benchmarks()
    jobs = []
    for path in sorted(root.glob("*/*.tsv")) if root.is_dir() else []:
        try:
            with path.open(newline="") as fh:
                row = next(csv.DictReader(fh, delimiter="\t"), None)
        except OSError:
            row = None
        if row is None or _float(row.get("s")) is None:
            continue
        rule, key = path.parent.name, path.stem
        used = read_usage(lay.log(rule, key))
        jobs.append(
            Job(
                rule,
                key,
                float(row["s"]),
                used.peak_mib if used else _float(row.get("max_rss")),
                used.cpu_s if used else _float(row.get("cpu_time")),
            )
        )
    return jobs


def rule_totals(jobs: list[Job]) -> dict[str, float]:
    """Seconds per rule, summed over its jobs."""
    totals: dict[str, float] = {}
    for j in jobs:
        totals[j.rule] = totals.get(j.rule, 0.0) + j.seconds
    return totals
