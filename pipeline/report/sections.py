"""The report's sections: what is shown, in which order, and the caption that says what to look for."""

from __future__ import annotations

import datetime as dt
import platform
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any

import numpy as np

from pipeline.config import Config
from pipeline.layout import Layout
from pipeline.metrics import differences
from pipeline.reference import split_counts
from pipeline.report import figures, tables
from pipeline.report import provenance as prov
from pipeline.report.collect import (
    OVERALL,
    NationalMosaic,
    RunDocs,
    TileRasters,
    has_scores,
    model_metas,
    optional_json,
    seed_statistics,
)
from pipeline.report.html import Section, facts, figure, note, para, pre
from pipeline.report.rasters import clear_summary, decimation, low_confidence_share

QA_REFERENCE = "RF references vs each other"


def _anchor(*parts: str) -> str:
    return "-".join(p.lower().replace(" ", "-") for p in parts)


def _kappa_by_tile(docs: RunDocs, models: Sequence[str]) -> dict[str, list[float | None]]:
    groups = [*docs.tiles, OVERALL]
    return {
        m: [(d["kappa"] if has_scores(d) else None) for d in (docs.tile_docs(g)[m] for g in groups)]
        for m in models
    }


def _f1(doc: Mapping[str, Any] | None, names: Sequence[str]) -> list[float | None]:
    if not has_scores(doc):
        return [None] * len(names)
    return [doc["per_class"][n]["f1"] for n in names]  # type: ignore[index]


def _confusion_ha(docs: RunDocs, rasters: Mapping[str, TileRasters], model: str) -> np.ndarray | None:
    """The run's confusion matrix of ``model`` in hectares: each tile's pixels times its map's pixel area."""
    total = None
    for t in docs.tiles:
        d = docs.metrics[model][t]
        if d is None:
            continue
        counts = rasters[t].areas.get(model)
        area = counts.pixel_area_m2 if counts else d["pixel_area_m2"]
        ha = np.asarray(d["confusion_pixels"], dtype=np.float64) * area / 1e4
        total = ha if total is None else total + ha
    return total


def thin_classes(docs: Mapping[str, Mapping[str, Any] | None], names: Sequence[str], least: int) -> list[str]:
    """The classes with fewer than ``least`` validation pixels in this scope (the same for every
    classifier: they share the validation polygons)."""
    doc = next((d for d in docs.values() if has_scores(d)), None)
    if doc is None:
        return []
    return [n for n in names if doc["per_class"][n]["support_pixels"] < least]


def scores_block(
    cfg: Config, docs: Mapping[str, Mapping[str, Any] | None], scope: str, ha: Mapping[str, np.ndarray | None]
) -> list[str]:
    """Per-class table, F-score bars and the confusion heatmaps of every classifier for one scope."""
    names = [c.name for c in cfg.classes]
    least = cfg["report"]["min_class_pixels"]
    out = [
        "<h4>Precision, recall and F-score per class</h4>",
        tables.per_class(docs, names, scope, least),
    ]
    if not any(has_scores(d) for d in docs.values()):
        return out + [
            note(f"{scope}: no validation data, so no per-class scores or confusion matrices.", True)
        ]
    if thin := thin_classes(docs, names, least):
        out.append(
            note(
                f"{tables.FEW} {scope}: {', '.join(thin)} have fewer than {least:,} validation pixels "
                "(report.min_class_pixels): their precision, recall and F-score rest on a few polygons "
                "and can swing widely with another split, so they cannot rank classifiers; more "
                "reference polygons of these classes (or the run-wide table) give firmer figures.",
                True,
            )
        )
    png = figures.grouped_bars(
        names,
        {m: _f1(d, names) for m, d in docs.items()},
        title=f"F-score per class, {scope}",
        ylabel="F-score",
        missing="n/a",
    )
    out.append(
        figure(
            png,
            "<b>F-score per class</b> (seed Fig. 7). Look at the weakest classes and where classifiers differ"
            " most: contextual networks usually gain on urban classes (texture), pixel classifiers on"
            " spectrally distinct natural classes. n/a: the class is neither in the validation data nor"
            " in the map.",
            f"F-score per class, {scope}",
        )
    )
    out.append("<h4>Confusion matrices</h4>")
    for m, d in docs.items():
        if not has_scores(d):
            out.append(note(f"{m}: {tables.status_marker(d)}, no confusion matrix.", True))
            continue
        cm = np.asarray(d["confusion_pixels"])  # type: ignore[index]
        cm_ha = ha.get(m)
        if cm_ha is None:
            cm_ha = cm * d["pixel_area_m2"] / 1e4  # type: ignore[index]
        png = figures.confusion_heatmaps(cm, cm_ha, names, f"{m}, {scope}")
        out.append(
            figure(
                png,
                f"<b>{escape(m)}</b>, {escape(scope)}. Rows: reference class of the validation pixels;"
                " columns: the class mapped there. Left: % of each reference row (rows sum to 100), the"
                " recall on the diagonal. Right: the same pixels in hectares (pixel area read from the"
                " map): how much land each confusion concerns. Look for large off-diagonal cells between"
                " classes that matter for the product.",
                f"confusion matrices of {m}, {scope}",
            )
        )
    return out


