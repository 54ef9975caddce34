"""Validation on the validation polygons only: confusion matrix (pixels and hectares), overall
accuracy, Cohen's kappa and per-class precision / recall / F-score, per tile and for the run.

Tile metrics keep the raw confusion matrix, so the run-wide figures are computed from the summed
matrix (not averaged scores) and any later report can recompute whatever it needs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from tqdm import tqdm

from pipeline.bootstrap import PolygonTable, paired_differences, score_intervals
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path, write_json
from pipeline.io.tilestore import iter_windows, open_store, store_grid, win_slices
from pipeline.reference import VALIDATION_ID

NO_VALIDATION = "no validation data"
UNMAPPED = "validation pixels unmapped"  # there, but the map is no-data on all of them (e.g. all cloudy)
log = logging.getLogger(__name__)


def confusion(reference: np.ndarray, predicted: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """K x K counts, rows = reference class, columns = predicted class, in ``codes`` order.

    Pixels whose reference or prediction is not one of ``codes`` (0 = unlabelled / no-data) are
    not counted.
    """
    r, p = class_indices(reference, predicted, codes)
    keep = (r >= 0) & (p >= 0)
    k = len(codes)
    return np.bincount(r[keep] * k + p[keep], minlength=k * k).reshape(k, k)


def class_indices(
    reference: np.ndarray, predicted: np.ndarray, codes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Flat class indices (in ``codes`` order, -1 = not a class) of a reference and a map window."""
    codes = np.asarray(codes, dtype=np.int64)
    size = max(int(codes.max(initial=0)), int(reference.max(initial=0)), int(predicted.max(initial=0))) + 1
    lut = np.full(size, -1, dtype=np.int64)
    lut[codes] = np.arange(len(codes))
    return lut[reference.ravel().astype(np.int64)], lut[predicted.ravel().astype(np.int64)]


def scores(cm: np.ndarray) -> dict[str, Any]:
    """OA, kappa and per-class precision/recall/F1 from a confusion matrix (rows = reference)."""
    cm = np.asarray(cm, dtype=np.float64)
    n = cm.sum()
    if n == 0:
        return {
            "oa": None,
            "kappa": None,
            "precision": [None] * len(cm),
            "recall": [None] * len(cm),
            "f1": [None] * len(cm),
        }
    diag = np.diag(cm)
    oa = diag.sum() / n
    expected = (cm.sum(0) * cm.sum(1)).sum() / n**2
    kappa = (oa - expected) / (1 - expected) if expected < 1 else 1.0
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = diag / cm.sum(0)
        recall = diag / cm.sum(1)
        # a class present in the reference but never predicted scores F1 = 0 (sklearn's
        # zero_division=0), not "undefined": leaving it out would flatter a mean F-score
        p0, r0 = np.nan_to_num(precision), np.nan_to_num(recall)
        f1 = np.where(p0 + r0 > 0, 2 * p0 * r0 / (p0 + r0), 0.0)
    f1 = np.where((cm.sum(0) == 0) & (cm.sum(1) == 0), np.nan, f1)  # absent on both sides: undefined

    def clean(v: np.ndarray) -> list[float | None]:
        return [None if not np.isfinite(x) else float(x) for x in v]

    return {
        "oa": float(oa),
        "kappa": float(kappa),
        "precision": clean(precision),
        "recall": clean(recall),
        "f1": clean(f1),
    }


def report(
    cm: np.ndarray, cfg: Config, pixel_area_m2: float, unmapped_pixels: int = 0, **extra: Any
) -> dict[str, Any]:
    """A machine-readable metrics document for one tile or the whole run. The scores are over the
    mapped validation pixels; ``unmapped_pixels`` (no-data in the map) are counted beside them, so
    a tile mapped as no-data reads as such, not as a tile without validation data."""
    s = scores(cm)
    names = [c.name for c in cfg.classes]
    support = cm.sum(1)
    per_class = {
        name: {
            "precision": s["precision"][i],
            "recall": s["recall"][i],
            "f1": s["f1"][i],
            "support_pixels": int(support[i]),
        }
        for i, name in enumerate(names)
    }
    return {
        **extra,
        "status": "ok" if cm.sum() else UNMAPPED if unmapped_pixels else NO_VALIDATION,
        "classes": names,
        "codes": [c.code for c in cfg.classes],
        "n_pixels": int(cm.sum()),
        "unmapped_pixels": int(unmapped_pixels),
        "pixel_area_m2": pixel_area_m2,
        "oa": s["oa"],
        "kappa": s["kappa"],
        "per_class": per_class,
        "confusion_pixels": cm.astype(int).tolist(),
        "confusion_ha": (cm * pixel_area_m2 / 1e4).round(4).tolist(),
        "config_digest": cfg.digest,
    }


