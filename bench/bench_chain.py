"""The whole chain, stage by stage, on demo tiles of growing size, extrapolated to a full tile. Not a test.

What a national map costs is core-hours per tile per stage, times the tiles, plus the stages run
once per country. This script runs the real workflow (`snakemake` on the Snakefile) on the demo
country generated at each ``--sizes`` (two tiles, the MGRS overlap scaled to the size), with the
paper's date grid (33 dates x 10 bands = 330 features, G = 11) and a national-sized RF sample
(``--samples-per-class`` x 17 classes). Jobs run one at a time, each on all cores, so that a
stage's figures are its own.

Per job it reads wall seconds (Snakemake's), CPU seconds and peak RSS (the usage line every stage
logs at exit, ``getrusage``; Snakemake's sampled figures where there is none), as the QA report
does, and per store the bytes on disk. Per-tile stages are fitted as ``a + b * pixels`` over
the sizes and taken at 10980²;
the single jobs over the whole mosaic (mosaic, vector, report, ...) the same per tile, times
``--tiles``; training and the other stages that depend on the sample, as measured. Then
:func:`project` spreads ``--tiles`` tiles over ``--nodes`` nodes of the seed's cluster under the
schema's SLURM requests, and checks each rule's projected job against its default runtime and
memory. Method and results: docs/benchmarks/national_cost.md.

    python bench/bench_chain.py [--quick] [--sizes 1024 2048] [--samples-per-class 32000]
                                [--references 2] [--steps 25] [--workdir DIR] [--keep]
                                [--tiles 110] [--nodes 1 2 5 11 20 50] [--markdown FILE]
    python bench/bench_chain.py --summarise --workdir DIR     # the tables again from kept runs

JSON lines: one per job and size, one per store and size, one per stage at full size, then the
projection; ``--markdown FILE`` also writes the tables for docs/benchmarks/national_cost.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

from pipeline.config import validate  # noqa: E402
from pipeline.layout import Layout  # noqa: E402
from pipeline.report.provenance import benchmarks  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FULL = 10980
MGRS_OVERLAP = 984
SNAKEMAKE = str(Path(sys.executable).parent / "snakemake")
#: rules whose jobs are one per tile (or per model and tile): their cost scales with the tile's pixels
TILE_RULES = ("ingest", "gapfill", "validity", "rasterise", "patches", "predict", "validate", "qa")
#: where each store lives under the workdir, with the tile as {tile}
STORES = {
    "products (L2A inputs)": "inputs/{tile}",
    "ingest store": "ingest/{tile}.zarr",
    "gapfilled store": "gapfilled/{tile}.zarr",
    "labels": "reference/{tile}.zarr",
    "patches": "patches/{tile}.*.npz",
    "maps (all models)": "maps/*/{tile}*",
    "clear-date count": "quality/{tile}_clear.tif",
}


def overlay(workdir: Path, size: int, args: argparse.Namespace) -> dict:
    """The run's settings over config.yaml: its own workdir, the size, the paper's dates and sample."""
    inputs = workdir / "inputs"
    tiles = {t: {"format": "theia", "path": str(inputs / t)} for t in ("T31TCJ", "T31TDJ")}
    overlap = 2 * round(MGRS_OVERLAP * size / FULL / 2)
    return {
        "run": {"workdir": str(workdir), "threads": 0},
        "demo": {"out": str(inputs), "size": size, "overlap": overlap},
        "inputs": {
            "tiles": tiles,
            "reference": str(inputs / "reference.gpkg"),
            "regions": str(inputs / "regions.gpkg"),
        },
        # the paper's grid: 33 dates (11 groups of 3) x 10 bands = 330 features
        "date_grid": {"start": "2018-01-10", "end": "2018-12-31", "step_days": 11},
        "classifiers": list(args.classifiers),
        "rf": {"samples_per_class": args.samples_per_class},
        "qa": {"references": args.references},
        "nets": {
            "groups": 11,
            "epochs": 1,
            "steps_per_epoch": args.steps,
            "warmup_epochs": 0,
            "precision": "auto",
        },
    }


def rules() -> list[str]:
    out = subprocess.run([SNAKEMAKE, "--list-rules"], cwd=REPO, capture_output=True, text=True, check=True)
    return [ln for ln in out.stdout.split() if ln.isidentifier()]


def run_chain(workdir: Path, size: int, args: argparse.Namespace, threads: int) -> float:
    """Run the workflow to its end; wall seconds. Each job gets all cores, so jobs run one at a time."""
    workdir.mkdir(parents=True, exist_ok=True)
    over = workdir.parent / f"overlay_{size}.yaml"
    over.write_text(yaml.safe_dump(overlay(workdir, size, args), sort_keys=False))
    cmd = [
        SNAKEMAKE,
        "--cores",
        str(threads),
        "--configfile",
        str(REPO / "config.yaml"),
        str(over),
        "--set-threads",
        *[f"{r}={threads}" for r in rules() if r != "all"],
    ]
    t0 = time.perf_counter()
    with open(workdir.parent / f"snakemake_{size}.log", "w") as log:
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if rc:
        raise SystemExit(f"snakemake failed at size {size}: see {log.name} in {workdir.parent}")
    return time.perf_counter() - t0


def stage_rows(workdir: Path) -> list[dict]:
    """Every job's wall s (Snakemake's, start-up included), CPU s and peak RSS (MB).

    CPU and peak come from the usage line each stage logs at exit (``getrusage``: every thread,
    the exact peak), Snakemake's sampled figures only where there is none: the QA report's reader.
    """
    return [
        {
            "rule": j.rule,
            "key": j.key,
            "per_tile": j.rule in TILE_RULES,
            "wall_s": j.seconds,
            "cpu_s": j.cpu_seconds or 0.0,
            "max_rss_mb": (j.max_rss_mb or 0.0) * 1.048576,  # MiB -> MB
        }
        for j in benchmarks(Layout(workdir))
    ]


def du(paths: list[Path]) -> int:
    total = 0
    for p in paths:
        files = [p] if p.is_file() else p.rglob("*")
        total += sum(f.stat().st_size for f in files if f.is_file())
    return total


def store_rows(workdir: Path, tiles: list[str]) -> list[dict]:
    rows = []
    for name, pattern in STORES.items():
        for tile in tiles:
            paths = list(workdir.glob(pattern.format(tile=tile)))
            rows.append({"store": name, "tile": tile, "bytes": du(paths)})
    return rows


def group(rows: list[dict]) -> dict[str, dict]:
    """Per-tile rules summed per tile (predict/validate: per model kind), national rules as they are."""
    out: dict[str, dict] = {}
    for r in rows:
        name = r["rule"]
        if r["rule"] in ("predict", "validate", "train"):
            model = r["key"].rsplit("_", 1)[0] if r["per_tile"] else r["key"]
            name = f"{r['rule']} {'rfref' if model.startswith('rfref') else model}"
        g = out.setdefault(name, {"per_tile": r["per_tile"], "wall_s": 0.0, "cpu_s": 0.0, "max_rss_mb": 0.0})
        g["wall_s"] += r["wall_s"]
        g["cpu_s"] += r["cpu_s"]
        g["max_rss_mb"] = max(g["max_rss_mb"], r["max_rss_mb"])
    return out


#: rules run once per country over its whole area (the mosaic and what reads it): they scale with it
AREA_RULES = ("mosaic", "regions", "vector", "design", "report", "catalogue")
#: rules' keys in `resources:` where they differ from the rule's name
RESOURCE_KEY = {
    "train fgunet": "train_network",
    "train_reference": "train",
    "design": "accuracy",
    "estimate": "accuracy",
}


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``; one point: through the origin."""
    if len(points) == 1:
        x, y = points[0]
        return 0.0, y / x
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