def reference_line(counts: Mapping[str, Any] | None) -> str:
    """What the split kept of the reference layer, what it left out and why, what it recoded."""
    if counts is None:
        return "not recorded (no split file, or one written by an older version)"
    out = [f"{counts['kept']:,} kept"]
    gone = [f"{n:,} of code {c} (reference.ignore_codes)" for c, n in counts.get("ignored", {}).items()]
    if counts.get("outside"):
        gone.append(f"{counts['outside']:,} outside every tile")
    if counts.get("eroded"):
        gone.append(f"{counts['eroded']:,} eroded away (reference.erosion_m)")
    if gone:
        out.append("left out: " + ", ".join(gone))
    if moved := counts.get("remapped"):
        out.append("recoded (reference.remap): " + ", ".join(f"{k} ({n:,})" for k, n in moved.items()))
    return "; ".join(out)


def run_summary(cfg: Config, docs: RunDocs, built: str) -> Section:
    sec = Section("summary", "Run summary")
    sec.add(
        facts(
            [
                ("run folder", str(cfg.workdir)),
                ("tiles", ", ".join(docs.tiles)),
                ("classifiers", ", ".join(docs.classifiers)),
                ("seeds", ", ".join(str(s) for s in [cfg.seed, *cfg.extra_seeds])),
                ("config digest", cfg.digest),
                ("reference polygons", reference_line(split_counts(Layout(cfg.workdir).split()))),
                ("report built", built),
            ]
        ),
        para(
            "Scores on the validation polygons only (never used for training), run-wide from the summed"
            " confusion matrices. A tile without validation polygons is marked <i>no validation data</i>;"
            " a file that is not there, <i>missing</i>."
        ),
        tables.summary(docs.tile_docs(OVERALL), docs.tiles, OVERALL),
    )
    groups = [*docs.tiles, OVERALL]
    png = figures.grouped_bars(
        groups,
        _kappa_by_tile(docs, docs.classifiers),
        title="Cohen's kappa per tile",
        ylabel="kappa",
        missing="no validation data",
    )
    sec.add(
        figure(
            png,
            "<b>Kappa per tile</b> (seed Figs. 6 and 9). Look for tiles where the ranking of the classifiers"
            " flips or a classifier drops: the class mix of a tile (urban, mountains) decides which"
            " approach wins. A tile without a bar says why.",
            "kappa per tile and classifier",
        )
    )
    return sec


def _tile_sums(cfg: Config, docs: RunDocs, rasters: Mapping[str, TileRasters]) -> dict[str, np.ndarray]:
    """Each classifier's class areas (ha) summed over its tile maps (overlaps counted per tile)."""
    areas = {}
    for m in docs.classifiers:
        per_tile = [r.areas[m].hectares(cfg.class_codes.tolist()) for r in rasters.values() if m in r.areas]
        if per_tile:
            areas[m] = np.sum(per_tile, axis=0)
    return areas


