"""Everything the report shows, gathered from a run's outputs before any HTML is written.

Missing pieces are recorded, not fatal: a report built by hand on a partial run says which file is
missing where its section would be (a QA json, a confidence layer, a map). Inconsistent inputs are
fatal, with a one-line :class:`PipelineError`: metrics of another nomenclature, or a map whose grid
or CRS differs from the tile's validity layer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.layout import Layout
from pipeline.metrics import NO_VALIDATION, UNMAPPED, read_metrics
from pipeline.qa import check_grids, mean_std
from pipeline.report.rasters import (
    Counts,
    clear_summary,
    decimation,
    disagreement_places,
    quicklook,
    read_crop,
    value_counts,
)

OVERALL = "all tiles"


def has_scores(doc: Mapping[str, Any] | None) -> bool:
    """A metrics document with mapped validation pixels (not missing, not "no validation data", not
    every validation pixel unmapped)."""
    return (
        doc is not None
        and doc.get("status") not in (NO_VALIDATION, UNMAPPED)
        and doc.get("kappa") is not None
    )


@dataclass
class Crop:
    row: int
    col: int
    maps: dict[str, np.ndarray]


@dataclass
class TileRasters:
    """One tile's raster-derived figures (bounded: decimated pictures, counts, small crops)."""

    tile: str
    shape: tuple[int, int] | None = None  # full-resolution (height, width)
    missing: list[str] = field(default_factory=list)  # files that were not there
    areas: dict[str, Counts] = field(default_factory=dict)  # model -> class-map value counts
    confidence: dict[str, np.ndarray] = field(default_factory=dict)  # model -> confidence value counts
    quicklooks: dict[str, np.ndarray] = field(default_factory=dict)
    confidence_looks: dict[str, np.ndarray] = field(default_factory=dict)
    clear_counts: np.ndarray | None = None
    clear_look: np.ndarray | None = None
    disagreement: float | None = None  # share of mapped pixels where classifiers disagree (decimated)
    crops: list[Crop] = field(default_factory=list)

    @property
    def clear(self) -> dict[str, Any] | None:
        return None if self.clear_counts is None else clear_summary(self.clear_counts)

    @property
    def pixel_size_m(self) -> float:
        """Side of a map pixel (m), from the first map's own transform."""
        return next(iter(self.areas.values())).pixel_area_m2 ** 0.5 if self.areas else float("nan")


def tile_rasters(cfg: Config, lay: Layout, tile: str, models: Sequence[str]) -> TileRasters:
    """Counts, quicklooks and disagreement crops of one tile's maps, confidence and validity layers."""
    rep = cfg["report"]
    out = TileRasters(tile)
    maps = {m: lay.class_map(m, tile) for m in models}
    confs = {m: lay.confidence(m, tile) for m in models}
    validity = lay.validity(tile)
    present = [p for p in (validity, *maps.values(), *confs.values()) if p.exists()]
    out.missing = [str(p) for p in (validity, *maps.values(), *confs.values()) if not p.exists()]
    if present:
        # one grid for the tile: a map on another grid/CRS than the validity layer is refused here
        out.shape = check_grids(present)
    if validity.exists():
        out.clear_counts = value_counts(validity).counts
        out.clear_look = quicklook(validity)
    for m, path in maps.items():
        if path.exists():
            out.areas[m] = value_counts(path)
            out.quicklooks[m] = quicklook(path)
    for m, path in confs.items():
        if path.exists():
            out.confidence[m] = value_counts(path).counts
            out.confidence_looks[m] = quicklook(path)
    if out.quicklooks and out.shape and rep["crops"]:
        looks = list(out.quicklooks.values())
        places, out.disagreement = disagreement_places(
            looks, decimation(*out.shape), out.shape, rep["crop_size"], rep["crops"]
        )
        for r, c in places:
            out.crops.append(
                Crop(r, c, {m: read_crop(maps[m], r, c, rep["crop_size"]) for m in out.quicklooks})
            )
    return out


def optional_json(path: Path, what: str) -> dict[str, Any] | None:
    """A JSON output, None when it is not there yet; an unreadable one is an error naming it."""
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(path, f"cannot read {what} ({exc})") from exc


