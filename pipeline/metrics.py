"""Validation on the validation polygons only: confusion matrix (pixels and hectares), overall
accuracy, Cohen's kappa and per-class precision / recall / F-score, per tile and for the run.

Tile metrics keep the raw confusion matrix, so the run-wide figures are computed from the summed
matrix (not averaged scores) and any later report can recompute whatever it needs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from tqdm import tqdm

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_path, write_json
from pipeline.io.tilestore import iter_windows, open_store, store_grid, win_slices

NO_VALIDATION = "no validation data"
UNMAPPED = "validation pixels unmapped"  # there, but the map is no-data on all of them (e.g. all cloudy)
log = logging.getLogger(__name__)


def confusion(reference: np.ndarray, predicted: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """K x K counts, rows = reference class, columns = predicted class, in ``codes`` order.

    Pixels whose reference or prediction is not one of ``codes`` (0 = unlabelled / no-data) are
    not counted.
    """
    codes = np.asarray(codes, dtype=np.int64)
    size = max(int(codes.max(initial=0)), int(reference.max(initial=0)), int(predicted.max(initial=0))) + 1
    lut = np.full(size, -1, dtype=np.int64)
    lut[codes] = np.arange(len(codes))
    r = lut[reference.ravel().astype(np.int64)]
    p = lut[predicted.ravel().astype(np.int64)]
    keep = (r >= 0) & (p >= 0)
    k = len(codes)
    return np.bincount(r[keep] * k + p[keep], minlength=k * k).reshape(k, k)


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
        for win in tqdm(
            list(iter_windows(grid.height, grid.width)), desc="validate", unit="win", leave=False
        ):
            truth = ref[win_slices(win)]
            if not truth.any():
                continue
            pred = src.read(1, window=win)
            cm += confusion(truth, pred, cfg.class_codes)
            unmapped += int(((truth > 0) & (pred == 0)).sum())
    area = abs(grid.transform.a * grid.transform.e)
    if unmapped:
        log.warning(
            "%s: %d of %d validation pixels are no-data in the map (unmapped: no clear observation?)",
            class_map, unmapped, unmapped + int(cm.sum()),
        )  # fmt: skip
    write_json(out, report(cm, cfg, area, unmapped, tile=group.attrs.get("tile"), map=str(class_map)))


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
    for path in tile_metrics:
        doc = read_metrics(cfg, path, "tile")
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
    write_json(out, report(total, cfg, area or 100.0, unmapped, scope="run", model=model, tiles=tiles))


def mean_f1(doc: dict[str, Any]) -> float | None:
    """Mean F-score over the classes present in the validation data of a metrics document."""
    f = [v["f1"] for v in doc["per_class"].values() if v["support_pixels"] and v["f1"] is not None]
    return float(np.mean(f)) if f else None


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
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    with atomic_path(Path(out).with_suffix(".csv")) as tmp:
        tmp.write_text("\n".join(csv_lines) + "\n")