def national(
    cfg: Config, docs: RunDocs, rasters: Mapping[str, TileRasters], mosaics: Mapping[str, NationalMosaic]
) -> Section:
    """The national product: each classifier's mosaic and its class areas, every pixel once."""
    sec = Section("national", "National map")
    missing = [m for m in docs.classifiers if m not in mosaics]
    if not mosaics:
        sec.add(
            note("No national mosaic in this run yet (mosaic/<classifier>/): the rule `mosaic` makes it.")
        )
        return sec
    first = next(iter(mosaics.values())).summary
    reproj = first["reprojected"]
    sec.add(
        facts(
            [
                ("grid", f"{first['width']:,} x {first['height']:,} px of {first['transform'][0]:g} m"),
                ("CRS", first["crs"]),
                ("tiles", ", ".join(first["tiles"])),
                ("reprojected", ", ".join(reproj) + " (nearest neighbour)" if reproj else "none"),
                ("overlaps", first["arbitration"]),
            ]
        )
    )
    looks = {m: mz.look for m, mz in mosaics.items()}
    h, w = next(iter(looks.values())).shape
    f = max(1, round(first["width"] / max(w, 1)))
    sec.add(
        figure(
            figures.class_maps(looks, cfg.classes, "national mosaic"),
            f"<b>The national map</b> of each classifier (1 px = {f}×{f} mosaic pixels, from the COG"
            " overviews). Look for seams along tile edges: a class that changes at a straight line"
            " between two tiles points at a tile whose map or inputs differ (another date set, a"
            " failed job rerun with other settings).",
            "national mosaic",
        )
    )
    margins = {m: mz.margin_look for m, mz in mosaics.items() if mz.margin_look is not None}
    if margins:
        sec.add(
            figure(
                figures.confidence_maps(margins, "national uncertainty layer", "margin (%)"),
                "<b>Where each map hesitates</b>: the margin between the two most probable classes"
                " (<code>mosaic/&lt;classifier&gt;/margin.tif</code>, <code>inference.probabilities</code>;"
                " overview means, red = near a tie). Red areas are where a map's classes are least"
                " certain: where the next reference data pays most (<code>accuracy/suggest_&lt;classifier&gt;"
                ".gpkg</code> proposes points there).",
                "national uncertainty",
            )
        )
    names = [c.name for c in cfg.classes]
    codes = cfg.class_codes.tolist()
    areas = {m: (mosaics[m].hectares(codes) if m in mosaics else None) for m in docs.classifiers}
    sums = _tile_sums(cfg, docs, rasters)
    twice = {m: float(np.sum(sums[m]) - np.sum(a)) for m, a in areas.items() if a is not None and m in sums}
    extra = ""
    if twice:
        m, v = next(iter(twice.items()))
        extra = (
            f" Summed over the tile maps instead, {m} would map {v:,.1f} ha more (the tile overlaps"
            " counted once per tile, and each pixel at the grid's nominal area)."
        )
    sec.add(
        "<h4>Class areas, counted once</h4>",
        tables.class_areas(areas, names, "national", missing="no mosaic"),
        para(
            "From each classifier's national mosaic (<code>mosaic/&lt;classifier&gt;/areas.csv</code>):"
            " every pixel once, the overlap of neighbouring tiles going to the nearest tile centre, and"
            " each pixel at its true area on the ellipsoid (the CRS's areal scale), not the grid's"
            f" nominal one.{extra} These are pixel counts of the map: its errors are in them."
        ),
    )
    if missing:
        sec.add(note(f"No complete mosaic for {', '.join(missing)}.", True))
    vec = {m: mz.vector for m, mz in mosaics.items() if mz.vector}
    if vec:
        v = next(iter(vec.values()))
        counts = "; ".join(
            f"{m}: {len(x['parts'])} files, {sum(p['polygons'] for p in x['parts']):,} polygons"
            for m, x in vec.items()
        )
        part = "region" if cfg["inputs"]["regions"] else "block"
        sec.add(
            "<h4>Vector product</h4>",
            para(
                f"<code>vector/&lt;classifier&gt;/</code>, one GeoPackage per {part}"
                f" with its QGIS style ({escape(counts)}): the mosaic sieved to {v['mmu_ha']:g} ha"
                f" ({v['mmu_pixels']} px, GDAL's sieve), polygonised, simplified within {v['simplify_m']:g} m"
                " as one coverage (no gaps or overlaps), each polygon with its class, that class's share"
                " of its pixels before the sieve, its mean confidence and its area."
            ),
        )
    if cfg["inputs"]["regions"]:
        sec.children.append(_regions(cfg, mosaics))
    return sec


MAX_REGION_BARS = 30