def load_runs(workdir: Path) -> dict[int, dict]:
    runs = {}
    for f in workdir.glob("run_s*.json"):
        rec = json.loads(f.read_text())
        rec["tiles"] = sorted({r["key"] for r in rec["rows"] if r["rule"] == "ingest"})
        rec["stages"] = group(rec["rows"])
        runs[rec["size"]] = rec
    return dict(sorted(runs.items()))


def scaling(name: str, per_tile: bool) -> str:
    if per_tile:
        return "tile"
    return "area" if name.split()[0] in AREA_RULES else "once"


def extrapolate(runs: dict[int, dict], tiles: int) -> dict[str, dict]:
    """Each stage at full size: per tile (per-tile rules), for ``tiles`` tiles (area rules), or as measured.

    Per-tile and area rules: CPU and wall per tile of the run fitted as ``a + b * px`` over the
    sizes and taken at 10980²; an area rule (one job over the country: mosaic, vector, report)
    costs ``tiles`` times that, its fixed part counted per tile (conservative). Training,
    splitting and the comparison depend on the sample and the polygons, not the area: the largest
    run's figures.
    """
    last = runs[max(runs)]
    out = {}
    for name, g in last["stages"].items():
        kind = scaling(name, g["per_tile"])
        rec = {"kind": kind, "rss_mb": [round(r["stages"][name]["max_rss_mb"]) for r in runs.values()]}
        if kind == "once":
            rec.update(cpu_s=g["cpu_s"], wall_s=g["wall_s"], measured=[g["cpu_s"]])
        else:
            pts, wpts = [], []
            for size, r in runs.items():
                n = len(r["tiles"])
                pts.append((size * size, r["stages"][name]["cpu_s"] / n))
                wpts.append((size * size, r["stages"][name]["wall_s"] / n))
            (a, b), (aw, bw) = fit(pts), fit(wpts)
            times = 1 if kind == "tile" else tiles
            rec.update(
                cpu_s=times * (a + b * FULL * FULL),
                wall_s=times * (aw + bw * FULL * FULL),
                measured=[round(y, 1) for _, y in pts],
                fit_a_s=round(a, 2),
                fit_b_us_per_px=round(b * 1e6, 4),
            )
        out[name] = rec
    return out


