"""Convergence study (issue 10): how many steps and CPU-seconds a network needs to match RF.

For FG-UNET, U-Net-3 and MLP-3 (several seeds each) it trains on an existing run's data, keeps every
epoch's checkpoint, maps both demo tiles with each one and scores them on the validation polygons
(the final metrics' split, never seen in training): kappa, OA, mean F1, and the F1 of the urban
classes (CUF, DUF, ICU) that the seed says need context. RF and the ``fgunet_rf`` hybrid are trained
per seed on the same data as the reference lines. Optionally (``--finetune-from``) the same is done
on a second demo year: from scratch, and fine-tuned from the first year's model (``nets.init_from``).

Run after the README's first command; it reuses that run's gapfilled cubes, labels, percentiles and
patch positions (nothing upstream is recomputed) and writes only under ``--out``:

    python bench/study_convergence.py --workdir results/demo --out results/study \\
        --models fgunet unet3 mlp3 --seeds 42 43 44 --epochs 8 --steps 50

A (model, seed) whose model folder already exists under ``--out`` is scored again, not retrained, so
an interrupted study continues where it stopped. Outputs: ``curves.csv`` (one row per model, seed
and epoch; RF and the hybrid as rows without epochs), ``convergence.png``, and a markdown summary on
stdout (pasted into docs/networks.md with the machine's ``lscpu``).
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import Config, load_config, validate  # noqa: E402
from pipeline.io.tilestore import open_store  # noqa: E402
from pipeline.layout import Layout  # noqa: E402
from pipeline.metrics import confusion, scores  # noqa: E402
from pipeline.models import get  # noqa: E402
from pipeline.models.features import Normalisation  # noqa: E402
from pipeline.nets.weights import load_weights  # noqa: E402
from pipeline.regularise import majority  # noqa: E402
from pipeline.train import load_meta, train  # noqa: E402

URBAN = ("CUF", "DUF", "ICU")
FIELDS = [
    "model", "seed", "epoch", "steps", "cpu_s", "wall_s", "kept",
    "kappa", "oa", "mean_f1", "f1_CUF", "f1_DUF", "f1_ICU",
]  # fmt: skip


class Scorer:
    """Maps whole tiles (one window each: equal to the stitched map, tests/test_stitching.py) and
    scores them on the run's validation labels."""

    def __init__(self, cfg: Config) -> None:
        self.cfg, lay = cfg, Layout(cfg.workdir)
        self.cubes = {
            t: np.asarray(open_store(lay.gapfilled(t), "gapfilled")["reflectance"]) for t in cfg.tiles
        }
        self.refs = {t: np.asarray(open_store(lay.labels(t), "reference")["validation"]) for t in cfg.tiles}
        self.codes = cfg.class_codes
        names = [c.name for c in cfg.classes]
        self.urban = {u: names.index(u) for u in URBAN if u in names}

    def __call__(self, model: Any, meta: dict[str, Any], model_dir: Path) -> dict[str, float | None]:
        feats = meta["features"]
        norm = Normalisation.from_json(meta["normalisation"], feats["bands"], feats["dates"])
        how = model.map_settings(self.cfg, meta, model_dir)
        cm = np.zeros((len(self.codes), len(self.codes)), np.int64)
        for tile, cube in self.cubes.items():
            codes, _ = model.classify_window(cube, norm)
            if how.radius:
                codes = majority(codes, how.radius, nodata=0, threads=self.cfg.threads())
            cm += confusion(self.refs[tile], codes, self.codes)
        sc = scores(cm)
        f1 = [f for f in sc["f1"] if f is not None]
        out = {"kappa": sc["kappa"], "oa": sc["oa"], "mean_f1": float(np.mean(f1)) if f1 else None}
        return out | {f"f1_{u}": sc["f1"][i] for u, i in self.urban.items()}


def train_on_run(cfg: Config, name: str, model_dir: Path, with_patches: bool, **kw: Any) -> None:
    """Train ``name`` on the finished run's stores as the ``train`` rule hands them over (a network
    also gets the run's patch indexes)."""
    lay = Layout(cfg.workdir)
    if with_patches:
        kw["patches"] = {t: lay.patches(t) for t in cfg.tiles}
    gapfilled, labels = {t: lay.gapfilled(t) for t in cfg.tiles}, {t: lay.labels(t) for t in cfg.tiles}
    train(cfg, name, gapfilled, labels, lay.percentiles(), model_dir, **kw)