def _regions(cfg: Config, mosaics: Mapping[str, NationalMosaic]) -> Section:
    """Per region: the mapped area, each classifier's largest class, confidence and few-clear share,
    and a chart of the class shares (the largest regions first)."""
    sec = Section("regions", "Regions")
    tables_ = {m: mz.regions for m, mz in mosaics.items() if mz.regions}
    if not tables_:
        sec.add(note("No regional statistics yet (mosaic/<classifier>/regions.csv, rule regions).", True))
        return sec
    models = list(tables_)
    names = [c.name for c in cfg.classes]
    by_region: dict[str, dict[str, list[dict[str, Any]]]] = {}
    labels: dict[str, str] = {}
    for m, rows in tables_.items():
        for r in rows:
            by_region.setdefault(r["region_id"], {}).setdefault(m, []).append(r)
            labels[r["region_id"]] = r["region_name"] if r["region_id"] else "outside every region"
    area = {
        rid: sum(r["area_ha"] for r in per[models[0]]) for rid, per in by_region.items() if models[0] in per
    }
    order = sorted(area, key=lambda rid: (rid == "", -area[rid]))
    few = cfg["mosaic"]["few_clear"]
    rows_html = []
    for rid in order:
        cells = [f"{labels[rid]} ({rid})" if rid else labels[rid], tables.hectares(area[rid])]
        for m in models:
            rs = by_region[rid].get(m, [])
            px = sum(r["pixels"] for r in rs)
            if not px:
                cells += [tables.DASH] * 3
                continue
            top = max(rs, key=lambda r: r["area_ha"])
            conf_n = [(r["mean_confidence"], r["pixels"]) for r in rs if r["mean_confidence"] is not None]
            conf = sum(c * n for c, n in conf_n) / max(1, sum(n for _, n in conf_n))
            few_share = sum((r["few_clear_share"] or 0) * r["pixels"] for r in rs) / px
            cells += [f"{top['class']} {100 * top['share']:.0f} %", f"{conf:.1f}", f"{100 * few_share:.1f} %"]
        rows_html.append(cells)
    sec.add(
        tables.regions(rows_html, models, few),
        para(
            f"From <code>mosaic/&lt;classifier&gt;/regions.csv</code> (per region and class) and"
            f" <code>regions.gpkg</code> (the regions with their figures, for QGIS); regions from"
            f" <code>{escape(str(cfg['inputs']['regions']))}</code>. A pixel belongs to the region that"
            " holds its centre; the regions' areas add up to the national table. A high share of pixels"
            f" seen clear fewer than {few} times marks a region whose map rests on little data."
        ),
    )
    shown = [rid for rid in order if rid][:MAX_REGION_BARS]
    if shown:
        shares = {}
        for m in models:
            mat = np.zeros((len(shown), len(names)))
            for i, rid in enumerate(shown):
                for r in by_region[rid].get(m, []):
                    mat[i, names.index(r["class"])] = r["share"]
            shares[m] = mat
        more = (
            f" (the {MAX_REGION_BARS} largest of {len(order)})"
            if len([o for o in order if o]) > MAX_REGION_BARS
            else ""
        )
        sec.add(
            figure(
                figures.region_shares(
                    [labels[r] for r in shown], shares, cfg.classes, "class shares per region"
                ),
                f"<b>Class shares per region</b>{more}, one panel per classifier. Regions whose mix"
                " differs between classifiers are where the choice of classifier changes the figures.",
                "class shares per region",
            )
        )
    return sec


