"""The feature pipeline every model shares: gapfilled cube -> t-major channels -> eq.-2 normalisation.

Channel ``t * n_bands + c`` holds band ``c`` at date ``t`` (the percentiles file's order), and each
channel is scaled to [0, 1] between its run-wide low/high percentiles (Stoian et al. 2019, eq. 2):
``clip((x - p3) / (p97 - p3), 0, 1)``. The values, the percentiles used and the band/date schema are
copied into ``model.json``, so prediction needs only the model folder and rejects a cube whose
schema differs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.stats import Percentiles

NODATA = -10000  # gapfilled reflectance of a pixel with no valid observation at all


@dataclass(frozen=True)
class Normalisation:
    """Per-channel eq.-2 scaling plus the schema (bands, dates) the channels follow."""

    bands: tuple[str, ...]
    dates: tuple[str, ...]
    low: np.ndarray
    high: np.ndarray
    low_percentile: float
    high_percentile: float

    @property
    def channels(self) -> list[str]:
        return [f"{d}/{b}" for d in self.dates for b in self.bands]

    @property
    def n_features(self) -> int:
        return len(self.bands) * len(self.dates)

    @property
    def percentiles(self) -> Percentiles:
        return Percentiles(
            self.low.astype(np.float32),
            self.high.astype(np.float32),
            tuple(self.channels),
            self.dates,
            self.bands,
            self.low_percentile,
            self.high_percentile,
        )

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """(N, F) raw reflectances -> float32 in [0, 1] (eq. 2), via :class:`pipeline.stats.Percentiles`.

        One implementation for every model (constant channels -> 0, no-data -> 0).
        """
        return self.percentiles.normalise_features(raw)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": "eq2: clip((x - low) / (high - low), 0, 1) per channel",
            "low_percentile": self.low_percentile,
            "high_percentile": self.high_percentile,
            "channels": self.channels,
            "low": self.low.tolist(),
            "high": self.high.tolist(),
        }

    @classmethod
    def from_json(cls, norm: dict[str, Any], bands: list[str], dates: list[str]) -> Normalisation:
        return cls(
            tuple(bands),
            tuple(dates),
            np.asarray(norm["low"], dtype=np.float64),
            np.asarray(norm["high"], dtype=np.float64),
            float(norm["low_percentile"]),
            float(norm["high_percentile"]),
        )

    @classmethod
    def from_percentiles(cls, path: Path) -> Normalisation:
        """Read the run's percentiles JSON (written by ``landcover percentiles``)."""
        p = Percentiles.load(path)
        norm = cls(p.bands, p.dates, p.low, p.high, p.low_percentile, p.high_percentile)
        if list(p.channels) != norm.channels:
            raise PipelineError(path, "channels are not in date-major order (date/band, t * n_bands + c)")
        return norm


def schema_mismatch(
    attrs: dict[str, Any], bands: tuple[str, ...], dates: tuple[str, ...], against: str = "the model's"
) -> str | None:
    """Why a store's bands/dates differ from the expected ones, or None when they match."""
    got_b, got_d = tuple(attrs.get("bands", ())), tuple(attrs.get("dates", ()))
    if got_b != bands:
        return f"bands {list(got_b)} differ from {against} {list(bands)}"
    if got_d != dates:
        extra = sorted(set(got_d) - set(dates))[:3]
        lacking = sorted(set(dates) - set(got_d))[:3]
        return (
            f"dates differ from {against} ({len(got_d)} vs {len(dates)} dates; "
            f"unexpected {extra}, missing {lacking})"
        )
    return None


def pixel_features(cube: np.ndarray) -> np.ndarray:
    """(T, C, H, W) cube -> (H*W, T*C) rows in t-major channel order (a copy, C-contiguous)."""
    t, c, h, w = cube.shape
    return np.ascontiguousarray(cube.reshape(t * c, h * w).T)


def nodata_mask(cube: np.ndarray) -> np.ndarray:
    """(H, W) True where every channel is no-data (no valid observation at all).

    Screens on the first channel, then confirms only those pixels, instead of comparing the whole cube.
    """
    mask = cube[0, 0] == NODATA
    if mask.any():
        mask[mask] = np.all(cube[:, :, mask] == NODATA, axis=(0, 1))
    return mask
