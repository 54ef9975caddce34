"""``nets.init_from``: start a network from an earlier run's model instead of random weights.

Seed §6 proposes it for the yearly map: last year's FG-UNET fine-tuned on this year's images and
labels, at about the cost of an RF, instead of a training from scratch. The starting model must
compute the same function shape: same network and filters, same classes in the same order, same
bands and spectral indices, same temporal groups and dates per group. The dates themselves may
differ (that is the point: another year), and so may the percentiles (eq. 2 uses this run's).
Anything else is refused before any data is read, with one line naming the file and what differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.nets.arch import NetSpec, build
from pipeline.nets.weights import WEIGHTS, load_weights, weights_digest

SHAPE_FIELDS = ("unet_filters", "mlp_filters", "lstm_hidden")  # dropout changes no weight


@dataclass(frozen=True)
class Start:
    """Weights to start from, and where they came from (``model.json: training.init_from``)."""

    state_dict: dict[str, Any]
    provenance: dict[str, Any]


def starting_point(
    folder: Path,
    spec: NetSpec,
    codes: list[int],
    bands: list[str],
    indices: tuple[str, ...],
    named: Callable[[list[int]], str],
) -> Start:
    """Check the model in ``folder`` against the network this run trains and return its weights.

    ``named``: class codes -> words for messages (:meth:`pipeline.config.Config.named`).
    """
    from pipeline.train import load_meta

    folder = Path(folder)
    if not folder.is_dir():
        raise PipelineError(folder, "nets.init_from: no model folder here (train that model first)")
    meta = load_meta(folder)
    path = folder / WEIGHTS
    blob = load_weights(path)
    try:
        theirs = NetSpec.from_json(blob["spec"])
    except (KeyError, ValueError) as exc:
        raise PipelineError(path, f"nets.init_from: the weights do not describe a network ({exc})") from exc
    if why := _difference(theirs, blob, meta, spec, codes, bands, indices, named):
        raise PipelineError(path, f"cannot fine-tune from this model (nets.init_from): {why}")
    try:
        build(spec).load_state_dict(blob["state_dict"])  # shapes, and the file is whole
    except (KeyError, RuntimeError, TypeError) as exc:
        msg = str(exc).splitlines()[0]
        raise PipelineError(path, f"nets.init_from: weights do not fit their network ({msg})") from exc
    dates = meta.get("features", {}).get("dates", [])
    return Start(
        state_dict=blob["state_dict"],
        provenance={
            "model": str(folder.resolve()),
            "name": meta.get("name"),
            "created": meta.get("created"),
            "config_digest": meta.get("config_digest"),
            "dates": [dates[0], dates[-1]] if dates else [],
            "weights_sha256": weights_digest(path),
        },
    )


def _difference(
    theirs: NetSpec,
    blob: dict[str, Any],
    meta: dict[str, Any],
    spec: NetSpec,
    codes: list[int],
    bands: list[str],
    indices: tuple[str, ...],
    named: Callable[[list[int]], str],
) -> str | None:
    """What makes the starting model incompatible, in words; None when it fits."""
    if theirs.arch != spec.arch:
        return f"it is a {theirs.arch}, this run trains a {spec.arch}"
    their_codes = [int(c) for c in blob.get("codes", [])]
    if their_codes != codes:
        gone = [c for c in codes if c not in their_codes]
        extra = [c for c in their_codes if c not in codes]
        if gone or extra:
            nomenclature = meta.get("classes", {}).get("nomenclature", [])
            theirs_named = {int(c["code"]): c["name"] for c in nomenclature}  # the run lacks them
            parts = [f"not in the model: {named(gone)}"] if gone else []
            if extra:
                words = ", ".join(f"{c} {theirs_named.get(c, '?')}" for c in extra)
                parts.append(f"not in this run: {words}")
            return f"classes differ ({'; '.join(parts)})"
        return "classes are in another order (the classifier's outputs would be mislabelled)"
    their_bands = list(meta.get("features", {}).get("bands", []))
    if their_bands != list(bands):
        return f"bands differ ({', '.join(their_bands)} in the model vs {', '.join(bands)})"
    their_indices = list(blob.get("indices", []))
    if their_indices != list(indices):
        return f"spectral indices differ ({their_indices} in the model vs nets.indices {list(indices)})"
    if theirs.groups != spec.groups:
        return f"temporal groups differ ({theirs.groups} in the model vs nets.groups {spec.groups})"
    if theirs.in_channels != spec.in_channels:
        per_date = len(bands) + len(indices)  # channels of one date
        return (
            f"dates per temporal group differ ({theirs.in_channels / per_date:g} in the model vs"
            f" {spec.in_channels // per_date}: the date grid has another length)"
        )
    if theirs.n_classes != spec.n_classes:  # codes agree, so only a damaged file gets here
        return f"the network has {theirs.n_classes} outputs for {len(codes)} classes"
    for field in SHAPE_FIELDS:
        a, b = theirs.to_json()[field], spec.to_json()[field]
        if a != b:
            return f"network shape differs (nets.{field}: {a} in the model vs {b})"
    return None