def validate_tile(cfg: Config, class_map: Path, labels: Path, out: Path) -> None:
    """Compare one tile's map with its validation labels, window by window."""
    group = open_store(labels, "reference", ("validation",))
    grid = store_grid(group)
    try:
        src = rasterio.open(class_map)
    except rasterio.errors.RasterioIOError as exc:
        raise PipelineError(class_map, f"cannot open the class map ({exc})") from exc
    with src:
        if (
            src.crs != grid.crs
            or (src.width, src.height) != (grid.width, grid.height)
            or not (src.transform.almost_equals(grid.transform))
        ):
            raise PipelineError(
                class_map,
                f"map grid ({src.crs}, {src.width}x{src.height}) differs from the reference grid of {labels}",
            )
        cm = np.zeros((len(cfg.classes),) * 2, dtype=np.int64)
        unmapped = 0
        ref = group["validation"]
        # absent from a store rasterised by an older version: scores without intervals
        ids = group.get(VALIDATION_ID)
        pairs: list[tuple[np.ndarray, ...]] = []
        for win in tqdm(
            list(iter_windows(grid.height, grid.width)), desc="validate", unit="win", leave=False
        ):
            truth = ref[win_slices(win)]
            if not truth.any():
                continue
            pred = src.read(1, window=win)
            cm += confusion(truth, pred, cfg.class_codes)
            unmapped += int(((truth > 0) & (pred == 0)).sum())
            if ids is not None:
                try:
                    pairs.append(polygon_pairs(ids[win_slices(win)], truth, pred, cfg.class_codes))
                except ValueError as exc:
                    raise PipelineError(labels, f"{exc} in window {win}: rasterise it again") from exc
    area = abs(grid.transform.a * grid.transform.e)
    if unmapped:
        log.warning(
            "%s: %d of %d validation pixels are no-data in the map (unmapped: no clear observation?)",
            class_map, unmapped, unmapped + int(cm.sum()),
        )  # fmt: skip
    extra: dict[str, Any] = {"tile": group.attrs.get("tile"), "map": str(class_map)}
    if ids is not None:
        k = len(cfg.classes)
        cat = [np.concatenate([p[i] for p in pairs]) if pairs else np.zeros(0, np.int64) for i in range(4)]
        table = PolygonTable.from_pairs(*cat, k=k)
        if not np.array_equal(table.confusion(), cm):  # the same pixels, counted two ways
            raise PipelineError(labels, "per-polygon counts do not sum to the confusion matrix")
        extra["polygon_confusion"] = table.to_doc()
    write_json(out, report(cm, cfg, area, unmapped, **extra))


