"""The report's plots: plain functions from arrays and numbers to PNG bytes (matplotlib, Agg).

Each builds its own :class:`matplotlib.figure.Figure` (no pyplot state, nothing left open), in the
styles of the seed's figures: grouped bars per tile or class (Figs. 6, 7, 9), bars with error bars
(Fig. 20), map extracts side by side (Fig. 8); colours of classes always come from the nomenclature.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from pipeline.config import ClassDef
from pipeline.io.cog import CONFIDENCE_NODATA, class_colormap, confidence_colormap

DPI = 90
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
REFERENCE_COLOUR = "#7f7f7f"  # the pixel-based reference bar of the geometric QA


def figure(width: float, height: float) -> Figure:
    """A figure drawn by the Agg canvas (whatever pyplot's backend), laid out without overlaps."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def colourise(labels: np.ndarray, classes: Sequence[ClassDef]) -> np.ndarray:
    """(h, w, 4) uint8 RGBA of a class map with the nomenclature colours; no-data and unknown codes
    transparent."""
    cmap = class_colormap(classes)
    lut = np.zeros((max(256, max(cmap) + 1, int(labels.max(initial=0)) + 1), 4), dtype=np.uint8)
    for code, rgba in cmap.items():
        lut[code] = rgba
    return lut[labels]


def _legend_columns(width: float) -> int:
    return max(1, min(6, int(width / 2.6)))


def legend_height(n_classes: int, width: float) -> float:
    """Inches a :func:`_legend` of ``n_classes`` takes under a figure ``width`` inches wide."""
    return 0.3 + 0.2 * -(-n_classes // _legend_columns(width))


def _legend(fig: Figure, classes: Sequence[ClassDef]) -> None:
    """The nomenclature's colours and names under the maps, as many columns as the width holds."""
    handles = [Patch(facecolor=c.colour, edgecolor="#444", label=f"{c.name} {c.label}") for c in classes]
    ncol = _legend_columns(fig.get_figwidth())
    fig.legend(handles=handles, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)


def grouped_bars(
    groups: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    errors: Mapping[str, Sequence[float | None]] | None = None,
    colours: Mapping[str, str] | None = None,
    title: str = "",
    ylabel: str = "",
    ylim: tuple[float, float] = (0.0, 1.0),
    missing: str = "n/a",
) -> bytes:
    """One group of bars per ``groups`` entry, one bar per series (seed Figs. 6, 7, 9, 20).

    ``None`` values draw no bar but the word ``missing`` (e.g. "no validation data") at their place,
    so an absent score is never read as a zero. ``errors``: half-heights of error bars (e.g. std).
    """
    names = list(series)
    n = max(1, len(names))
    width = 0.8 / n
    x = np.arange(len(groups))
    fig = figure(min(14.0, max(6.0, 0.16 * len(groups) * n + 2.5)), 4.0)
    ax = fig.add_subplot()
    low = min((v for vals in series.values() for v in vals if v is not None), default=ylim[0])
    if low < ylim[0]:  # a negative kappa stays visible
        ylim = (low - 0.05, ylim[1])
    for i, name in enumerate(names):
        vals = list(series[name])
        pos = x - 0.4 + width * (i + 0.5)
        height = [np.nan if v is None else v for v in vals]
        err = None
        if errors and name in errors:
            err = [0 if e is None else e for e in errors[name]]
        colour = (colours or {}).get(name, PALETTE[i % len(PALETTE)])
        ax.bar(pos, height, width, yerr=err, capsize=3 if err else 0, label=name, color=colour)
        for p, v in zip(pos, vals, strict=True):
            if v is None:
                ax.text(
                    p,
                    ylim[0] + 0.02 * (ylim[1] - ylim[0]),
                    missing,
                    rotation=90,
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    color="#a00",
                )
            elif len(groups) * n <= 12 and not errors:  # room for the value above each bar
                ax.text(p, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(
        x, groups, rotation=45 if len(groups) > 6 else 0, ha="right" if len(groups) > 6 else "center"
    )
    ax.set(ylim=ylim, ylabel=ylabel)
    ax.set_title(title, fontsize=11)  # over the axes: the legend stands to their right
    ax.grid(axis="y", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8, frameon=False)
    return png(fig)


def differences(
    rows: Sequence[str],
    series: Mapping[str, Sequence[tuple[float | None, Sequence[float] | None]]],
    *,
    title: str = "",
    xlabel: str = "",
) -> bytes:
    """Differences with their 95 % intervals, one row per ``rows`` entry, one dot per series: a
    whisker crossing the zero line is a difference the data cannot tell. A difference without an
    interval (too few polygons) is drawn hollow."""
    names = list(series)
    n = max(1, len(names))
    fig = figure(7.0, 1.0 + 0.32 * len(rows) * max(1, n / 2))
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1].astype(float)
    for i, name in enumerate(names):
        pos = y + 0.3 - 0.6 * (i + 0.5) / n
        colour = PALETTE[i % len(PALETTE)]
        for p, (d, ci) in zip(pos, series[name], strict=True):
            if d is None:
                continue
            if ci is None:
                ax.plot([d], [p], "o", mfc="none", color=colour)
                continue
            ax.plot(ci, [p, p], "-", color=colour, lw=1.5)
            ax.plot([d], [p], "o", color=colour)
        ax.plot([], [], "o-", color=colour, label=name)
    ax.axvline(0, color="#444", lw=0.8)
    ax.set_yticks(y, rows)
    ax.set(xlabel=xlabel, ylim=(-0.7, len(rows) - 0.3))
    ax.set_title(title, fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8, frameon=False)
    return png(fig)


def area_estimates(
    classes: Sequence[str],
    mapped: Mapping[str, Sequence[float]],
    estimated: Sequence[float | None],
    ci95: Sequence[Sequence[float] | None],
    truth: Sequence[float] | None = None,
    title: str = "",
) -> bytes:
    """Per class: each classifier's pixel-count area (bars) beside the sample's estimated area with
    its 95 % interval (black dot and whisker) and, for the demo, the true area (red tick)."""
    names = list(mapped)
    n = len(names) + 1
    width = 0.8 / n
    x = np.arange(len(classes))
    fig = figure(min(14.0, max(7.0, 0.22 * len(classes) * n + 2.5)), 4.2)
    ax = fig.add_subplot()
    for i, name in enumerate(names):
        ax.bar(
            x - 0.4 + width * (i + 0.5),
            mapped[name],
            width,
            label=f"{name} (pixel count)",
            color=PALETTE[i % len(PALETTE)],
        )
    pos = x - 0.4 + width * (n - 0.5)
    for p, v, ci in zip(pos, estimated, ci95, strict=True):
        if v is None:
            continue
        if ci is not None:
            ax.plot([p, p], ci, "-", color="black", lw=1.5)
        ax.plot([p], [v], "o", color="black", ms=4)
    ax.plot([], [], "o-", color="black", label="estimated, 95 % CI")
    if truth is not None:
        ax.plot(pos, truth, "_", color="#d00", ms=12, mew=2, label="true (demo)")
    ax.set_xticks(
        x, classes, rotation=45 if len(classes) > 6 else 0, ha="right" if len(classes) > 6 else "center"
    )
    ax.set(ylabel="area (ha)")
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=8, frameon=False)
    return png(fig)


def region_shares(
    regions: Sequence[str], shares: Mapping[str, np.ndarray], classes: Sequence[ClassDef], title: str
) -> bytes:
    """Each region's class shares as one stacked horizontal bar, one panel per classifier
    (``shares[model]``: regions x classes, rows summing to 1), in the nomenclature's colours."""
    models = list(shares)
    height = 0.8 + 0.28 * len(regions) + legend_height(len(classes), 4.2 * len(models) + 1.5)
    fig = figure(4.2 * len(models) + 1.5, max(2.5, height))
    axes = fig.subplots(1, len(models), squeeze=False, sharey=True)[0]
    y = np.arange(len(regions))
    for ax, m in zip(axes, models, strict=True):
        left = np.zeros(len(regions))
        for j, c in enumerate(classes):
            ax.barh(y, shares[m][:, j], left=left, color=c.colour, edgecolor="none", height=0.8)
            left += shares[m][:, j]
        ax.set_title(m, fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_xlabel("share of the region's mapped area")
    axes[0].set_yticks(y, regions, fontsize=8)
    axes[0].invert_yaxis()  # the largest region on top (axes share y)
    _legend(fig, classes)
    fig.suptitle(title)
    return png(fig)


def row_percent(cm: np.ndarray) -> np.ndarray:
    """Confusion matrix as % of each reference row (rows sum to 100; NaN for a class without support)."""
    cm = np.asarray(cm, dtype=np.float64)
    total = cm.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 100 * cm / total, np.nan)


def confusion_heatmaps(cm_pixels: np.ndarray, cm_ha: np.ndarray, names: Sequence[str], title: str) -> bytes:
    """Two heatmaps of one confusion matrix (rows = reference, columns = predicted): % of the
    reference row, and hectares (log colour scale: the diagonal would hide every confusion)."""
    pct = row_percent(cm_pixels)
    ha = np.asarray(cm_ha, dtype=np.float64)
    k = len(names)
    side = max(3.5, 0.3 * k + 1.3)
    fig = figure(2 * side + 1, side)
    axes = fig.subplots(1, 2)
    masked = np.ma.masked_invalid(pct)
    im = axes[0].imshow(masked, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(im, ax=axes[0], shrink=0.8, label="% of the reference class")
    pos = ha[ha > 0]
    norm = LogNorm(vmin=max(pos.min(), 1e-4), vmax=pos.max()) if pos.size else None
    im2 = axes[1].imshow(np.ma.masked_less_equal(ha, 0), cmap="Oranges", norm=norm)
    fig.colorbar(im2, ax=axes[1], shrink=0.8, label="hectares")
    # where the colour is dark (upper half of its scale, log for hectares) the number is white
    dark_ha = np.asarray(norm(np.where(ha > 0, ha, 1e-12))) if norm else np.zeros_like(ha)
    panels = (
        (axes[0], pct, pct / 100, "{:.0f}", "% per reference row"),
        (axes[1], ha, dark_ha, "{:.3g}", "ha"),
    )
    for ax, values, dark, fmt, name in panels:
        ax.set_xticks(range(k), names, rotation=90, fontsize=7)
        ax.set_yticks(range(k), names, fontsize=7)
        ax.set(xlabel="predicted", ylabel="reference", title=name)
        if k > 20:
            continue
        for (r, c), v in np.ndenumerate(values):
            if np.isfinite(v) and v > 0:
                ax.text(
                    c,
                    r,
                    fmt.format(v),
                    ha="center",
                    va="center",
                    fontsize=5.5,
                    color="white" if dark[r, c] > 0.55 else "black",
                )
    fig.suptitle(title)
    return png(fig)


def _map_grid(
    panels: Mapping[str, np.ndarray], extra_width: float, legend_classes: int = 0, per_row: int = 3
) -> tuple[Figure, list[Any]]:
    """A grid of image axes, one per panel (named by its key), at most ``per_row`` a row, with room
    for a legend of ``legend_classes``; unused cells hidden. Returns the figure and the panels' axes."""
    cols = min(len(panels), per_row)
    rows = -(-len(panels) // cols)
    h, w = next(iter(panels.values())).shape
    width = cols * 4.2 + extra_width
    below = legend_height(legend_classes, width) if legend_classes else 0.0
    fig = figure(width, rows * 4.2 * h / w + 0.4 + below)
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(panels) :]:
        ax.set_axis_off()
    for ax, name in zip(axes, panels, strict=False):
        ax.set_title(name, fontsize=10)
    return fig, axes[: len(panels)]


def class_maps(panels: Mapping[str, np.ndarray], classes: Sequence[ClassDef], title: str) -> bytes:
    """Class maps side by side in the nomenclature colours, with the legend (quicklooks)."""
    fig, axes = _map_grid(panels, 0.0, legend_classes=len(classes))
    for ax, labels in zip(axes, panels.values(), strict=True):
        ax.imshow(colourise(labels, classes), interpolation="nearest")
    _legend(fig, classes)
    fig.suptitle(title)
    return png(fig)


def confidence_maps(panels: Mapping[str, np.ndarray], title: str, label: str = "confidence (%)") -> bytes:
    """Confidence (or margin) layers side by side, red (hesitant) to green (sure), in the COGs' own
    colours."""
    table = confidence_colormap()
    cmap = ListedColormap([np.array(table[v][:3]) / 255 for v in range(101)]).with_extremes(bad="white")
    fig, axes = _map_grid(panels, 0.8)
    for ax, conf in zip(axes, panels.values(), strict=True):
        im = ax.imshow(
            np.ma.masked_equal(conf, CONFIDENCE_NODATA), cmap=cmap, vmin=0, vmax=100, interpolation="nearest"
        )
    fig.colorbar(im, ax=axes, shrink=0.8, label=label)
    fig.suptitle(title)
    return png(fig)


def crops(
    places: Sequence[tuple[str, Mapping[str, np.ndarray]]], classes: Sequence[ClassDef], title: str
) -> bytes:
    """Full-resolution extracts, one row per place and one column per classifier (seed Fig. 8)."""
    names = list(places[0][1])
    rows, cols = len(places), len(names)
    present = sorted(set().union(*(np.unique(m).tolist() for _, maps in places for m in maps.values())))
    shown = [c for c in classes if c.code in present]
    width = max(cols * 2.6, 5.2)
    fig = figure(width, rows * 2.6 + 0.4 + legend_height(len(shown), width))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, (label, maps) in enumerate(places):
        for c, name in enumerate(names):
            ax = axes[r, c]
            ax.imshow(colourise(maps[name], classes), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=10)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    _legend(fig, shown)
    fig.suptitle(title)
    return png(fig)


def clear_observations(image: np.ndarray, counts: np.ndarray, title: str) -> bytes:
    """The validity layer (decimated) and the histogram of clear observations per pixel; the bar
    at 0 (never observed clear: no-data in every map) is red."""
    counts = np.asarray(counts, dtype=np.float64)
    last = int(np.flatnonzero(counts)[-1]) if counts.any() else 0
    share = 100 * counts[: last + 1] / max(counts.sum(), 1)
    fig = figure(11, 4)
    a, b = fig.subplots(1, 2, width_ratios=[1, 1.4])
    im = a.imshow(image, cmap="viridis", vmin=0, vmax=max(last, 1), interpolation="nearest")
    a.set_xticks([])
    a.set_yticks([])
    fig.colorbar(im, ax=a, shrink=0.85, label="clear observations")
    colours = ["#c00" if i == 0 else "#3b75af" for i in range(last + 1)]
    b.bar(np.arange(last + 1), share, color=colours)
    b.set(xlabel="clear observations per pixel", ylabel="% of pixels")
    b.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    return png(fig)


def stage_times(totals: Mapping[str, float], title: str = "") -> bytes:
    """Total wall-clock seconds per rule (all its jobs), longest first."""
    items = sorted(totals.items(), key=lambda kv: kv[1])
    fig = figure(7, 0.3 * len(items) + 1.2)
    ax = fig.add_subplot()
    ax.barh([k for k, _ in items], [v for _, v in items], color=PALETTE[0])
    for i, (_, v) in enumerate(items):
        ax.text(v, i, f" {v:.1f} s", va="center", fontsize=8)
    ax.set(xlabel="seconds (sum over the rule's jobs)", title=title)
    ax.grid(axis="x", alpha=0.3)
    return png(fig)
