"""The run's QA report: one self-contained HTML file production teams read before publishing a map.

Scores of every classifier side by side (run-wide and per tile), confusion matrices in % and in
hectares, the seed's figure styles (kappa per tile, F-score per class, corner-matching QA), map
quicklooks and full-resolution extracts where classifiers disagree, clear observations, class
areas, low-confidence shares, and provenance (config and hash, software, input products, stage
times). Images are embedded as PNG data URIs; there is no script and nothing fetched from a network.

Modules: :mod:`.collect` (reads the run's outputs), :mod:`.rasters` (bounded-memory raster
statistics), :mod:`.figures` (PNG plots), :mod:`.tables`, :mod:`.sections` (what each section
says), :mod:`.html` (page assembly), :mod:`.provenance`. docs/report.md explains how to read it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tqdm import tqdm

from pipeline.config import Config
from pipeline.io.atomic import atomic_path
from pipeline.layout import Layout
from pipeline.report import sections
from pipeline.report.collect import load_docs, load_mosaics, tile_rasters
from pipeline.report.html import Section, page

log = logging.getLogger(__name__)


def build_report(cfg: Config, out: str | Path | None = None) -> Path:
    """Write the QA report of the run described by ``cfg`` to ``out`` (default: the run layout's),
    atomically; returns its path. Missing outputs are reported in their sections; inconsistent ones
    (another nomenclature, a map on another grid) raise :class:`~pipeline.errors.PipelineError`."""
    t0 = time.perf_counter()
    lay = Layout(cfg.workdir)
    out = Path(out or lay.report())
    docs = load_docs(cfg, lay)
    rasters = {
        t: tile_rasters(cfg, lay, t, docs.classifiers)
        for t in tqdm(docs.tiles, desc="report: rasters", unit="tile", disable=None)
    }
    mosaics = load_mosaics(lay, docs.classifiers)
    built = sections.built_at()
    parts = [
        sections.run_summary(cfg, docs, built),
        sections.national(cfg, docs, rasters, mosaics),
        sections.run_scores(cfg, docs, rasters, national=bool(mosaics)),
    ]
    if (sample := sections.accuracy_sample(cfg, lay)) is not None:
        parts.append(sample)
    parts.append(sections.geometric_qa(cfg, docs))
    if cfg.extra_seeds:
        parts.append(sections.seeds(cfg, docs))
    parts.append(sections.training(cfg, lay, docs))
    tiles = Section("tiles", "Tiles")
    tiles.children = [
        sections.tile_section(cfg, docs, rasters[t])
        for t in tqdm(docs.tiles, desc="report: tiles", unit="tile", disable=None)
    ]
    parts += [tiles, sections.provenance(cfg, lay)]
    html = page("Land-cover QA report", f"{cfg.workdir} · built {built}", parts)
    with atomic_path(out) as tmp:
        tmp.write_text(html, encoding="utf-8")
    log.info("QA report %s: %.1f MB in %.1f s", out, out.stat().st_size / 1e6, time.perf_counter() - t0)
    return out
