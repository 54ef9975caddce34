"""pipeline.usage: the stage's usage line (getrusage) and its reader, used by the report and the bench."""

from __future__ import annotations

import resource

from pipeline.layout import Layout
from pipeline.report import provenance
from pipeline.usage import Usage, read_usage, usage_line


def _rusage(utime: float, stime: float, maxrss_kib: int) -> resource.struct_rusage:
    return resource.struct_rusage((utime, stime, maxrss_kib) + (0,) * 13)


def test_usage_line_adds_children_cpu_and_takes_the_larger_peak():
    line = usage_line("gapfill", 12.34, _rusage(1.5, 0.5, 2048), _rusage(0.25, 0.25, 4096))
    # 1.5 + 0.5 + 0.25 + 0.25 = 2.5 CPU-s; peak max(2, 4) MiB, not their sum
    assert line == "landcover gapfill: wall 12.3 s, CPU 2.5 s (user 1.8 s, system 0.8 s), peak RSS 4 MiB"


def test_the_last_usage_line_of_a_log_is_read_back(tmp_path):
    log = tmp_path / "gapfill_T31TCJ.log"
    assert read_usage(log) is None  # no log
    log.write_text("progress 10%\r progress 100%\nerror: something\n")
    assert read_usage(log) is None  # a failed run: no usage line
    first = usage_line("gapfill", 3.0, _rusage(1.0, 1.0, 1024), _rusage(0, 0, 0))
    last = usage_line("gapfill", 5.25, _rusage(7.0, 1.0, 3 * 1024 * 1024), _rusage(0, 0, 0))
    log.write_text(f"2026 INFO pipeline: {first}\nwin 4/4\r\n2026 INFO pipeline: {last}\n")
    assert read_usage(log) == Usage("gapfill", 5.2, 8.0, 3072.0)  # a rerun appended: the last counts


def test_the_report_takes_cpu_and_peak_from_the_log_and_wall_from_snakemake(tmp_path):
    lay = Layout(tmp_path)
    for key in ("rf_T31TCJ", "rf_T31TDJ"):
        path = lay.benchmark("predict", key)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("s\th:m:s\tmax_rss\tmax_vms\tcpu_time\n12.5\t0:00:12\t345.6\t900\t20.1\n")
    lay.log("predict", "rf_T31TCJ").parent.mkdir(parents=True)
    lay.log("predict", "rf_T31TCJ").write_text(
        usage_line("predict", 12.0, _rusage(20.0, 3.0, 500 * 1024), _rusage(0, 0, 0))
    )
    jobs = {j.key: j for j in provenance.benchmarks(lay)}
    assert (jobs["rf_T31TCJ"].seconds, jobs["rf_T31TCJ"].cpu_seconds, jobs["rf_T31TCJ"].max_rss_mb) == (
        12.5,
        23.0,
        500.0,
    )
    # without a usage line (no log): Snakemake's sampled figures
    assert (jobs["rf_T31TDJ"].cpu_seconds, jobs["rf_T31TDJ"].max_rss_mb) == (20.1, 345.6)
