"""Design-based accuracy and area estimates from a stratified random sample of the map (issue 14).

Why: the validation polygons compare classifiers, but they are not a probability sample of the
map, and pixel counts carry the map's errors into every hectare. Statistical offices ask for the
good practice of Olofsson et al. (2014, RSE 148): a stratified random sample of map pixels,
labelled by interpreters, from which overall, user's and producer's accuracy and each class's area
are estimated without bias, with standard errors and 95 % confidence intervals.

The estimators are Stehman's (2014, IJRS 35) for stratified random sampling, which hold whether the
strata are the map's classes (Olofsson's case, where they reduce to Olofsson's eqs. 2-10) or not (a
sample designed on one classifier's map and used to assess another's): every quantity is a total
or a ratio of totals of per-point indicators, estimated per stratum and weighted by the stratum's
size, with the stratified variance including the finite-population correction.

Plain functions over arrays; the sampling and I/O live in :mod:`pipeline.sampledesign`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Z95 = 1.96  # the 95 % interval's normal quantile, rounded as Olofsson et al. 2014 and sits do


def sample_size(weights: Sequence[float], users_accuracy: Sequence[float], target_se: float) -> int:
    """Total sample size for a target standard error of overall accuracy (Olofsson et al. 2014
    eq. 13, after Cochran 1977 eq. 5.25): ``n = (sum W_i S_i / S(O))**2``, ``S_i = sqrt(U_i (1 - U_i))``,
    with ``W_i`` the strata's area shares and ``U_i`` the user's accuracies expected in them."""
    w = np.asarray(weights, np.float64)
    u = np.asarray(users_accuracy, np.float64)
    if w.shape != u.shape or not len(w):
        raise ValueError("one weight and one expected user's accuracy per stratum")
    if (w < 0).any() or not np.isclose(w.sum(), 1.0):
        raise ValueError(f"stratum weights must be >= 0 and sum to 1 (sum {w.sum():.6f})")
    if ((u <= 0) | (u >= 1)).any():
        raise ValueError("expected user's accuracies must lie strictly between 0 and 1")
    if not 0 < target_se < 0.5:
        raise ValueError(f"target standard error {target_se} is not in (0, 0.5)")
    return int(np.ceil((w @ np.sqrt(u * (1 - u)) / target_se) ** 2))


def allocate(n: int, sizes: Sequence[int], minimum: int) -> np.ndarray:
    """Points per stratum: at least ``minimum`` (all of a stratum's pixels if it has fewer), the
    rest of ``n`` in proportion to the strata's sizes (Olofsson et al. 2014 §5.1.2: rare classes
    get enough points for their user's accuracy, large ones stay near proportional). Largest
    remainders keep the total; a stratum never gets more points than pixels."""
    size = np.asarray(sizes, np.int64)
    floor = np.minimum(size, minimum)
    rest = max(0, n - int(floor.sum()))
    share = rest * size / max(1, size.sum())
    extra = np.floor(share).astype(np.int64)
    order = np.argsort(-(share - extra), kind="stable")
    extra[order[: rest - int(extra.sum())]] += 1
    out = np.minimum(size, floor + extra)
    return out


@dataclass(frozen=True)
class Estimate:
    """A design-based estimate with its standard error (None: a stratum with < 2 points and a share
    of the quantity, whose variance cannot be estimated) and its 95 % interval."""

    value: float | None
    se: float | None

    def ci95(self) -> list[float] | None:
        if self.value is None or self.se is None:
            return None
        return [self.value - Z95 * self.se, self.value + Z95 * self.se]

    def to_dict(self, scale: float = 1.0) -> dict[str, Any]:
        ci = self.ci95()
        return {
            "value": None if self.value is None else self.value * scale,
            "se": None if self.se is None else self.se * scale,
            "ci95": None if ci is None else [c * scale for c in ci],
        }


class StratifiedSample:
    """Per-point strata, map classes and reference classes, with each stratum's size in pixels."""

    def __init__(
        self,
        stratum_sizes: Sequence[int],
        strata: Any,
        mapped: Any,
        reference: Any,
        k: int,
        strata_are_map_classes: bool = False,
        fpc: bool = False,
    ) -> None:
        self.sizes = np.asarray(stratum_sizes, np.float64)
        self.strata = np.asarray(strata, np.int64)
        self.mapped = np.asarray(mapped, np.int64)
        self.reference = np.asarray(reference, np.int64)
        self.k = k
        self.fpc = fpc
        # Olofsson's case (the design's own map): stratum i holds only pixels mapped as class i
        self.by_map = strata_are_map_classes and len(self.sizes) == k
        if self.by_map and len(self.strata) and (self.strata != self.mapped).any():
            raise ValueError(
                "strata said to be the map's classes, but a point's map class is not its stratum"
            )
        if not (len(self.strata) == len(self.mapped) == len(self.reference)):
            raise ValueError("strata, mapped and reference must have one value per point")
        checks = (
            ("stratum", self.strata, len(self.sizes)),
            ("class", self.mapped, k),
            ("class", self.reference, k),
        )
        for name, v, top in checks:
            if len(v) and (v.min() < 0 or v.max() >= top):
                raise ValueError(f"a {name} index outside 0..{top - 1}")
        self.n_h = np.bincount(self.strata, minlength=len(self.sizes)).astype(np.float64)
        if (self.n_h > self.sizes).any():
            raise ValueError("a stratum has more sample points than pixels")
        empty = (self.n_h == 0) & (self.sizes > 0)
        if empty.any():
            raise ValueError(f"strata {np.flatnonzero(empty).tolist()} have pixels but no sample point")
        self.total = float(self.sizes.sum())

    def _moments(self, y: np.ndarray, x: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """Per stratum: means of y (and x), sample variances and covariance (NaN below 2 points)."""
        h, n = self.strata, self.n_h
        safe = np.maximum(n, 1)
        my = np.bincount(h, y, len(n)) / safe
        dy = y - my[h]
        with np.errstate(invalid="ignore", divide="ignore"):
            vy = np.bincount(h, dy * dy, len(n)) / (n - 1)
            if x is None:
                return my, vy
            mx = np.bincount(h, x, len(n)) / safe
            dx = x - mx[h]
            vx = np.bincount(h, dx * dx, len(n)) / (n - 1)
            cxy = np.bincount(h, dx * dy, len(n)) / (n - 1)
        return my, vy, mx, vx, cxy

    def _var_weights(self) -> np.ndarray:
        """N_h^2 / n_h per stratum, times (1 - n_h / N_h) with ``fpc`` (0 for an empty stratum).

        Without the finite-population correction by default, as Olofsson et al. 2014 and sits: the
        published figures are reproduced, and with millions of pixels per stratum it changes a
        standard error by less than 0.01 %."""
        corr = 1 - self.n_h / np.maximum(self.sizes, 1) if self.fpc else 1.0
        with np.errstate(invalid="ignore", divide="ignore"):
            w = self.sizes**2 * corr / self.n_h
        return np.where(self.n_h > 0, w, 0.0)

    def _sum(self, var: np.ndarray, zero: np.ndarray | None = None) -> float | None:
        """sum_h N_h^2 var_h / n_h (:meth:`_var_weights`); None when a stratum with a single point holds the
        quantity (its variance cannot be estimated), unless ``zero`` says the quantity is 0 on the
        whole stratum by design (a map-class indicator when the strata are that map's classes)."""
        w = self._var_weights()
        unknown = np.isnan(var) & (w > 0)
        if zero is not None:
            unknown &= ~zero
        if unknown.any():
            return None
        return float(np.sum(w * np.nan_to_num(var)))

    def proportion(self, y: np.ndarray) -> Estimate:
        """The population share of points with indicator ``y`` (Stehman 2014 eqs. 3, 25)."""
        my, vy = self._moments(y.astype(np.float64))
        value = float(self.sizes @ my) / self.total
        v = self._sum(vy)
        return Estimate(value, None if v is None else float(np.sqrt(v)) / self.total)

    def ratio(self, y: np.ndarray, x: np.ndarray, zero: np.ndarray | None = None) -> Estimate:
        """The ratio of two totals (user's / producer's accuracy; Stehman 2014 eqs. 27-28);
        ``zero``: strata where x (so y <= x) is 0 by design."""
        my, vy, mx, vx, cxy = self._moments(y.astype(np.float64), x.astype(np.float64))
        tx = float(self.sizes @ mx)
        if tx == 0:
            return Estimate(None, None)
        r = float(self.sizes @ my) / tx
        v = self._sum(vy + r * r * vx - 2 * r * cxy, zero)
        return Estimate(r, None if v is None else float(np.sqrt(max(v, 0.0))) / tx)

    def estimates(self) -> dict[str, Any]:
        """Overall accuracy, user's and producer's accuracy and area share per class, and the error
        matrix in estimated area proportions (rows = map, columns = reference)."""
        m, r, k = self.mapped, self.reference, self.k
        oa = self.proportion(m == r)
        others = (lambda i: np.arange(k) != i) if self.by_map else (lambda i: None)
        users = [self.ratio((m == i) & (r == i), m == i, others(i)) for i in range(k)]
        producers = [self.ratio((m == j) & (r == j), r == j) for j in range(k)]
        shares = [self.proportion(r == j) for j in range(k)]
        matrix = np.array([[self.proportion((m == i) & (r == j)).value for j in range(k)] for i in range(k)])
        return {"overall": oa, "users": users, "producers": producers, "area_share": shares, "matrix": matrix}

    def thin_strata(self) -> list[int]:
        """Strata with pixels but fewer than 2 points: no variance from them."""
        return np.flatnonzero((self.n_h < 2) & (self.sizes > 0)).tolist()
