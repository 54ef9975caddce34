"""Where each stage's outputs live under ``run.workdir``: the single source for the CLI defaults and
the Snakemake rules (which import it), so paths are defined once.

    <workdir>/ingest/<tile>.zarr            ingest: raw L2A cube at 10 m + validity per date
    <workdir>/gapfilled/<tile>.zarr         gapfilled cube on the regular date grid + clear counts
    <workdir>/stats/<tile>.hist.npz         per-tile exact int16 histograms (mergeable)
    <workdir>/stats/percentiles.json        run-wide 3rd/97th percentiles per channel
    <workdir>/reference/split.gpkg          polygons with their tile and train/validation split
    <workdir>/reference/<tile>.zarr         rasterised train and validation labels
    <workdir>/patches/<tile>.<split>.npz    valid patch positions per class, train/validation (networks)
    <workdir>/models/<name>/model.*         trained classifier + model.json (schema, normalisation)
    <workdir>/models/<name>.checkpoints/    per-epoch network checkpoints (resume after a kill)
    <workdir>/maps/<name>/<tile>.tif        class map COG (uint8/uint16, colour table, nodata 0)
    <workdir>/maps/<name>/<tile>_confidence.tif  confidence COG (uint8 0-100, nodata 255)
    <workdir>/quality/<tile>_clear.tif      clear-observation count COG (validity layer)
    <workdir>/metrics/<name>/<tile>.json    confusion matrix and scores on validation polygons
    <workdir>/metrics/<name>/overall.json   same, whole run
    <workdir>/metrics/comparison.{csv,md}   every classifier's run-wide scores side by side
    <workdir>/maps/rfref<i>/<tile>.tif      geometric-QA reference RF maps (fold i left out)
    <workdir>/qa/<tile>.json                corner-matching geometric QA of a tile
    <workdir>/mosaic/<name>/classes.tif     national class map COG: every tile, overlaps counted once
    <workdir>/mosaic/<name>/confidence.tif  ... its confidence, and clear.tif its clear-observation count
    <workdir>/mosaic/<name>/areas.csv       class areas of the mosaic (true ellipsoidal ha) and shares
    <workdir>/mosaic/<name>/mosaic.json     its grid, tiles, arbitration rule and totals
    <workdir>/mosaic/<name>/regions.csv     per region and class: area, share, confidence, few-clear share
    <workdir>/mosaic/<name>/regions.gpkg    the regions with their figures (inputs.regions)
    <workdir>/vector/<name>/<part>.gpkg     OSO-style vector product, one per region (or block) + .qml
    <workdir>/vector/<name>/index.json      its parts and settings
    <workdir>/models/<name>-s<seed>/ ...    the same classifier trained with an extra seed (run.seeds):
                                            maps/, metrics/ alike, for the report's kappa +- std
    <workdir>/benchmarks/<rule>/<key>.tsv   Snakemake's time and memory of each job (key: wildcards)
    <workdir>/report/qa_report.html         the self-contained QA report of the run
    <workdir>/catalog/collection.json       STAC catalogue of the products (relative: copy the workdir)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SEED_MARK = "-s"  # <classifier>-s<seed>: a model of an extra seed (never a registry name: no "-" there)


@dataclass(frozen=True)
class Layout:
    workdir: Path

    def run_config(self) -> Path:
        """The latest run's validated config, for people and ``landcover`` by hand."""
        return self.workdir / "run-config.yaml"

    def frozen_config(self, digest: str) -> Path:
        """The config a run's jobs read, named by its digest (the ``config_digest`` of every output
        made with it): written once, never rewritten, so no job's settings change under it."""
        return self.workdir / "run-configs" / f"{digest}.yaml"

    def ingest(self, tile: str) -> Path:
        return self.workdir / "ingest" / f"{tile}.zarr"

    def gapfilled(self, tile: str) -> Path:
        return self.workdir / "gapfilled" / f"{tile}.zarr"

    def histogram(self, tile: str) -> Path:
        return self.workdir / "stats" / f"{tile}.hist.npz"

    def percentiles(self) -> Path:
        return self.workdir / "stats" / "percentiles.json"

    def split(self) -> Path:
        return self.workdir / "reference" / "split.gpkg"

    def labels(self, tile: str) -> Path:
        return self.workdir / "reference" / f"{tile}.zarr"

    @staticmethod
    def reference_model(fold: int) -> str:
        """Name of the geometric-QA reference RF trained without ``fold`` (maps/<name>/, models/<name>/)."""
        return f"rfref{fold}"

    def patches(self, tile: str, split: str = "train") -> Path:
        return self.workdir / "patches" / f"{tile}.{split}.npz"

    def model_dir(self, name: str) -> Path:
        return self.workdir / "models" / name

    def model_receipt(self, name: str) -> Path:
        """Written after ``models/<name>/`` is complete: the train rule's declared output. Snakemake
        deletes a rule's outputs before rerunning it and after it fails; were that the folder, a
        failed retrain would lose the last good model while its maps stay."""
        return self.workdir / "models" / f"{name}.trained.json"

    def model_meta(self, name: str) -> Path:
        return self.model_dir(name) / "model.json"

    def class_map(self, name: str, tile: str) -> Path:
        return self.workdir / "maps" / name / f"{tile}.tif"

    def checkpoints(self, name: str) -> Path:
        return self.workdir / "models" / f"{name}.checkpoints"

    def confidence(self, name: str, tile: str) -> Path:
        return self.workdir / "maps" / name / f"{tile}_confidence.tif"

    def probabilities(self, name: str, tile: str) -> Path:
        """Every class's probability (``inference.probabilities``), one band per class."""
        return self.workdir / "maps" / name / f"{tile}_probabilities.tif"

    def margin(self, name: str, tile: str) -> Path:
        """The uncertainty layer: margin of the two most probable classes (``inference.probabilities``)."""
        return self.workdir / "maps" / name / f"{tile}_margin.tif"

    def suggestions(self, name: str) -> Path:
        """Where to label next (``inference.probabilities``): the most uncertain places, spread."""
        return self.workdir / "accuracy" / f"suggest_{name}.gpkg"

    def validity(self, tile: str) -> Path:
        return self.workdir / "quality" / f"{tile}_clear.tif"

    def metrics(self, name: str, tile: str) -> Path:
        return self.workdir / "metrics" / name / f"{tile}.json"

    def overall_metrics(self, name: str) -> Path:
        return self.workdir / "metrics" / name / "overall.json"

    def comparison(self, suffix: str = "md") -> Path:
        return self.workdir / "metrics" / f"comparison.{suffix}"

    def qa(self, tile: str) -> Path:
        return self.workdir / "qa" / f"{tile}.json"

    def mosaic_dir(self, name: str) -> Path:
        return self.workdir / "mosaic" / name

    def vector_dir(self, name: str) -> Path:
        return self.workdir / "vector" / name

    def mosaic(self, name: str, layer: str = "classes") -> Path:
        """A national mosaic layer of ``name``: classes, confidence, clear, margin (COGs; margin with
        ``inference.probabilities``), areas (.csv), summary (mosaic.json), regions (.csv),
        regions_layer (.gpkg)."""
        files = {"classes": "classes.tif", "confidence": "confidence.tif", "clear": "clear.tif"}
        files |= {"margin": "margin.tif"}
        files |= {"areas": "areas.csv", "summary": "mosaic.json"}
        files |= {"regions": "regions.csv", "regions_layer": "regions.gpkg"}
        return self.mosaic_dir(name) / files[layer]

    @staticmethod
    def seed_model(model: str, seed: int) -> str:
        """Name of ``model`` trained with the extra seed ``seed`` (run.seeds): its own models/maps/metrics."""
        return f"{model}{SEED_MARK}{seed}"

    @staticmethod
    def split_seed_model(name: str) -> tuple[str, int | None]:
        """(classifier, seed) of a :meth:`seed_model` name; (name, None) for a run-seed model."""
        base, mark, seed = name.rpartition(SEED_MARK)
        return (base, int(seed)) if mark and base and seed.isdigit() else (name, None)

    def benchmarks(self) -> Path:
        return self.workdir / "benchmarks"

    def log(self, rule: str, key: str = "run") -> Path:
        """A job's log (its stderr; the stage's usage line ends it): named like its benchmark."""
        return self.workdir / "logs" / (f"{rule}.log" if key == "run" else f"{rule}_{key}.log")

    def benchmark(self, rule: str, key: str = "run") -> Path:
        """Snakemake ``benchmark:`` file of one job; ``key``: its wildcards ("run" for run-wide rules)."""
        return self.benchmarks() / rule / f"{key}.tsv"

    def accuracy(self, what: str) -> Path:
        """The run's accuracy sample (docs/validation.md): design (.json), points (.gpkg), points_csv,
        labelled (the demo interpreter's .gpkg), estimates (.json; .csv beside it), truth (the demo's
        true class areas)."""
        files = {"design": "design.json", "points": "sample.gpkg", "points_csv": "sample.csv"}
        files |= {
            "labelled": "sample_labelled.gpkg",
            "estimates": "estimates.json",
            "truth": "demo_truth.json",
        }
        return self.workdir / "accuracy" / files[what]

    def catalogue(self) -> Path:
        return self.workdir / "catalog" / "collection.json"

    def report(self) -> Path:
        return self.workdir / "report" / "qa_report.html"