@dataclass
class RunDocs:
    """The run's JSON outputs: metrics per model and tile, run-wide metrics, QA per tile.

    ``None`` marks a missing file; a tile without validation polygons has a document whose status is
    "no validation data" (see :func:`has_scores`).
    """

    classifiers: list[str]
    tiles: list[str]
    metrics: dict[str, dict[str, dict[str, Any] | None]]
    overall: dict[str, dict[str, Any] | None]
    qa: dict[str, dict[str, Any] | None]
    seeds: dict[str, list[tuple[int, str]]]  # classifier -> [(seed, model name)], run seed first

    def tile_docs(self, tile: str) -> dict[str, dict[str, Any] | None]:
        """Classifier -> that tile's metrics (``OVERALL``: the run-wide ones)."""
        docs = self.overall if tile == OVERALL else {m: self.metrics[m][tile] for m in self.classifiers}
        return {m: docs[m] for m in self.classifiers}  # the extra seeds' models only in the seed section


def seed_models(cfg: Config) -> dict[str, list[tuple[int, str]]]:
    """Each classifier's models over ``run.seeds``: the run seed's (plain name) then one per extra seed."""
    return {
        c: [(cfg.seed, c)] + [(s, Layout.seed_model(c, s)) for s in cfg.extra_seeds]
        for c in cfg["classifiers"]
    }


def load_docs(cfg: Config, lay: Layout) -> RunDocs:
    classifiers, tiles = list(cfg["classifiers"]), cfg.tiles
    seeds = seed_models(cfg)
    every = [name for group in seeds.values() for _, name in group]

    def metrics(path: Path, scope: str) -> dict[str, Any] | None:
        return read_metrics(cfg, path, scope) if path.exists() else None

    return RunDocs(
        classifiers=classifiers,
        tiles=tiles,
        metrics={m: {t: metrics(lay.metrics(m, t), "tile") for t in tiles} for m in every},
        overall={m: metrics(lay.overall_metrics(m), "run") for m in every},
        qa={t: optional_json(lay.qa(t), "geometric QA") for t in tiles},
        seeds=seeds,
    )


def model_metas(lay: Layout, names: Sequence[str]) -> dict[str, dict[str, Any] | None]:
    """Each model's ``model.json`` (None when the model is not trained yet)."""
    return {n: optional_json(lay.model_meta(n), f"model {n}'s metadata") for n in names}


@dataclass
class NationalMosaic:
    """One classifier's national mosaic: its class areas (counted once), summary and a quicklook."""

    model: str
    areas: list[dict[str, Any]]
    summary: dict[str, Any]
    look: np.ndarray
    pixel_size_m: float
    regions: list[dict[str, Any]] | None = None  # rows of regions.csv (inputs.regions)
    vector: dict[str, Any] | None = None  # vector/<model>/index.json
    margin_look: np.ndarray | None = None  # quicklook of margin.tif (inference.probabilities)

    def hectares(self, codes: Sequence[int]) -> np.ndarray:
        by_code = {r["code"]: r["area_ha"] for r in self.areas}
        return np.array([by_code.get(c, 0.0) for c in codes])


def load_mosaics(lay: Layout, models: Sequence[str]) -> dict[str, NationalMosaic]:
    """The classifiers whose mosaic is complete (its summary is written last)."""
    from pipeline.mosaic import read_areas
    from pipeline.regions import read_rows

    out = {}
    for m in models:
        summary = optional_json(lay.mosaic(m, "summary"), "mosaic summary")
        if summary is None or not lay.mosaic(m, "areas").exists() or not lay.mosaic(m).exists():
            continue
        regions = lay.mosaic(m, "regions")
        out[m] = NationalMosaic(
            m,
            read_areas(lay.mosaic(m, "areas")),
            summary,
            quicklook(lay.mosaic(m)),
            summary["transform"][0],
            read_rows(regions) if regions.exists() else None,
            optional_json(lay.vector_dir(m) / "index.json", "vector product index"),
            quicklook(lay.mosaic(m, "margin")) if summary.get("margin") else None,
        )
    return out


def seed_statistics(
    docs: Sequence[dict[str, Any] | None], tiles: Sequence[str], names: Sequence[str]
) -> dict[str, Any]:
    """Kappa (run and per tile) and per-class F-score over the models of one classifier's seeds:
    each a :func:`pipeline.qa.mean_std` record (mean, sample std, n, values; None values skipped)."""
    scored = [d if has_scores(d) else None for d in docs]
    return {
        "kappa": mean_std([d and d["kappa"] for d in scored]),
        "oa": mean_std([d and d["oa"] for d in scored]),
        "tiles": {
            t: mean_std([d and d.get("tiles", {}).get(t, {}).get("kappa") for d in scored]) for t in tiles
        },
        "f1": {n: mean_std([d and d["per_class"][n]["f1"] for d in scored]) for n in names},
    }