def accuracy_sample(cfg: Config, lay: Layout) -> Section | None:
    """Design-based accuracy and areas from the stratified random sample (docs/validation.md);
    None when the run has no accuracy sample."""
    if not cfg["accuracy"]["enabled"]:
        return None
    sec = Section("accuracy-sample", "Accuracy and areas from the map sample (design-based)")
    design = optional_json(lay.accuracy("design"), "sampling design")
    est = optional_json(lay.accuracy("estimates"), "accuracy estimates")
    if design is None:
        return sec.add(note("No sampling design yet (accuracy/design.json, rule design).", True))
    strata = [s for s in design["strata"] if s["points"]]
    sec.add(
        para(
            f"A stratified random sample of {design['n']:,} pixels of <b>{escape(design['classifier'])}</b>'s"
            f" national map (the strata are its {len(strata)} classes; {design['n_formula']:,} points for"
            f" a standard error of overall accuracy of {design['target_se']}, at least"
            f" {design['min_per_class']} per class), labelled by interpreters"
            " (<code>accuracy/sample.gpkg</code>). Unlike the scores on the validation polygons above, these"
            " are <b>design-based</b> estimates for the whole map: the error matrix is weighted by each"
            " stratum's area (Olofsson et al. 2014; Stehman 2014 for the maps whose classes are not the"
            " strata), and each class's area comes with its 95 % confidence interval. The estimated areas"
            " rest on the sample and the strata, so they are the same whichever map is"
            " assessed; each map's pixel count is beside them."
        )
    )
    if est is None:
        return sec.add(
            note("No estimates yet: label accuracy/sample.gpkg and name it in inputs.labelled_sample.", True)
        )
    truth_doc = optional_json(lay.accuracy("truth"), "demo true areas")
    truth = (truth_doc or {}).get("area_ha")
    names = est["classes"]
    models = list(est["classifiers"])
    first = est["classifiers"][models[0]]["per_class"]

    def ci(e: Mapping[str, Any], digits: int = 1) -> str:
        if e["value"] is None:
            return tables.DASH
        if e["ci95"] is None:
            return f"{e['value']:.{digits}f} (no CI)"
        return f"{e['value']:.{digits}f} [{e['ci95'][0]:.{digits}f}, {e['ci95'][1]:.{digits}f}]"

    dropped = f", {est['dropped_unlabelled']} unlabelled points left out" if est["dropped_unlabelled"] else ""
    sec.add(
        para(f"{est['points']:,} labelled points{dropped}. Overall accuracy, 95 % CI:"),
        tables.table(
            ["classifier", "overall accuracy", "strata are its classes"],
            [
                [m, ci(r["overall_accuracy"], 3), "yes" if r["strata_are_map_classes"] else "no (Stehman)"]
                for m, r in est["classifiers"].items()
            ],
            kind="sample-accuracy",
        ),
    )
    outside = est.get("reference_outside_own_stratum") or {}
    head = [
        "class",
        "reference points",
        *(["of them outside its stratum"] if outside else []),
        *(f"{m} pixel count (ha)" for m in models),
        "estimated area (ha), 95 % CI",
    ]
    head += ["true area (ha)"] if truth else []
    rows = []
    for n in names:
        row = [n, str(first[n]["sample_reference"])]
        row += [str(outside[n])] if outside else []
        row += [f"{est['classifiers'][m]['per_class'][n]['mapped_area_ha']:.1f}" for m in models]
        row.append(ci(first[n]["area_ha"]))
        if truth:
            row.append(f"{truth[n]:.1f}")
        rows.append(row)
    sec.add(tables.table(head, rows, kind="sample-areas"))
    unseen = [n for n in names if outside and not outside[n] and (first[n]["area_ha"]["value"] or 0) > 0]
    if unseen:
        sec.add(
            note(
                f"No reference point outside its own stratum for {', '.join(unseen)}: the sample saw none"
                " of these classes' pixels mapped as another class. Such omission, if any, is not in their"
                " area intervals, which can then be too narrow (docs/validation.md, 'Monte Carlo"
                " coverage'); more points in the strata where such a class may hide narrow the doubt.",
                True,
            )
        )
    sec.add(
        figure(
            figures.area_estimates(
                names,
                {m: [est["classifiers"][m]["per_class"][n]["mapped_area_ha"] for n in names] for m in models},
                [first[n]["area_ha"]["value"] for n in names],
                [first[n]["area_ha"]["ci95"] for n in names],
                [truth[n] for n in names] if truth else None,
                title="Class areas: pixel count and sample estimate",
            ),
            "<b>Class areas</b>: each map's pixel count (bars) against the area estimated from the"
            " labelled sample with its 95 % confidence interval (black). A bar outside the whisker is a"
            " pixel count the map's own errors bias; publish the estimate and its interval."
            + (" Red: the demo's true area." if truth else ""),
            "class areas from the sample",
        )
    )
    acc_head = ["class", *(f"{m} {q}" for m in models for q in ("user's accuracy", "producer's accuracy"))]
    acc_rows = [
        [
            n,
            *(
                ci(est["classifiers"][m]["per_class"][n][q], 3)
                for m in models
                for q in ("users_accuracy", "producers_accuracy")
            ),
        ]
        for n in names
    ]
    sec.add(
        para("User's and producer's accuracy per class, 95 % CI:"),
        tables.table(acc_head, acc_rows, kind="sample-class-accuracy"),
    )
    thin = {m: r["thin_strata"] for m, r in est["classifiers"].items() if r["thin_strata"]}
    if thin:
        sec.add(note(f"Strata with fewer than 2 points (no variance from them): {thin}.", True))
    return sec


def differences_block(cfg: Config, docs: RunDocs) -> list[str]:
    """Each classifier against RF (of its seed), with the 95 % interval of the difference from the
    polygon bootstrap: which differences the validation polygons can tell apart from noise."""
    overall = {m: d for m, d in docs.tile_docs(OVERALL).items() if has_scores(d)}
    diffs = differences(cfg, overall)  # type: ignore[arg-type]
    if not diffs:
        return []
    names = [c.name for c in cfg.classes]
    n_boot = next(iter(diffs.values()))["replicates"]
    rows = ["kappa", *names]
    series = {
        f"{m} - {d['baseline']}": [(d["kappa"]["diff"], d["kappa"]["ci95"])]
        + [(d["f1"][n]["diff"], d["f1"][n]["ci95"]) for n in names]
        for m, d in diffs.items()
    }
    return [
        "<h4>Differences to RF the validation polygons can tell</h4>",
        para(
            "Each classifier's kappa and F-scores minus those of RF (the same seed's), with the 95 %"
            f" interval of the difference: {n_boot:,} stratified draws of the validation polygons, shared"
            " by the classifiers (<code>validation.bootstrap</code>). The pixels of one polygon are right or"
            " wrong together, so the intervals rest on the polygon counts, not on the pixels; a class with"
            " fewer than 10 validation polygons gets no interval. Marked: the interval excludes 0. A"
            " difference whose interval crosses 0 is not shown by this validation set, whatever its sign."
        ),
        tables.differences(diffs, names, OVERALL),
        figure(
            figures.differences(rows, series, title="Difference to RF, 95 % intervals", xlabel="difference"),
            "<b>Difference to RF</b>, kappa then F-score per class: dots right of the line are gains over"
            " RF, whiskers crossing it are not shown by the validation polygons; hollow dots: too few"
            " polygons for an interval.",
            "differences to RF",
        ),
    ]


