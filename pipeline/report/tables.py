"""The report's tables as HTML fragments, classifiers always side by side.

Every table carries ``data-kind`` (and ``data-scope``: a tile or "all tiles") so tests and scripts
can find it; a score that does not exist is shown as a word ("no validation data", "missing"),
never as a blank or a zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.metrics import NO_VALIDATION, UNMAPPED, mean_f1
from pipeline.report.collect import has_scores
from pipeline.report.provenance import Job

MISSING = "missing"
DASH = "–"


def num(v: float | None, digits: int = 3) -> str:
    return DASH if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def percent(v: float | None, digits: int = 1) -> str:
    return DASH if v is None else f"{100 * v:.{digits}f} %"


def hectares(v: float | None) -> str:
    return DASH if v is None else f"{v:,.2f}"


class Cell(str):
    """A ready ``<td>`` element, inserted as it is (plain strings are escaped into one)."""


def marker(text: str) -> Cell:
    """A cell holding a word instead of a number (escaped, styled as missing)."""
    return Cell(f'<td class="nodata">{escape(text)}</td>')


def cell(v: str) -> str:
    return v if isinstance(v, Cell) else f"<td>{escape(v)}</td>"


def table(
    header: Sequence[Sequence[tuple[str, int]]] | Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    kind: str,
    scope: str = "",
    footer: Sequence[str] | None = None,
) -> str:
    """An HTML table. ``header``: column names, or several rows of (name, colspan); ``rows``: cells as
    text (escaped here) or :class:`Cell` (:func:`marker`); ``footer``: a totals row."""
    head_rows = [header] if header and isinstance(header[0], str) else header
    thead = "".join(
        "<tr>" + "".join(_th(h) for h in row) + "</tr>"
        for row in head_rows  # type: ignore[union-attr]
    )
    body = "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows)
    foot = f'<tr class="total">{"".join(cell(c) for c in footer)}</tr>' if footer else ""
    attrs = f'data-kind="{escape(kind)}"' + (f' data-scope="{escape(scope)}"' if scope else "")
    return (
        f'<div class="scroll"><table {attrs}><thead>{thead}</thead><tbody>{body}{foot}</tbody></table></div>'
    )


def _th(h: str | tuple[str, int]) -> str:
    name, span = (h, 1) if isinstance(h, str) else h
    return f'<th colspan="{span}">{escape(name)}</th>' if span > 1 else f"<th>{escape(name)}</th>"


def status_marker(doc: Mapping[str, Any] | None) -> str:
    """The word standing for a document without scores."""
    if doc is None:
        return MISSING
    return UNMAPPED if doc.get("status") == UNMAPPED else NO_VALIDATION


def pixels(doc: Mapping[str, Any]) -> str:
    """Validation pixels scored, and those the map left unmapped (no-data) beside them."""
    n, unmapped = doc["n_pixels"], doc.get("unmapped_pixels", 0)
    return f"{n:,}" + (f" (+{unmapped:,} unmapped)" if unmapped else "")


def summary(docs: Mapping[str, Mapping[str, Any] | None], tiles: Sequence[str], scope: str) -> str:
    """Classifiers as rows: OA, kappa, mean F-score, validation pixels (and kappa per tile, run-wide)."""
    head = ["classifier", "OA", "kappa", "mean F1", "validation pixels", *(f"kappa {t}" for t in tiles)]
    rows = []
    for model, doc in docs.items():
        if not has_scores(doc):
            word = marker(status_marker(doc))
            rows.append([model, word, word, word, pixels(doc) if doc else DASH] + [word] * len(tiles))
            continue
        per_tile = []
        for t in tiles:
            info = doc.get("tiles", {}).get(t)
            per_tile.append(
                num(info["kappa"]) if info and info.get("kappa") is not None else marker(status_marker(info))
            )
        rows.append([model, num(doc["oa"]), num(doc["kappa"]), num(mean_f1(doc)), pixels(doc), *per_tile])
    return table(head, rows, kind="summary", scope=scope)


FEW = "†"  # marks a score resting on too few validation pixels


def few(text: str, why: str) -> Cell:
    """A number kept but flagged: shown with :data:`FEW`, its reason as the tooltip."""
    return Cell(f'<td class="few" title="{escape(why)}">{escape(text)} {FEW}</td>')


def per_class(
    docs: Mapping[str, Mapping[str, Any] | None], names: Sequence[str], scope: str, min_pixels: int = 0
) -> str:
    """Per-class precision, recall and F-score, one column group per classifier, and the reference
    support (validation pixels and hectares, the same for every classifier). A class with fewer
    than ``min_pixels`` validation pixels has its support and scores flagged (:func:`few`)."""
    models = list(docs)
    top = [("", 1), ("reference", 2)] + [
        (m if has_scores(docs[m]) else f"{m} ({status_marker(docs[m])})", 3) for m in models
    ]
    second = [("class", 1), ("pixels", 1), ("ha", 1)] + [(h, 1) for _ in models for h in ("P", "R", "F1")]
    any_doc = next((d for d in docs.values() if has_scores(d)), None)
    rows = []
    for name in names:
        support = any_doc["per_class"][name]["support_pixels"] if any_doc else 0
        area = any_doc["pixel_area_m2"] * support / 1e4 if any_doc else None
        thin = any_doc is not None and support < min_pixels
        why = f"{support:,} validation pixels (< report.min_class_pixels {min_pixels:,})"
        row = [name, few(f"{support:,}", why) if thin else f"{support:,}", hectares(area)]
        for m in models:
            d = docs[m]
            if not has_scores(d):
                row += [DASH] * 3
                continue
            pc = d["per_class"][name]
            values = [num(pc["precision"]), num(pc["recall"]), num(pc["f1"])]
            row += [few(v, why) if thin and v != DASH else v for v in values]
        rows.append(row)
    return table([top, second], rows, kind="per-class", scope=scope)


def differences(diffs: Mapping[str, Mapping[str, Any]], names: Sequence[str], scope: str) -> str:
    """Kappa and per-class F-score differences to RF with their 95 % intervals
    (:func:`pipeline.metrics.difference_table`); the ones the polygons can tell are marked."""
    from pipeline.metrics import difference_table

    head, rows, _ = difference_table(diffs, names)
    marked = [
        [*r[:2], *(Cell(f"<td><b>{escape(c)}</b></td>") if c.endswith("*") else c for c in r[2:])]
        for r in rows
    ]
    return table(["", "validation polygons", *head[2:]], marked, kind="differences", scope=scope)


def class_areas(
    areas: Mapping[str, np.ndarray | None], names: Sequence[str], scope: str, missing: str = "missing"
) -> str:
    """Mapped area (ha) of every class per classifier, and the total mapped area (``None``: the
    classifier's column says ``missing``)."""
    models = list(areas)

    def ha(m: str, i: int | None) -> str:
        a = areas[m]
        if a is None:
            return marker(missing)
        return hectares(float(np.sum(a) if i is None else a[i]))

    rows = [[n, *(ha(m, i) for m in models)] for i, n in enumerate(names)]
    footer = ["total mapped", *(ha(m, None) for m in models)]
    return table(["class", *(f"{m} (ha)" for m in models)], rows, kind="areas", scope=scope, footer=footer)


def regions(rows: Sequence[Sequence[str]], models: Sequence[str], few_clear: int) -> str:
    """Per region: mapped area, and per classifier its largest class, mean confidence and the share
    of pixels seen clear fewer than ``few_clear`` times."""
    head = [
        [("region", 1), ("mapped (ha)", 1), *((m, 3) for m in models)],
        [("", 1), ("", 1), *(h for _ in models for h in (("largest class", 1), ("mean conf. (%)", 1),
                                                          (f"< {few_clear} clear obs.", 1)))],
    ]  # fmt: skip
    return table(head, rows, kind="regions")


def confidence(stats: Mapping[str, Mapping[str, Any] | None], threshold: int, scope: str) -> str:
    """Share of mapped pixels below the confidence threshold, and the mean confidence, per classifier."""
    rows = []
    for m, s in stats.items():
        if s is None:
            rows.append([m, marker("no confidence layer"), marker("no confidence layer"), DASH])
        else:
            rows.append([m, percent(s["low_share"]), num(s["mean"], 1), f"{s['pixels']:,}"])
    head = ["classifier", f"confidence < {threshold} %", "mean confidence (%)", "mapped pixels"]
    return table(head, rows, kind="confidence", scope=scope)


def clear(stats: Mapping[str, Mapping[str, Any] | None]) -> str:
    """Clear-observation statistics per tile (validity layer)."""
    rows = []
    for tile, s in stats.items():
        if s is None:
            rows.append([tile, marker("no validity layer"), DASH, DASH, DASH])
        else:
            rows.append(
                [tile, percent(s["zero_share"], 2), num(s["mean"], 1), str(s["max"]), f"{s['pixels']:,}"]
            )
    head = ["tile", "never clear (0 obs.)", "mean clear obs.", "max", "pixels"]
    return table(head, rows, kind="clear")


def qa(doc: Mapping[str, Any], scope: str) -> str:
    """Geometric QA of one tile: the reference-vs-reference agreement and each model's, mean +- std."""

    limit = doc.get("max_standard_error")

    def row(name: str, rec: Mapping[str, Any], corners: str) -> list[str]:
        mean, se = rec.get("mean"), rec.get("standard_error")
        word = marker("no reference corner") if mean is None else num(mean)
        error = num(se)
        if se is not None and limit is not None and se > limit:
            error = few(error, f"above qa.max_standard_error {limit:g}: too few corners")
        return [name, word, num(rec.get("std")), error, str(rec.get("n", 0)), corners]

    ref_corners = ", ".join(str(r["corners"]) for r in doc.get("references", []))
    rows = [row("RF references vs each other", doc["reference_vs_reference"], ref_corners)]
    rows += [row(m, rec, str(rec.get("corners", DASH))) for m, rec in doc.get("models", {}).items()]
    head = ["map", "matched reference corners (mean)", "std", "standard error", "n", "corners"]
    return table(head, rows, kind="qa", scope=scope)


def seeds(stats: Mapping[str, Mapping[str, Any]], seed_lists: Mapping[str, Sequence[int]]) -> str:
    """Kappa and OA over the seeds of each classifier: mean +- sample std, and every seed's kappa."""
    rows = []
    for c, s in stats.items():
        k = s["kappa"]
        values = ", ".join(f"{seed}: {num(v)}" for seed, v in zip(seed_lists[c], k["scores"], strict=True))
        rows.append(
            [c, str(k["n"]), num(k["mean"]), num(k["std"]), num(s["oa"]["mean"]), num(s["oa"]["std"]), values]
        )
    head = ["classifier", "seeds scored", "kappa mean", "kappa std", "OA mean", "OA std", "kappa per seed"]
    return table(head, rows, kind="seeds")


def seed_f1(stats: Mapping[str, Mapping[str, Any]], names: Sequence[str]) -> str:
    """F-score per class over the seeds: ``mean ± std`` per classifier (the seed's Tables 3-4 with
    their spread)."""

    def pm(v: Mapping[str, Any]) -> str:
        if v["mean"] is None:
            return DASH
        return num(v["mean"]) if v["std"] is None else f"{num(v['mean'])} ± {num(v['std'])}"

    rows = [[n, *(pm(s["f1"][n]) for s in stats.values())] for n in names]
    return table(["class", *stats], rows, kind="seed-f1")


def _trained(name: str, meta: Mapping[str, Any] | None) -> list[str]:
    """One row of :func:`training`: what the model is, what it saw, what was kept, how it ended."""
    if meta is None:
        return [name, *[marker(MISSING)] * 6]
    params, tr = meta.get("params") or {}, meta.get("training")
    seconds = sum(float(v) for v in (meta.get("timing_s") or {}).values())
    if tr is None:  # a pixel classifier (rf, fgunet_rf)
        samples = meta.get("samples") or {}
        what = f"{params.get('n_estimators', '?')} trees, depth <= {params.get('max_depth', '?')}"
        if net := meta.get("network"):
            what += f", on the features of {net.get('name')} (its epoch {net.get('kept_epoch')})"
        counts = samples.get("counts") or {}
        n = sum(counts.values() if isinstance(counts, Mapping) else counts)
        seen = f"{n:,} px (<= {samples.get('per_class_target', '?')} per class)"
        return [name, what, seen, DASH, DASH, DASH, f"{seconds:,.0f} s"]
    hist = tr.get("history") or []
    epochs, steps = int(tr.get("epochs") or len(hist)), int(tr.get("steps_per_epoch") or 0)
    what = f"{params.get('arch', name)}, {params.get('parameters', 0):,} parameters"
    seen = (
        f"{epochs} x {steps} steps of {tr.get('batch_size')} x {tr.get('patch_size')}-px patches"
        f" x {tr.get('nodes', 1)} process(es), {tr.get('precision_used', '?')}"
    )
    kept_at = tr.get("kept_epoch")
    sel = next((h.get("sel_kappa") for h in hist if h.get("epoch") == kept_at), None)
    kept = f"epoch {kept_at} of {epochs} (selection kappa {num(sel)})"
    refit = tr.get("head_refit")
    head = (
        f"refitted: logistic regression on {refit['pixels']:,} px x {refit['features']} features"
        if refit
        else "trained end to end (the paper's)"
    )
    init = tr.get("init_from")
    start = f"{Path(str(init.get('model'))).name}, trained {init.get('created')}" if init else "scratch"
    return [name, what, seen, kept, head, start, f"{seconds:,.0f} s"]


def training(metas: Mapping[str, Mapping[str, Any] | None]) -> str:
    """How each model of the run was trained (``model.json``), classifiers side by side."""
    head = ["model", "what", "trained on", "kept", "last layer", "started from", "time"]
    return table(head, [_trained(n, m) for n, m in metas.items()], kind="training")


def products(info: Mapping[str, Any]) -> str:
    """The L2A products of one tile, one row per date."""
    rows = [
        [
            str(p["date"]),
            str(p["acquired"] or DASH),
            str(p["platform"] or DASH),
            str(p["orbit"] or DASH),
            str(p["product"] or DASH),
            str(p["folder"] or DASH),
        ]
        for p in info["products"]
    ]
    head = ["date", "acquired (UTC)", "platform", "relative orbit", "product", "folder"]
    return table(head, rows, kind="products")


def jobs(rows: Sequence[Job]) -> str:
    """Each Snakemake job's wall-clock time, peak memory and CPU time."""
    body = [
        [j.rule, j.key, f"{j.seconds:.1f}", num(j.max_rss_mb, 0), num(j.cpu_seconds, 1)]
        for j in sorted(rows, key=lambda j: (j.rule, j.key))
    ]
    total = ["total", "", f"{sum(j.seconds for j in rows):.1f}", "", ""]
    head = ["rule", "job", "seconds", "max RSS (MB)", "CPU seconds"]
    return table(head, body, kind="benchmarks", footer=total)
