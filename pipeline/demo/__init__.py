"""The embedded demo country: a seeded, procedural Sentinel-2 L2A year over a few adjacent tiles.

``generate(cfg)`` is what ``landcover demo`` runs. ``Country.from_config(cfg)`` and
``render_truth(grid, window, country)`` give the true class map (for tests and QA only: users of
real data never have one, so it is not written to the inputs folder).
"""

from pipeline.demo.generate import generate
from pipeline.demo.landscape import CLASS_NAMES, Country, render_truth

__all__ = ["CLASS_NAMES", "Country", "generate", "render_truth"]