def run_scores(
    cfg: Config, docs: RunDocs, rasters: Mapping[str, TileRasters], *, national: bool = False
) -> Section:
    sec = Section("all-tiles", "All tiles together")
    ha = {m: _confusion_ha(docs, rasters, m) for m in docs.classifiers}
    sec.add(*scores_block(cfg, docs.tile_docs(OVERALL), OVERALL, ha))
    sec.add(*differences_block(cfg, docs))
    names = [c.name for c in cfg.classes]
    areas = _tile_sums(cfg, docs, rasters)
    sec.add("<h4>Class areas</h4>")
    if national:
        sec.add(para("Counted once, from the national mosaic: see <a href='#national'>National map</a>."))
    elif areas:
        sec.add(
            tables.class_areas(areas, names, OVERALL),
            para(
                "Summed over the tiles (no national mosaic yet): land in the overlap of neighbouring"
                " tiles counts once per tile."
            ),
        )
    sec.add(
        "<h4>Low-confidence pixels</h4>", _confidence_table(cfg, rasters.values(), docs.classifiers, OVERALL)
    )
    sec.add("<h4>Clear observations</h4>", tables.clear({t: r.clear for t, r in rasters.items()}))
    return sec


def _confidence_table(cfg: Config, rasters: Iterable[TileRasters], models: Sequence[str], scope: str) -> str:
    threshold = cfg["report"]["low_confidence"]
    stats: dict[str, dict[str, Any] | None] = {}
    for m in models:
        counts = [r.confidence[m] for r in rasters if m in r.confidence]
        if counts:
            size = max(len(c) for c in counts)
            total = np.sum([np.pad(c, (0, size - len(c))) for c in counts], axis=0)
            stats[m] = low_confidence_share(total, threshold)
        else:
            stats[m] = None
    return tables.confidence(stats, threshold, scope) + para(
        f"Share of mapped pixels whose probability of the mapped class is below {threshold} % (RF: share of"
        " tree votes; networks: max softmax). High shares point at classes or places the classifier"
        " could not separate; compare classifiers, not absolute values (networks are often over-confident)."
    )


def geometric_qa(cfg: Config, docs: RunDocs) -> Section:
    sec = Section("geometric-qa", "Geometric QA: are sharp corners kept?")
    if cfg["qa"]["references"] < 1:
        return sec.add(note("The geometric QA is disabled in this run (qa.references = 0).", True))
    series: dict[str, list[float | None]] = {QA_REFERENCE: []}
    errors: dict[str, list[float | None]] = {QA_REFERENCE: []}
    for m in docs.classifiers:
        series[m], errors[m] = [], []
    for t in docs.tiles:
        q = docs.qa[t]
        rr = q["reference_vs_reference"] if q else {}
        series[QA_REFERENCE].append(rr.get("mean"))
        errors[QA_REFERENCE].append(rr.get("std"))
        for m in docs.classifiers:
            rec = (q or {}).get("models", {}).get(m, {})
            series[m].append(rec.get("mean"))
            errors[m].append(rec.get("std"))
    png = figures.grouped_bars(
        docs.tiles,
        series,
        errors=errors,
        colours={QA_REFERENCE: figures.REFERENCE_COLOUR},
        title="Reference corners matched, mean ± std",
        ylabel="matched reference corners",
        missing="no QA",
    )
    q = cfg["qa"]
    sec.add(
        figure(
            png,
            "<b>Corner matching</b> (seed Fig. 20): the share of a pixel-based reference map's sharp corners"
            f" that the evaluated map also has within {q['match_radius']} px, mean ± std over the"
            f" {q['references']} reference Random Forests (each trained without one fold of the training"
            " polygons). Grey: the references against each other, what pixel classifiers achieve. A"
            " classifier far below grey <b>rounds corners = lost geometry</b> even when its kappa is"
            " higher. Method and limits: docs/qa.md.",
            "geometric QA per tile",
        )
    )
    for t in docs.tiles:
        d = docs.qa[t]
        sec.add(f"<h4>{escape(t)}</h4>")
        sec.add(
            tables.qa(d, t) if d else note(f"{t}: no geometric QA file ({Layout(cfg.workdir).qa(t)}).", True)
        )
        for warning in (d or {}).get("warnings", []):
            sec.add(note(warning, True))
    return sec