def seeded(cfg: Config, seed: int, **nets: Any) -> Config:
    data = copy.deepcopy(cfg.data)
    data["run"]["seed"] = int(seed)
    data["nets"] |= nets
    return Config(validate(data))


def run_network(
    cfg: Config, name: str, seed: int, out: Path, score: Scorer, epochs: int, steps: int, **nets: Any
) -> list[dict[str, Any]]:
    """Train (unless done), then score every epoch's weights; rows with cumulative steps and CPU time."""
    c = seeded(cfg, seed, epochs=epochs, steps_per_epoch=steps, keep_checkpoints=epochs, **nets)
    model_dir = out / f"{name}-s{seed}"
    ckdir = model_dir.with_name(f"{model_dir.name}.checkpoints")
    if not (model_dir / "model.json").exists():
        train_on_run(c, name, model_dir, with_patches=True, checkpoints=ckdir)
    meta = load_meta(model_dir)
    model = get(name).load(model_dir)
    rows, cpu, wall = [], 0.0, 0.0
    for h in meta["training"]["history"]:
        cpu += float(h.get("cpu_seconds") or 0.0)
        wall += float(h.get("seconds") or 0.0)
        blob = load_weights(ckdir / f"epoch_{h['epoch']:04d}.pt")
        model.net.load_state_dict(blob["state_dict"])
        kept = h["epoch"] == meta["training"]["kept_epoch"]
        row = {"model": name, "seed": seed, "epoch": h["epoch"], "steps": h["epoch"] * steps}
        rows.append(row | {"cpu_s": round(cpu, 1), "wall_s": round(wall, 1), "kept": kept})
        rows[-1] |= score(model, meta, model_dir)
        print(f"  {name} s{seed} epoch {h['epoch']}: kappa {rows[-1]['kappa']:.4f}", flush=True)
    if meta["training"].get("head_refit"):  # the model as kept: its last layer refitted
        model = get(name).load(model_dir)
        rows.append(rows[-1] | {"model": f"{name} refit", "kept": True} | score(model, meta, model_dir))
        rows[-1]["epoch"] = rows[-1]["steps"] = ""
        print(f"  {name} s{seed} refitted: kappa {rows[-1]['kappa']:.4f}", flush=True)
    return rows


def run_pixel(cfg: Config, name: str, seed: int, out: Path, score: Scorer, **kw: Any) -> dict[str, Any]:
    c = seeded(cfg, seed)
    model_dir = out / f"{name}-s{seed}"
    cpu = wall = 0.0
    if not (model_dir / "model.json").exists():
        t0, c0 = time.perf_counter(), time.process_time()
        train_on_run(c, name, model_dir, with_patches=False, **kw)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        (model_dir.with_name(f"{model_dir.name}.cpu")).write_text(f"{cpu:.1f} {wall:.1f}\n")
    else:
        cpu, wall = (float(v) for v in model_dir.with_name(f"{model_dir.name}.cpu").read_text().split())
    meta = load_meta(model_dir)
    row = {
        "model": name,
        "seed": seed,
        "epoch": "",
        "steps": "",
        "cpu_s": round(cpu, 1),
        "wall_s": round(wall, 1),
    }
    return row | {"kept": True} | score(get(name).load(model_dir), meta, model_dir)


