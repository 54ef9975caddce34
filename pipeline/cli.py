"""``landcover <stage>``: one subcommand per pipeline stage, each a thin shell over one function.

Snakemake rules only call these; the same command runs a stage by hand for debugging. Outputs
default to the run's :class:`~pipeline.layout.Layout` paths; rules pass them explicitly.
Bad input ends with one line ``error: <file>: <problem>`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.config import Config, load_config
from pipeline.errors import PipelineError
from pipeline.io.atomic import check_workdir
from pipeline.layout import Layout
from pipeline.usage import usage_now

log = logging.getLogger("pipeline")


def _demo(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.demo import generate

    generate(cfg)


#: GDAL's block cache for ingest, in MB. Ingest keeps every product file open for the stage
#: (``kept_open``), so GDAL's default cache (5 % of the node's RAM: 6 GB on a 120 GB node) fills with
#: blocks never read again: +1 GB of RSS for a 2048 px tile here, ~6 GB on such a node, past the
#: job's 8 GB request. 256 MB ran as fast (docs/benchmarks/national_cost.md). Set before the
#: process reads its first block, which is when GDAL reads it; a user's own GDAL_CACHEMAX wins.
INGEST_GDAL_CACHE_MB = 256


def _ingest(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.ingest import ingest_tile

    os.environ.setdefault("GDAL_CACHEMAX", str(INGEST_GDAL_CACHE_MB))
    spec = _tile_spec(cfg, args.tile)
    out = args.out or Layout(cfg.workdir).ingest(args.tile)
    ingest_tile(
        Path(spec["path"]), spec["format"], args.tile, out, threads=cfg.threads(), dask=cfg.get("dask")
    )


def _import(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.ingest import import_cube

    spec = _tile_spec(cfg, args.tile)
    if spec["format"] != "cube":
        raise PipelineError(
            None, f"tile {args.tile} is {spec['format']} products, not a cube: landcover ingest reads it"
        )
    out = args.out or Layout(cfg.workdir).ingest(args.tile)
    import_cube(
        Path(spec["path"]), args.tile, out, spec.get("cube"), threads=cfg.threads(), dask=cfg.get("dask")
    )


def _gapfill(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.gapfill import gapfill_tile

    lay = Layout(cfg.workdir)
    gapfill_tile(
        args.src or lay.ingest(args.tile),
        args.out or lay.gapfilled(args.tile),
        cfg.date_grid,
        threads=cfg.threads(),
        dask=cfg.get("dask"),
        histogram=args.histogram or lay.histogram(args.tile),
    )


def _histogram(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.stats import tile_histogram

    lay = Layout(cfg.workdir)
    tile_histogram(
        args.src or lay.gapfilled(args.tile),
        args.out or lay.histogram(args.tile),
        threads=cfg.threads(),
        dask=cfg.get("dask"),
    )


def _percentiles(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.stats import merge_percentiles

    lay = Layout(cfg.workdir)
    hists = args.hists or [lay.histogram(t) for t in cfg.tiles]
    norm = cfg["normalisation"]
    merge_percentiles(hists, norm["low_percentile"], norm["high_percentile"], args.out or lay.percentiles())


def _split(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.reference import split_polygons

    lay = Layout(cfg.workdir)
    grids = {t: lay.ingest(t) for t in cfg.tiles}
    split_polygons(cfg, grids, args.out or lay.split())


def _rasterise(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.reference import rasterise_tile

    lay = Layout(cfg.workdir)
    rasterise_tile(
        args.split or lay.split(),
        args.tile,
        args.grid or lay.ingest(args.tile),
        args.out or lay.labels(args.tile),
        dtype=cfg.map_dtype,
    )


def _patches(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.nets.patches import index_patches

    lay = Layout(cfg.workdir)
    index_patches(cfg, args.tile, args.labels or lay.labels(args.tile), args.out or lay.patches(args.tile))


def _train(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.train import train, write_receipt

    lay = Layout(cfg.workdir)
    model, seed = _model_seed(cfg, args)
    name = model
    if seed != cfg.seed:
        # an extra seed of run.seeds: same labels and split, all of the model's randomness from the seed
        cfg, name = cfg.with_seed(seed), lay.seed_model(model, seed)
    out = args.out or lay.model_dir(name)
    common = {
        "gapfilled": {t: lay.gapfilled(t) for t in cfg.tiles},
        "labels": {t: lay.labels(t) for t in cfg.tiles},
        "percentiles": lay.percentiles(),
        "out_dir": out,
    }
    # each family refuses what does not apply to it (--fold: pixel models; --checkpoints: networks;
    # --network: hybrids)
    train(cfg, model, **common, fold=args.fold, checkpoints=args.checkpoints, network=args.network)
    if args.receipt and _main_process():  # a network trained by N processes: process 0 wrote it
        write_receipt(out, args.receipt)


def _main_process() -> bool:
    from pipeline.nets.distributed import world_from_env

    return world_from_env().is_main


def _model_seed(cfg: Config, args: argparse.Namespace) -> tuple[str, int]:
    """(classifier, seed) of ``train``: ``--model rf-s7`` (an extra seed's model, as Snakemake names
    it) means ``--model rf --seed 7``; without either, the run seed."""
    model, named = Layout.split_seed_model(args.model)
    if named is not None and args.seed is not None and named != args.seed:
        raise PipelineError(None, f"--model {args.model} names seed {named}, --seed says {args.seed}")
    seed = args.seed if args.seed is not None else named
    return model, cfg.seed if seed is None else seed


def _predict(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.infer import predict_tile

    lay = Layout(cfg.workdir)
    predict_tile(
        cfg,
        args.model_dir or lay.model_dir(args.model),
        args.src or lay.gapfilled(args.tile),
        args.out or lay.class_map(args.model, args.tile),
        confidence=args.confidence or lay.confidence(args.model, args.tile),
        probabilities=args.probabilities,
        margin_layer=args.margin,
    )


def _validity(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.io.cog import write_validity

    lay = Layout(cfg.workdir)
    write_validity(args.src or lay.gapfilled(args.tile), args.out or lay.validity(args.tile))


def _mosaic(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.mosaic import TileLayers, mosaic_classifier

    lay = Layout(cfg.workdir)
    m = args.model
    # the classifiers' maps carry the uncertainty layer with inference.probabilities (rule predict_uncertain)
    margins = bool(cfg["inference"]["probabilities"]) and m in cfg["classifiers"]
    tiles = [
        TileLayers(
            t,
            lay.class_map(m, t),
            lay.confidence(m, t),
            lay.validity(t),
            lay.margin(m, t) if margins else None,
        )
        for t in cfg.tiles
    ]
    mosaic_classifier(cfg, m, tiles, args.out or lay.mosaic_dir(m))


def _design(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.sampledesign import design_on, design_sample

    lay = Layout(cfg.workdir)
    mosaic = args.mosaic or lay.mosaic(design_on(cfg), "classes")
    design_sample(cfg, mosaic, lay.accuracy("points"), lay.accuracy("points_csv"), lay.accuracy("design"))


def _interpret(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.sampledesign import design_on, interpret_demo

    lay = Layout(cfg.workdir)
    mosaic = lay.mosaic(design_on(cfg), "classes")
    interpret_demo(
        cfg, lay.accuracy("points"), args.out or lay.accuracy("labelled"), lay.accuracy("truth"), mosaic
    )


def labelled_sample(cfg: Config) -> Path:
    """The interpreters' labelled sample (``inputs.labelled_sample``), else the demo interpreter's."""
    given = cfg["inputs"].get("labelled_sample")
    return Path(given) if given else Layout(cfg.workdir).accuracy("labelled")


def _estimate(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.sampledesign import estimate_stage

    lay = Layout(cfg.workdir)
    mosaics = {m: lay.mosaic(m, "classes") for m in cfg["classifiers"]}
    estimate_stage(
        cfg,
        lay.accuracy("design"),
        lay.accuracy("points_csv"),
        args.sample or labelled_sample(cfg),
        mosaics,
        args.out or lay.accuracy("estimates"),
    )


def _suggest(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.sampledesign import suggest_stage

    lay = Layout(cfg.workdir)
    m = args.model
    layers = [(t, lay.class_map(m, t), lay.margin(m, t)) for t in cfg.tiles]
    suggest_stage(cfg, m, layers, args.out or lay.suggestions(m))


def _regions(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.regions import regions_stage

    lay = Layout(cfg.workdir)
    out = args.out or lay.mosaic_dir(args.model)
    regions_stage(cfg, lay.mosaic_dir(args.model), out / "regions.csv", out / "regions.gpkg")


def _vector(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.vector import vector_product

    lay = Layout(cfg.workdir)
    vector_product(cfg, lay.mosaic_dir(args.model), args.out or lay.vector_dir(args.model))


def _catalogue(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.catalogue import build_catalogue

    lay = Layout(cfg.workdir)
    build_catalogue(cfg, args.out or lay.catalogue().parent)


def _validate(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.metrics import validate_tile

    lay = Layout(cfg.workdir)
    validate_tile(
        cfg,
        args.map or lay.class_map(args.model, args.tile),
        args.labels or lay.labels(args.tile),
        args.out or lay.metrics(args.model, args.tile),
    )


def _summarise(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.metrics import summarise

    lay = Layout(cfg.workdir)
    tiles = args.tile_metrics or [lay.metrics(args.model, t) for t in cfg.tiles]
    summarise(cfg, tiles, args.out or lay.overall_metrics(args.model), model=args.model)


def _qa(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.qa import tile_qa

    lay = Layout(cfg.workdir)
    q = cfg["qa"]
    if q["references"] < 1:
        raise PipelineError(None, "qa.references is 0: the geometric QA is disabled")
    maps = {m: lay.class_map(m, args.tile) for m in cfg["classifiers"]}
    refs = args.references or [
        lay.class_map(lay.reference_model(i), args.tile) for i in range(q["references"])
    ]
    tile_qa(
        maps,
        refs,
        args.out or lay.qa(args.tile),
        distance=q["corner_distance"],
        max_angle=q["corner_angle"],
        radius=q["match_radius"],
        min_angle=q["corner_min_angle"],
        min_length=q["corner_min_length"],
        max_standard_error=q["max_standard_error"],
        codes=cfg.class_codes.tolist(),
        threads=cfg.threads(),
        tile=args.tile,
        config_digest=cfg.digest,
    )


def _compare(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.metrics import compare

    lay = Layout(cfg.workdir)
    overall = args.overall or [lay.overall_metrics(m) for m in cfg["classifiers"]]
    compare(cfg, overall, args.out or lay.comparison("md"))


def _report(cfg: Config, args: argparse.Namespace) -> None:
    from pipeline.report import build_report

    build_report(cfg, args.out or Layout(cfg.workdir).report())


def _tile_spec(cfg: Config, tile: str) -> dict:
    try:
        return cfg["inputs"]["tiles"][tile]
    except KeyError:
        raise PipelineError(None, f"tile {tile} is not listed in the config's inputs.tiles") from None


Stage = Callable[[Config, argparse.Namespace], None]


def _parser() -> tuple[argparse.ArgumentParser, dict[str, Stage]]:
    parser = argparse.ArgumentParser(prog="landcover", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--config", "-c", type=Path, dest="run_config", help="run config (YAML), before or after STAGE"
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    stages: dict[str, Stage] = {}

    def add(
        name: str, fn: Stage, help: str, tile: bool = False, model: bool = False
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--config", "-c", type=Path, help="run config (YAML; default config.yaml)")
        if tile:
            p.add_argument("--tile", required=True, help="tile name, e.g. T31TCJ")
        if model:
            p.add_argument("--model", default="rf", help="classifier name from the registry")
        p.add_argument("--out", type=Path, help="output path (default: the run layout)")
        stages[name] = fn
        return p

    add("demo", _demo, "write the synthetic demo country (L2A products + reference polygons)")
    add("ingest", _ingest, "L2A products of one tile -> 10 m cube + validity in a zarr store", tile=True)
    add("import", _import, "a netCDF/zarr datacube of one tile -> the same zarr store as ingest", tile=True)
    p = add("gapfill", _gapfill, "gapfill and resample one tile to the regular date grid", tile=True)
    p.add_argument("--src", type=Path)
    p.add_argument(
        "--histogram",
        type=Path,
        help="where its exact per-channel histograms go, counted in the same pass (default: the run layout)",
    )
    add(
        "histogram", _histogram, "exact per-channel int16 histograms of a finished gapfilled store", tile=True
    ).add_argument("--src", type=Path)
    add("percentiles", _percentiles, "merge tile histograms into run-wide percentiles").add_argument(
        "hists", nargs="*", type=Path
    )
    add("split", _split, "assign reference polygons to tiles and to train/validation")
    p = add("rasterise", _rasterise, "rasterise one tile's train/validation labels", tile=True)
    p.add_argument("--split", type=Path)
    p.add_argument("--grid", type=Path, help="ingest store giving the tile grid")
    add(
        "patches", _patches, "training and model-selection patch positions of one tile (networks)", tile=True
    ).add_argument("--labels", type=Path, help="the tile's label store")
    p = add("train", _train, "train a classifier on all tiles", model=True)
    p.add_argument("--checkpoints", type=Path, help="network checkpoint folder (default: <out>.checkpoints)")
    p.add_argument(
        "--receipt", type=Path, help="written once the model folder is in place (the Snakemake output)"
    )
    p.add_argument(
        "--network", type=Path, help="a hybrid's trained network folder (default: models/<network> by --out)"
    )
    p.add_argument(
        "--fold", type=int, help="leave out this fold of training polygons (geometric-QA reference RFs)"
    )
    p.add_argument(
        "--seed",
        type=int,
        help="train with this seed instead of run.seed (run.seeds; default out: models/<model>-s<seed>;"
        " --model rf-s7 is the same as --model rf --seed 7)",
    )
    p = add("predict", _predict, "map one tile with a trained classifier", tile=True, model=True)
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--src", type=Path)
    p.add_argument("--confidence", type=Path, help="confidence COG (default: the run layout)")
    p.add_argument("--probabilities", type=Path, help="also every class's probability (one band per class)")
    p.add_argument("--margin", type=Path, help="also the top-two margin (the uncertainty layer)")
    add("validity", _validity, "clear-observation count of one tile as a COG", tile=True).add_argument(
        "--src", type=Path
    )
    add(
        "mosaic",
        _mosaic,
        "the national mosaic of one classifier: class map, confidence and validity COGs + class areas",
        model=True,
    )
    add("regions", _regions, "per-region class areas and confidence of one classifier's mosaic", model=True)
    add("vector", _vector, "the OSO-style vector product of one classifier's mosaic", model=True)
    add(
        "design", _design, "the stratified random sample of the national map for accuracy and areas"
    ).add_argument("--mosaic", type=Path, help="class mosaic to design on (default: accuracy.design_on's)")
    add("interpret", _interpret, "the demo's interpreter: label the accuracy sample from the demo's truth")
    add(
        "estimate",
        _estimate,
        "accuracy and areas with 95-percent confidence intervals, from the labelled sample",
    ).add_argument(
        "--sample", type=Path, help="labelled sample (default: inputs.labelled_sample, else the demo's)"
    )
    add(
        "suggest",
        _suggest,
        "where to label next: the most uncertain places of one classifier's maps",
        model=True,
    )
    add("catalogue", _catalogue, "the STAC catalogue of the run's products (--out: its folder)")
    p = add("validate", _validate, "confusion matrix and scores of one tile's map", tile=True, model=True)
    p.add_argument("--map", type=Path)
    p.add_argument("--labels", type=Path)
    add("summarise", _summarise, "merge tile metrics into run-wide metrics", model=True).add_argument(
        "tile_metrics", nargs="*", type=Path
    )
    add(
        "qa", _qa, "corner-matching geometric QA of one tile's maps against the reference RFs", tile=True
    ).add_argument("--references", nargs="*", type=Path, help="reference maps (default: the run's rfref<i>)")
    add("report", _report, "the run's self-contained HTML QA report (docs/report.md)")
    add("compare", _compare, "every classifier's run-wide scores side by side (.md + .csv)").add_argument(
        "overall", nargs="*", type=Path, help="overall.json of each classifier"
    )
    return parser, stages


# what the file system says (full, read-only, not ours, a file where a folder should be): one line
OS_FAULTS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.ENOENT,
    errno.EISDIR,
}


def main(argv: list[str] | None = None) -> int:
    parser, stages = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    t0 = time.perf_counter()
    try:
        cfg = load_config(args.config or args.run_config or Path("config.yaml"))
        check_workdir(cfg.workdir)
        stages[args.stage](cfg, args)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # outside the writers (which name their file): a folder, a log, a lock
        if exc.errno not in OS_FAULTS:
            raise
        print(f"error: {exc.filename or Path.cwd()}: {exc.strerror}", file=sys.stderr)
        return 2
    log.info(usage_now(args.stage, time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