def seeds(cfg: Config, docs: RunDocs) -> Section:
    """Kappa +- std over the run's seeds (only when run.seeds trained more than one model per classifier)."""
    sec = Section("seeds", "Variability over seeds")
    names = [c.name for c in cfg.classes]
    stats = {
        c: seed_statistics([docs.overall[name] for _, name in group], docs.tiles, names)
        for c, group in docs.seeds.items()
    }
    seed_lists = {c: [s for s, _ in group] for c, group in docs.seeds.items()}
    sec.add(
        para(
            "Every classifier was trained, mapped and validated once per seed of <code>run.seeds</code>"
            " (models <code>&lt;classifier&gt;-s&lt;seed&gt;</code>); the split of the reference polygons"
            " is the same for all. Mean ± sample standard deviation over the seeds."
        ),
        tables.seeds(stats, seed_lists),
        para("F-score per class, mean ± sample standard deviation over the seeds:"),
        tables.seed_f1(stats, names),
    )
    groups = [*docs.tiles, OVERALL]
    mean = {c: [s["tiles"][t]["mean"] for t in docs.tiles] + [s["kappa"]["mean"]] for c, s in stats.items()}
    std = {c: [s["tiles"][t]["std"] for t in docs.tiles] + [s["kappa"]["std"]] for c, s in stats.items()}
    sec.add(
        figure(
            figures.grouped_bars(
                groups,
                mean,
                errors=std,
                title="Kappa over seeds",
                ylabel="kappa",
                missing="no validation data",
            ),
            "<b>Kappa, mean ± std over the seeds</b>. A difference between classifiers smaller than the"
            " error bars is not a difference.",
            "kappa over seeds",
        ),
        figure(
            figures.grouped_bars(
                names,
                {c: [s["f1"][n]["mean"] for n in names] for c, s in stats.items()},
                errors={c: [s["f1"][n]["std"] for n in names] for c, s in stats.items()},
                title="F-score per class over seeds",
                ylabel="F-score",
            ),
            "<b>F-score per class, mean ± std over the seeds</b> (seed Fig. 7): minority classes vary most.",
            "F-score over seeds",
        ),
    )
    return sec


def training(cfg: Config, lay: Layout, docs: RunDocs) -> Section:
    """How each model was trained: a network's scores mean little without its steps, the epoch kept
    and whether its last layer is its own (the README demo's is refitted: docs/networks.md)."""
    sec = Section("training", "How each model was trained")
    names = [name for group in docs.seeds.values() for _, name in group]
    sec.add(
        para(
            "From each model's <code>model.json</code>. <i>kept</i>: the epoch scoring best on the"
            " model-selection polygons (held out of training, never the validation polygons);"
            " <i>last layer refitted</i>: <code>nets.head_refit</code>, a logistic regression on the"
            " network's features of RF's balanced pixel sample, not the paper's recipe; <i>time</i>:"
            " the training job's wall clock (sampling and fit for a forest)."
        ),
        tables.training(model_metas(lay, names)),
    )
    for name in names:
        curves = lay.model_dir(name) / "training.png"
        if curves.exists():
            sec.add(
                figure(
                    curves.read_bytes(),
                    f"<b>{escape(name)}</b>: training loss and model-selection scores per epoch.",
                    f"{name} training curves",
                )
            )
    return sec


def tile_section(cfg: Config, docs: RunDocs, r: TileRasters) -> Section:
    t = r.tile
    sec = Section(_anchor("tile", t), t)
    tile_docs = docs.tile_docs(t)
    if r.missing:
        sec.add(note("Missing files (their parts are left out): " + ", ".join(r.missing), True))
    sec.add(tables.summary(tile_docs, [], t))
    # confusion in hectares with the pixel area of the map itself
    ha = {
        m: np.asarray(d["confusion_pixels"]) * r.areas[m].pixel_area_m2 / 1e4
        for m, d in tile_docs.items()
        if d and m in r.areas
    }
    sec.add(*scores_block(cfg, tile_docs, t, ha))
    if docs.qa.get(t):
        sec.add("<h4>Geometric QA</h4>", tables.qa(docs.qa[t], t))  # type: ignore[arg-type]
    sec.add(*_maps_block(cfg, r))
    names = [c.name for c in cfg.classes]
    sec.add("<h4>Class areas</h4>")
    if r.areas:
        sec.add(
            tables.class_areas(
                {m: c.hectares(cfg.class_codes.tolist()) for m, c in r.areas.items()}, names, t
            )
        )
    sec.add("<h4>Low-confidence pixels</h4>", _confidence_table(cfg, [r], docs.classifiers, t))
    return sec