def summarise(rows: list[dict[str, Any]], tolerance: float = 0.02) -> str:
    """Markdown: final (kept-epoch) scores mean +- std per model, and where each network first comes
    within ``tolerance`` kappa of RF (seed-mean curves)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["model"], []).append(r)
    lines = [
        "| model | seeds | kappa | mean F1 | F1 CUF | F1 DUF | F1 ICU | CPU-s to train |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ms(vals: list[Any]) -> str:
        v = np.array([x for x in vals if x is not None and x != ""], float)
        return "n/a" if not v.size else f"{v.mean():.3f} ± {v.std(ddof=1) if v.size > 1 else 0:.3f}"

    finals = {}
    for model, rs in by.items():
        kept = [r for r in rs if r["kept"]]
        finals[model] = kept
        cpu = [max(float(x["cpu_s"]) for x in rs if x["seed"] == s) for s in {r["seed"] for r in rs}]
        lines.append(
            f"| {model} | {len(kept)} | {ms([r['kappa'] for r in kept])} | {ms([r['mean_f1'] for r in kept])}"
            f" | {ms([r.get('f1_CUF') for r in kept])} | {ms([r.get('f1_DUF') for r in kept])}"
            f" | {ms([r.get('f1_ICU') for r in kept])} | {ms(cpu)} |"
        )
    if "rf" in finals:
        rf = float(np.mean([r["kappa"] for r in finals["rf"]]))
        lines.append("")
        for model, rs in by.items():
            if not any(r["epoch"] != "" for r in rs):
                continue
            curve = _mean_curve(rs, "kappa")
            hit = next((p for p in curve if p[2] >= rf - tolerance), None)
            last = curve[-1]
            lines.append(
                f"- {model}: mean kappa within {tolerance} of RF ({rf:.3f}) "
                + (f"at {hit[0]} steps / {hit[1]:.0f} CPU-s" if hit else
                   f"not reached in {last[0]} steps / {last[1]:.0f} CPU-s (last {last[2]:.3f})")
            )  # fmt: skip
    return "\n".join(lines)


def _mean_curve(rows: list[dict[str, Any]], key: str) -> list[tuple[int, float, float, float]]:
    """(steps, mean cumulative CPU-s, mean, std) over seeds, per epoch."""
    steps = sorted({int(r["steps"]) for r in rows if r["epoch"] != ""})
    out = []
    for s in steps:
        at = [r for r in rows if r["epoch"] != "" and int(r["steps"]) == s and r[key] is not None]
        v = np.array([r[key] for r in at], float)
        out.append((s, float(np.mean([float(r["cpu_s"]) for r in at])), float(v.mean()), float(v.std())))
    return out


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("kappa", "steps"), ("kappa", "cpu"), ("mean_f1", "steps"), ("urban", "steps")]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    for r in rows:
        u = [r.get(f"f1_{k}") for k in URBAN]
        r["urban"] = (
            float(np.mean([x for x in u if x is not None])) if any(x is not None for x in u) else None
        )
    models = list(dict.fromkeys(r["model"] for r in rows))
    colours = dict(zip(models, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, (key, x) in zip(axes.ravel(), panels, strict=True):
        for m in models:
            rs = [r for r in rows if r["model"] == m]
            if rs[0]["epoch"] == "":  # a reference line: mean +- std over seeds
                v = np.array([r[key] for r in rs if r[key] is not None], float)
                if v.size:
                    ax.axhline(v.mean(), color=colours[m], ls="--", label=f"{m} ({v.mean():.3f})")
                    ax.axhspan(v.mean() - v.std(), v.mean() + v.std(), color=colours[m], alpha=0.12)
                continue
            c = _mean_curve(rs, key)
            xs = [p[0] if x == "steps" else p[1] for p in c]
            mean, std = np.array([p[2] for p in c]), np.array([p[3] for p in c])
            ax.plot(xs, mean, "o-", color=colours[m], label=m)
            ax.fill_between(xs, mean - std, mean + std, color=colours[m], alpha=0.2)
        label = {"kappa": "kappa", "mean_f1": "mean F1", "urban": "mean F1 of CUF, DUF, ICU"}[key]
        ax.set(xlabel="training steps" if x == "steps" else "CPU-seconds (all threads)", ylabel=label,
               title=f"{label} on the validation polygons")  # fmt: skip
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def time_mapping(cfg: Config, out: Path, models: list[str], seed: int, repeats: int = 3) -> str:
    """Wall and CPU seconds per megapixel of the predict stage (``predict_tile``: read, classify,
    regularise, write the COGs) with each model of ``out`` for ``seed``, best of ``repeats``, tile 0."""
    import tempfile

    from pipeline.infer import predict_tile

    lay = Layout(cfg.workdir)
    tile = cfg.tiles[0]
    shape = open_store(lay.gapfilled(tile), "gapfilled")["reflectance"].shape
    mpx = shape[-2] * shape[-1] / 1e6
    lines = [f"| model | s/Mpx wall | CPU-s/Mpx | (tile {tile}, {mpx:.3f} Mpx, {cfg.threads()} threads) |"]
    lines.append("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            best = (float("inf"), float("inf"))
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                predict_tile(cfg, out / f"{name}-s{seed}", lay.gapfilled(tile), Path(tmp) / f"{name}.tif")
                best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
            lines.append(f"| {name} | {best[0] / mpx:.1f} | {best[1] / mpx:.1f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--workdir", type=Path, default=Path("results/demo"), help="a finished run (README's demo)"
    )
    ap.add_argument("--out", type=Path, default=Path("results/study"))
    ap.add_argument("--models", nargs="+", default=["fgunet", "unet3", "mlp3"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=50, help="steps per epoch (one scored point each)")
    ap.add_argument("--no-reference", action="store_true", help="skip RF and fgunet_rf")
    ap.add_argument("--finetune-from", type=Path, help="a first-year model folder: fine-tune it on --workdir")
    ap.add_argument("--label", default="", help="suffix of the model names in the CSV (e.g. ' y2')")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32", help="nets.precision")
    ap.add_argument("--weight-init", choices=["torch", "glorot", "he"], help="nets.weight_init")
    ap.add_argument("--unet-aux-loss", type=float, help="nets.unet_aux_loss (fgunet only)")
    ap.add_argument("--append", action="store_true", help="keep other models' rows of an earlier curves.csv")
    ap.add_argument("--time-mapping", action="store_true", help="only time the predict stage per model")
    args = ap.parse_args(argv)
    if args.time_mapping:
        cfg = load_config(args.workdir / "run-config.yaml")
        print(time_mapping(cfg, args.out, args.models, args.seeds[0]))
        return

    cfg = load_config(args.workdir / "run-config.yaml")
    args.out.mkdir(parents=True, exist_ok=True)
    score = Scorer(cfg)
    rows: list[dict[str, Any]] = []
    kept_rows: list[dict[str, Any]] = []
    if args.append and (args.out / "curves.csv").exists():
        with open(args.out / "curves.csv") as f:
            kept_rows = [_typed(r) for r in csv.DictReader(f)]
    for seed in args.seeds:
        for name in args.models:
            print(f"{name} seed {seed}", flush=True)
            init = {"weight_init": args.weight_init} if args.weight_init else {}
            if args.unet_aux_loss is not None and name == "fgunet":
                init["unet_aux_loss"] = args.unet_aux_loss
            curve = run_network(
                cfg, name, seed, args.out, score, args.epochs, args.steps, precision=args.precision, **init
            )
            rows += [r | {"model": r["model"] + args.label} for r in curve]
            if args.finetune_from:
                ft = run_network(
                    cfg, name, seed, args.out / "finetune", score, args.epochs, args.steps,
                    init_from=str(args.finetune_from.resolve()), precision=args.precision, **init,
                )  # fmt: skip
                rows += [r | {"model": f"{name} fine-tuned{args.label}"} for r in ft]
        if not args.no_reference:
            rows.append(run_pixel(cfg, "rf", seed, args.out, score) | {"model": "rf" + args.label})
            if "fgunet" in args.models:
                net = args.out / f"fgunet-s{seed}"
                rows.append(run_pixel(cfg, "fgunet_rf", seed, args.out, score, network=net)
                            | {"model": "fgunet_rf" + args.label})  # fmt: skip
        done = {(r["model"], int(r["seed"])) for r in rows}
        rows_all = [r for r in kept_rows if (r["model"], int(r["seed"])) not in done] + rows
        with open(args.out / "curves.csv", "w", newline="") as f:  # after each seed: partial results
            w = csv.DictWriter(f, FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows_all)
    plot(rows_all, args.out / "convergence.png", f"{cfg.workdir}: mean ± std over seeds")
    print(summarise(rows_all))


def _typed(r: dict[str, str]) -> dict[str, Any]:
    """A curves.csv row read back: numbers as numbers, empty scores as None."""
    out: dict[str, Any] = dict(r)
    out["seed"] = int(r["seed"])
    out["kept"] = r["kept"] == "True"
    out["epoch"] = int(r["epoch"]) if r["epoch"] else ""
    out["steps"] = int(r["steps"]) if r["steps"] else ""
    for k in ("cpu_s", "wall_s", "kappa", "oa", "mean_f1", "f1_CUF", "f1_DUF", "f1_ICU"):
        out[k] = float(r[k]) if r.get(k) not in (None, "") else None
    return out


if __name__ == "__main__":
    main()