def polygon_pairs(
    poly: np.ndarray, reference: np.ndarray, predicted: np.ndarray, codes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(polygon id, reference class, mapped class, pixels) for one window's validation pixels that
    :func:`confusion` counts; the input of :class:`~pipeline.bootstrap.PolygonTable`."""
    r, p = class_indices(reference, predicted, codes)
    i = poly.ravel().astype(np.int64)
    counted = (r >= 0) & (p >= 0)
    if (counted & (i <= 0)).any():
        raise ValueError("validation pixels without a polygon id")
    keep = counted
    k = len(codes)
    key, n = np.unique((i[keep] * k + r[keep]) * k + p[keep], return_counts=True)
    return key // (k * k), (key // k) % k, key % k, n


def read_metrics(cfg: Config, path: str | Path, scope: str) -> dict[str, Any]:
    """A metrics document (``scope``: "tile" or "run"), refused when unreadable or of another nomenclature."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise PipelineError(path, f"cannot read {scope} metrics ({exc})") from exc
    if doc.get("codes") != [c.code for c in cfg.classes]:
        raise PipelineError(path, f"{scope} metrics were computed with another nomenclature")
    return doc


def summarise(cfg: Config, tile_metrics: Sequence[Path], out: Path, model: str | None = None) -> None:
    """Run-wide metrics from the summed tile confusion matrices, plus each tile's OA and kappa."""
    total = np.zeros((len(cfg.classes),) * 2, dtype=np.int64)
    tiles = {}
    area = None
    unmapped = 0
    tables: list[PolygonTable | None] = []
    for path in tile_metrics:
        doc = read_metrics(cfg, path, "tile")
        tables.append(PolygonTable.from_doc(doc))
        total += np.asarray(doc["confusion_pixels"], dtype=np.int64)
        area = doc["pixel_area_m2"]
        tile_unmapped = int(doc.get("unmapped_pixels", 0))
        unmapped += tile_unmapped
        tiles[doc["tile"]] = {
            "status": doc["status"],
            "oa": doc["oa"],
            "kappa": doc["kappa"],
            "n_pixels": doc["n_pixels"],
            "unmapped_pixels": tile_unmapped,
        }
    extra: dict[str, Any] = {"scope": "run", "model": model, "tiles": tiles}
    n_boot = int(cfg["validation"]["bootstrap"])
    if tables and all(t is not None for t in tables):  # else a tile validated by an older version
        merged = PolygonTable.merge([t for t in tables if t is not None])
        extra["polygon_confusion"] = merged.to_doc()
        if n_boot and len(merged.ids):
            extra["intervals"] = score_intervals(merged, n_boot, cfg.seed)
    write_json(out, report(total, cfg, area or 100.0, unmapped, **extra))


def mean_f1(doc: dict[str, Any]) -> float | None:
    """Mean F-score over the classes present in the validation data of a metrics document."""
    f = [v["f1"] for v in doc["per_class"].values() if v["support_pixels"] and v["f1"] is not None]
    return float(np.mean(f)) if f else None


BASELINE = "rf"  # the classifier every other is compared with, seed by seed


def baseline_of(model: str, models: Sequence[str]) -> str | None:
    """The RF of the same seed as ``model`` (``rf-s43`` for ``fgunet-s43``), else the run's RF."""
    from pipeline.layout import Layout

    base, seed = Layout.split_seed_model(model)
    if base == BASELINE:
        return None
    own = Layout.seed_model(BASELINE, seed) if seed is not None else BASELINE
    return own if own in models else BASELINE if BASELINE in models else None


def differences(cfg: Config, docs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per classifier (but RF): kappa and per-class F-score minus its RF's, with 95 % intervals of
    the difference from shared polygon-bootstrap draws (:func:`pipeline.bootstrap.paired_differences`).
    Empty when the run has no RF, the bootstrap is off, or a document lacks per-polygon counts."""
    n_boot = int(cfg["validation"]["bootstrap"])
    out: dict[str, dict[str, Any]] = {}
    for model, doc in docs.items():
        base = baseline_of(model, list(docs))
        if base is None or not n_boot:
            continue
        ta, tb = PolygonTable.from_doc(doc), PolygonTable.from_doc(docs[base])
        if ta is None or tb is None or not len(ta.ids) or not len(tb.ids):
            continue
        d = paired_differences(ta, tb, n_boot, cfg.seed)
        names = [c.name for c in cfg.classes]
        f1 = [(doc["per_class"][n]["f1"], docs[base]["per_class"][n]["f1"]) for n in names]
        out[model] = {
            "baseline": base,
            "kappa": {"diff": doc["kappa"] - docs[base]["kappa"], "ci95": d["kappa"]},
            "f1": {
                n: {"diff": None if a is None or b is None else a - b, "ci95": ci, "polygons": k}
                for n, (a, b), ci, k in zip(names, f1, d["f1"], d["polygons"], strict=True)
            },
            "replicates": n_boot,
        }
    return out


def signed(diff: float | None, ci: Sequence[float] | None) -> str:
    """``+0.052 [-0.10, +0.21]``, starred where the interval excludes 0 (a difference the
    validation polygons can tell)."""
    if diff is None:
        return ""
    if ci is None:
        return f"{diff:+.3f} (too few polygons)"
    star = " *" if ci[0] > 0 or ci[1] < 0 else ""
    return f"{diff:+.3f} [{ci[0]:+.2f}, {ci[1]:+.2f}]{star}"


def difference_table(
    diffs: Mapping[str, Mapping[str, Any]], names: Sequence[str]
) -> tuple[list[str], list[list[str]], list[str]]:
    """Header and rows (kappa, then F1 per class; a column per classifier) of :func:`differences`,
    and the same as CSV lines with the interval bounds in their own columns."""
    models = list(diffs)
    polygons = next(iter(diffs.values()))["f1"]
    head = ["", "polygons", *(f"{m} - {diffs[m]['baseline']}" for m in models)]
    cells = [("kappa", "", [diffs[m]["kappa"] for m in models])]
    cells += [(f"F1 {n}", str(polygons[n]["polygons"]), [diffs[m]["f1"][n] for m in models]) for n in names]
    rows = [[label, k, *(signed(c["diff"], c["ci95"]) for c in cs)] for label, k, cs in cells]

    def bound(c: Mapping[str, Any], i: int) -> str:
        return f"{c['ci95'][i]:.4f}" if c["ci95"] else ""

    csv = [
        ",".join(
            ["difference", "polygons", *head[2:], *(f"{m} {b}" for m in models for b in ("low", "high"))]
        )
    ]
    csv += [
        ",".join(
            [
                label,
                k,
                *("" if c["diff"] is None else f"{c['diff']:.4f}" for c in cs),
                *(bound(c, i) for c in cs for i in (0, 1)),
            ]
        )  # fmt: skip
        for label, k, cs in cells
    ]
    return head, rows, csv


def compare(cfg: Config, overall: Sequence[Path], out: Path) -> None:
    """Every classifier's run-wide scores side by side: ``out`` (Markdown) and its ``.csv`` sibling.

    Rows of the first table are classifiers (OA, kappa, mean F-score, kappa per tile); the second
    table has one row per class and one F-score column per classifier, as the seed's Tables 3-4.
    """
    docs = []
    for path in overall:
        doc = read_metrics(cfg, path, "run")
        docs.append((doc.get("model") or Path(path).parent.name, doc))
    names = [c.name for c in cfg.classes]
    tiles = sorted({t for _, d in docs for t in d.get("tiles", {})})

    def num(v: float | None, digits: int = 4) -> str:
        return "" if v is None else f"{v:.{digits}f}"

    head = ["classifier", "OA", "kappa", "mean F1", "validation pixels", *(f"kappa {t}" for t in tiles)]
    rows = [
        [
            m,
            num(d["oa"]),
            num(d["kappa"]),
            num(mean_f1(d)),
            str(d["n_pixels"]),
            *(num(d["tiles"].get(t, {}).get("kappa")) for t in tiles),
        ]
        for m, d in docs
    ]
    f1_head = ["class", *(m for m, _ in docs)]
    f1_rows = [[n, *(num(d["per_class"][n]["f1"]) for _, d in docs)] for n in names]

    def md(header: list[str], body: list[list[str]]) -> str:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])

    text = (
        "# Classifiers side by side (validation polygons, whole run)\n\n"
        + md(head, rows)
        + "\n\n## F-score per class\n\n"
        + md(f1_head, f1_rows)
        + "\n"
    )
    csv_lines = [",".join(head)] + [",".join(r) for r in rows]
    csv_lines += ["", ",".join(f"F1 {h}" if i else h for i, h in enumerate(f1_head))]
    csv_lines += [",".join(r) for r in f1_rows]
    diffs = differences(cfg, dict(docs))
    if diffs:
        d_head, d_rows, d_csv = difference_table(diffs, names)
        text += (
            "\n## Difference to RF, with its 95 % interval\n\n"
            f"Stratified bootstrap of the validation polygons ({next(iter(diffs.values()))['replicates']}"
            " draws, shared by the classifiers): the pixels of one polygon are right or wrong together,"
            " so the interval rests on the polygon count (none below 10 polygons). `*`: the interval"
            " excludes 0, the validation polygons tell the two apart.\n\n" + md(d_head, d_rows) + "\n"
        )
        csv_lines += ["", *d_csv]
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    with atomic_path(Path(out).with_suffix(".csv")) as tmp:
        tmp.write_text("\n".join(csv_lines) + "\n")