def _maps_block(cfg: Config, r: TileRasters) -> list[str]:
    t, out = r.tile, ["<h4>Maps</h4>"]
    if r.quicklooks:
        f = decimation(*r.shape) if r.shape else 1
        out.append(
            figure(
                figures.class_maps(r.quicklooks, cfg.classes, f"{t}: class maps"),
                f"<b>Quicklooks</b> (1 px = {f}×{f} map pixels, from the COG overviews; pixel"
                f" {r.pixel_size_m:g} m). Look for artefacts: stripes at window or tile edges,"
                " cloud-shaped patches, classes where they cannot be, and white no-data holes (never"
                " observed clear).",
                f"class maps of {t}",
            )
        )
    if r.confidence_looks:
        out.append(
            figure(
                figures.confidence_maps(r.confidence_looks, f"{t}: confidence"),
                "<b>Confidence</b> of the mapped class: red = the classifier hesitated, green = sure."
                " Hesitation belongs on class boundaries and mixed pixels; large red areas point at a"
                " class the classifier cannot separate, or at few clear observations.",
                f"confidence maps of {t}",
            )
        )
    else:
        out.append(note(f"{t}: no confidence layer.", True))
    if r.crops:
        size = cfg["report"]["crop_size"]
        places = [(f"row {c.row}, col {c.col}", c.maps) for c in r.crops]
        km = size * r.pixel_size_m / 1000
        share = ""
        if r.disagreement is not None:
            share = f" Classifiers disagree on {100 * r.disagreement:.1f} % of the mapped pixels (decimated)."
        out.append(
            figure(
                figures.crops(places, cfg.classes, f"{t}: where the classifiers disagree most"),
                f"<b>Full-resolution extracts</b> ({size}×{size} px, {km:.2g} km wide; seed Fig. 8), chosen"
                f" where the classifiers disagree most.{share} <b>Rounded corners = lost geometry</b>;"
                " thin features (roads, hedges, rivers) gone = over-smoothing; isolated pixels ="
                " salt-and-pepper noise of a pixel classifier.",
                f"extracts of {t}",
            )
        )
    out.append("<h4>Clear observations</h4>")
    if r.clear_counts is None or r.clear_look is None:
        out.append(note(f"{t}: no validity layer.", True))
    else:
        s = clear_summary(r.clear_counts)
        out.append(
            figure(
                figures.clear_observations(r.clear_look, r.clear_counts, f"{t}: clear observations"),
                f"<b>Clear observations per pixel</b> over the year (validity layer). Mean {s['mean']:.1f};"
                f" never clear: {100 * s['zero_share']:.2f} % of the pixels (red bar), no-data in every"
                " map. Where clear dates are few the gapfilled series is mostly interpolated and the maps"
                " are less reliable: compare with the confidence maps.",
                f"clear observations of {t}",
            )
        )
    return out


def provenance(cfg: Config, lay: Layout) -> Section:
    sec = Section("provenance", "Provenance")
    text = prov.config_text(cfg)
    software = Section("software", "Software and configuration")
    software.add(
        facts(
            [
                ("package", f"{prov.DISTRIBUTION} {prov.package_version()}"),
                ("git commit", prov.git_commit()),
                ("python", platform.python_version()),
                ("config sha256", prov.sha256(text)),
                ("config digest (outputs)", cfg.digest),
            ]
        ),
        para("The validated configuration, defaults filled in (the run's <code>run-config.yaml</code>):"),
        pre(text),
    )
    inputs = Section("inputs", "Input products")
    for t in cfg.tiles:
        info = prov.input_products(lay, t)
        inputs.add(f"<h4>{escape(t)}</h4>")
        if info is None:
            inputs.add(note(f"{t}: not available (the ingest store {lay.ingest(t)} is gone).", True))
            continue
        where = f" from <code>{escape(info['source'])}</code>" if info["source"] else ""
        inputs.add(
            para(f"{len(info['products'])} {escape(str(info['format']))} products{where}:"),
            tables.products(info),
        )
    times = Section("stage-times", "Time each stage took")
    jobs = prov.benchmarks(lay)
    if not jobs:
        times.add(
            note(
                "Not recorded: no Snakemake benchmark files under "
                f"{lay.benchmarks()} (a report built by hand outside Snakemake)."
            )
        )
    else:
        times.add(
            figure(
                figures.stage_times(prov.rule_totals(jobs), "Wall-clock time per rule"),
                "<b>Wall-clock time per rule</b>, summed over its jobs (Snakemake <code>benchmark:</code>"
                " files; jobs may have run in parallel, and a job not rerun keeps its last time).",
                "stage times",
            ),
            tables.jobs(jobs),
        )
    sec.children = [software, inputs, times]
    return sec


def built_at() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
