"""What a stage used, as the kernel counted it: one line at the end of its log, and its reader.

Snakemake's ``benchmark:`` files sample the process tree every 30 s, so they miss a job's last
seconds and short peaks; ``getrusage`` counts every thread's CPU time and the exact peak RSS. The
QA report's job table and ``bench/bench_chain.py`` read these lines.
"""

from __future__ import annotations

import re
import resource
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(
    r"landcover (\S+): wall ([\d.]+) s, CPU ([\d.]+) s \(user [\d.]+ s, system [\d.]+ s\), peak RSS (\d+) MiB"
)


@dataclass(frozen=True)
class Usage:
    stage: str
    wall_s: float
    cpu_s: float
    peak_mib: float


def usage_line(
    stage: str, wall_s: float, own: resource.struct_rusage, children: resource.struct_rusage
) -> str:
    """The log line. Children (worker processes the stage waited for) add their CPU time; their
    peak is the largest one's, since they did not all live at once."""
    user = own.ru_utime + children.ru_utime
    system = own.ru_stime + children.ru_stime
    peak_mib = max(own.ru_maxrss, children.ru_maxrss) / 1024  # KiB on Linux
    return (
        f"landcover {stage}: wall {wall_s:.1f} s, CPU {user + system:.1f} s "
        f"(user {user:.1f} s, system {system:.1f} s), peak RSS {peak_mib:.0f} MiB"
    )


def usage_now(stage: str, wall_s: float) -> str:
    """:func:`usage_line` for this process and the children it has waited for."""
    return usage_line(
        stage, wall_s, resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    )


def read_usage(log: Path) -> Usage | None:
    """The last usage line of a stage's log; None without one (a failed or older run, no log)."""
    try:
        found = _LINE.findall(log.read_text(errors="replace"))
    except OSError:
        return None
    if not found:
        return None
    stage, wall, cpu, peak = found[-1]
    return Usage(stage, float(wall), float(cpu), float(peak))