def schema_resources() -> dict[str, dict]:
    """The schema's per-rule SLURM requests (what `--profile slurm` asks for when config.yaml is silent)."""
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw.pop("resources", None)  # the demo's small requests: the defaults are sized for full tiles
    return validate(raw)["resources"]


PHASES = {
    "per tile, before training": ("ingest", "gapfill", "validity", "rasterise", "patches"),
    "per tile, mapping and QA": ("predict", "validate", "qa"),
}


def project(full: dict[str, dict], args: argparse.Namespace, threads: int, measured_refs: int) -> dict:
    """Core-hours and wall time of a country on ``args.nodes`` nodes under the schema's SLURM requests.

    Each job asks for its rule's default ``cpus_per_task`` and ``mem_mb``; a node runs as many as its
    cores and memory allow. A job's wall at c cores is its CPU time / (c x the parallel efficiency it
    had here on ``threads`` cores): optimistic beyond ``threads`` cores, which this machine cannot
    test. Per-tile phases take max(node-time / nodes, one tile's chain); the rest run as measured.
    FG-UNET training is left out: its cost is set by the number of steps, not by the tiles (below).
    """
    res = schema_resources()
    refs = args.project_references
    node_mb = args.node_mem_gb * 1000
    jobs, checks = [], []
    for name, f in full.items():
        if name in ("train fgunet", "demo"):  # the network's training: below; the demo is no stage
            continue
        base = name.split()[0]
        count = 1
        if f["kind"] == "tile":
            count = args.tiles
        if name in ("predict rfref", "train_reference"):
            f = {**f, "cpu_s": f["cpu_s"] / measured_refs, "wall_s": f["wall_s"] / measured_refs}
            count *= refs
        req = res[RESOURCE_KEY.get(name, base)]
        c = req["cpus_per_task"]
        eff = min(1.0, f["cpu_s"] / (threads * f["wall_s"])) if f["wall_s"] > 0 else 1.0
        wall_c = f["cpu_s"] / (c * eff) if c > 1 else f["cpu_s"] / min(1.0, eff * threads)
        per_node = max(1, min(args.node_cores // c, node_mb // req["mem_mb"]))
        rss = max(f["rss_mb"])
        checks.append(
            {
                "stage": name,
                "cpus": c,
                "mem_mb": req["mem_mb"],
                "runtime_min": req["runtime"],
                "job_wall_min": round(wall_c / 60, 1),
                "peak_rss_mb": rss,
                "fits": wall_c / 60 <= req["runtime"] and rss <= req["mem_mb"],
            }
        )
        jobs.append(
            {
                "stage": name,
                "base": base,
                "count": count,
                "cpu_s": f["cpu_s"],
                "wall": wall_c,
                "per_node": per_node,
            }
        )
    core_h = sum(j["cpu_s"] * j["count"] for j in jobs) / 3600
    rows = []
    for nodes in args.nodes:
        phases = {}
        for label, phase in PHASES.items():
            js = [j for j in jobs if j["base"] in phase]
            node_s = sum(j["wall"] * j["count"] / j["per_node"] for j in js)
            chain = sum(j["wall"] * (j["count"] / args.tiles) for j in js if j["base"] != "predict") + max(
                (j["wall"] for j in js if j["base"] == "predict"), default=0.0
            )
            phases[label] = max(node_s / nodes, chain)
        train = [j for j in jobs if j["base"] in ("train", "train_reference")]
        waves = -(-sum(j["count"] for j in train) // (nodes * max(1, min(j["per_node"] for j in train))))
        phases["training: rf + QA references"] = waves * max(j["wall"] for j in train)
        inner = set().union(*PHASES.values(), {"train", "train_reference"})
        phases["once per country: mosaic, vector, report, ..."] = sum(
            j["wall"] for j in jobs if j["base"] not in inner
        )
        rows.append(
            {
                "nodes": nodes,
                "wall_h": round(sum(phases.values()) / 3600, 2),
                **{k: round(v / 3600, 2) for k, v in phases.items()},
            }
        )
    return {
        "tiles": args.tiles,
        "references": refs,
        "core_h": round(core_h, 1),
        "walls": rows,
        "checks": checks,
    }


def summarise(workdir: Path, threads: int, args: argparse.Namespace) -> None:
    runs = load_runs(workdir)
    measured_refs = args.references
    full = extrapolate(runs, args.tiles)
    sizes = list(runs)
    for name, f in full.items():
        print(
            json.dumps(
                {"stage": name, **{k: (round(v, 1) if isinstance(v, float) else v) for k, v in f.items()}}
            )
        )
    proj = project(full, args, threads, measured_refs)
    print(json.dumps({"projection": proj}))
    if not args.markdown:
        return
    lines = [
        f"| stage | scales with | CPU-s measured ({' / '.join(f'{s}²' for s in sizes)}) | fit a + b·px "
        f"| full-size core-h | wall h on {threads} cores | peak RSS MB ({' / '.join(map(str, sizes))}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, f in full.items():
        fitted = (
            f"{f['fit_a_s']:.1f} s + {f['fit_b_us_per_px']:.3f} µs/px" if "fit_a_s" in f else "as measured"
        )
        per = {"tile": "a tile", "area": f"{args.tiles} tiles' area", "once": "once"}[f["kind"]]
        lines.append(
            f"| {name} | {per} | {' / '.join(f'{m:.1f}' for m in f['measured'])} | {fitted} "
            f"| {f['cpu_s'] / 3600:.2f} | {f['wall_s'] / 3600:.2f} | {' / '.join(map(str, f['rss_mb']))} |"
        )
    lines += [
        "",
        f"| store | MB per tile ({' / '.join(f'{s}²' for s in sizes)}) | full {FULL}² tile |",
        "|---|---|---|",
    ]
    names = dict.fromkeys(s["store"] for r in runs.values() for s in r["stores"])
    for store in names:
        pts = []
        for size, r in runs.items():
            b = [s["bytes"] for s in r["stores"] if s["store"] == store]
            pts.append((size * size, sum(b) / len(b)))
        a, b = fit(pts)
        full_b = a + b * FULL * FULL
        print(
            json.dumps(
                {
                    "store": store,
                    "bytes_per_tile": [y for _, y in pts],
                    "full_tile_gb": round(full_b / 1e9, 2),
                }
            )
        )
        lines.append(f"| {store} | {' / '.join(f'{y / 1e6:.1f}' for _, y in pts)} | {full_b / 1e9:.2f} GB |")
    keys = [k for k in proj["walls"][0] if k not in ("nodes", "wall_h")]
    lines += ["", "| nodes | wall h | " + " | ".join(keys) + " |", "|---" * (len(keys) + 2) + "|"]
    lines += [
        f"| {w['nodes']} | {w['wall_h']} | " + " | ".join(str(w[k]) for k in keys) + " |"
        for w in proj["walls"]
    ]
    args.markdown.write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--quick", action="store_true", help="sizes 384 and 512, a small sample: a shakedown")
    p.add_argument("--samples-per-class", type=int, default=32000, help="RF sample (x 17 classes)")
    p.add_argument("--references", type=int, default=2, help="QA reference RFs (paper: 10)")
    p.add_argument("--steps", type=int, default=25, help="FG-UNET training steps (its cost per step)")
    p.add_argument("--classifiers", nargs="+", default=["rf", "fgunet"])
    p.add_argument("--threads", type=int, default=0, help="cores per job (0: all usable)")
    p.add_argument("--workdir", type=Path, default=REPO / "results" / "bench_chain")
    p.add_argument("--markdown", type=Path, help="write the full-tile table here")
    p.add_argument("--keep", action="store_true", help="keep each size's workdir (default: only its logs)")
    p.add_argument("--summarise", action="store_true", help="only the table, from the runs kept in --workdir")
    p.add_argument("--tiles", type=int, default=110, help="tiles of the projected country (France: 110)")
    p.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 5, 11, 20, 50])
    p.add_argument("--node-cores", type=int, default=24, help="the seed's cluster: 24 cores ...")
    p.add_argument("--node-mem-gb", type=int, default=120, help="... and 120 GB per node")
    p.add_argument("--project-references", type=int, default=5, help="QA reference RFs in the projection")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.samples_per_class, args.steps = [384, 512], 500, 5
    threads = args.threads or len(os.sched_getaffinity(0))
    print(
        json.dumps(
            {"machine": machine(), "threads_per_job": threads, **{k: str(v) for k, v in vars(args).items()}}
        )
    )
    for size in [] if args.summarise else sorted(args.sizes):
        workdir = args.workdir / f"s{size}"
        if workdir.exists():
            shutil.rmtree(workdir)
        wall = run_chain(workdir, size, args, threads)
        rows = stage_rows(workdir)
        for r in rows:
            print(json.dumps({"size": size, **r}))
        tiles = sorted({r["key"] for r in rows if r["rule"] == "ingest"})
        stores = store_rows(workdir, tiles)
        for s in stores:
            print(json.dumps({"size": size, **s}))
        acquisitions = sum(1 for _ in (workdir / "inputs" / tiles[0]).iterdir())
        print(
            json.dumps({"size": size, "chain_wall_s": round(wall, 1), "acquisitions_per_tile": acquisitions})
        )
        record = {"size": size, "wall_s": wall, "acquisitions": acquisitions, "rows": rows, "stores": stores}
        (args.workdir / f"run_s{size}.json").write_text(json.dumps(record))
        for kept in ("benchmarks", "logs"):  # what the figures came from, kept without the stores
            dest = args.workdir / f"{kept}_s{size}"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(workdir / kept, dest)
        if not args.keep:
            shutil.rmtree(workdir)

    summarise(args.workdir, threads, args)


if __name__ == "__main__":
    main()
