"""Design-based estimators: Olofsson et al. (2014)'s worked example to its published rounding, a
hand-worked Stehman (2014) case with strata that are not the map's classes, the sample-size
formula by hand, and the allocation's invariants."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.accuracy import StratifiedSample, allocate, sample_size

# Olofsson et al. 2014 §5: rows = map class, columns = reference (deforestation, forest gain,
# stable forest, stable non-forest); mapped areas in 30 m pixels (0.09 ha)
COUNTS = np.array([[66, 0, 5, 4], [0, 55, 8, 12], [1, 0, 153, 11], [2, 1, 9, 313]])
MAPPED_PX = [200_000, 150_000, 3_200_000, 6_450_000]
HA = 0.09


def _points(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mapped, reference = [], []
    for i, row in enumerate(counts):
        for j, n in enumerate(row):
            mapped += [i] * int(n)
            reference += [j] * int(n)
    return np.array(mapped), np.array(reference)


def test_olofsson_worked_example():
    m, r = _points(COUNTS)
    est = StratifiedSample(MAPPED_PX, m, m, r, 4, strata_are_map_classes=True).estimates()
    total_ha = sum(MAPPED_PX) * HA
    published = [(21_158, 6_158), (11_686, 3_756), (285_770, 15_510), (581_386, 16_282)]
    for share, (area, half) in zip(est["area_share"], published, strict=True):
        assert share.value * total_ha == pytest.approx(area, abs=0.5)
        assert Z(share) * total_ha == pytest.approx(half, abs=0.5)
    assert round(est["users"][0].value, 2) == 0.88 and round(est["producers"][0].value, 2) == 0.75
    assert round(est["overall"].value, 3) == 0.947 and round(Z(est["overall"]), 3) == 0.018
    # the error matrix in area proportions: p_ij = W_i n_ij / n_i. (eq. 2), rows summing to W_i
    w = np.array(MAPPED_PX) / sum(MAPPED_PX)
    np.testing.assert_allclose(est["matrix"], w[:, None] * COUNTS / COUNTS.sum(1, keepdims=True))


def Z(e) -> float:  # half-width of the 95 % interval
    lo, hi = e.ci95()
    return (hi - lo) / 2


def test_olofsson_accuracy_standard_errors_by_their_own_formulas():
    """Olofsson's eqs. 5-7 for OA, UA and PA (no finite-population correction), computed here
    directly from the counts, against the general ratio estimator."""
    m, r = _points(COUNTS)
    est = StratifiedSample(MAPPED_PX, m, m, r, 4, strata_are_map_classes=True).estimates()
    n_i = COUNTS.sum(1)
    w = np.array(MAPPED_PX) / sum(MAPPED_PX)
    u = np.diag(COUNTS) / n_i
    var_oa = np.sum(w**2 * u * (1 - u) / (n_i - 1))
    assert est["overall"].se == pytest.approx(np.sqrt(var_oa), rel=1e-9)
    for i in range(4):
        assert est["users"][i].se == pytest.approx(np.sqrt(u[i] * (1 - u[i]) / (n_i[i] - 1)), rel=1e-9)
    n_j = np.array(MAPPED_PX, dtype=float)  # N_j. in pixels
    nhat = (n_j[:, None] * COUNTS / n_i[:, None]).sum(0)  # estimated N_.j
    for j in range(4):
        p = est["producers"][j].value
        a = n_j[j] ** 2 * (1 - p) ** 2 * u[j] * (1 - u[j]) / (n_i[j] - 1)
        b = p**2 * sum(
            n_j[i] ** 2 * COUNTS[i, j] / n_i[i] * (1 - COUNTS[i, j] / n_i[i]) / (n_i[i] - 1)
            for i in range(4)
            if i != j
        )
        assert est["producers"][j].se == pytest.approx(np.sqrt((a + b) / nhat[j] ** 2), rel=1e-9)


def test_stehman_strata_that_are_not_the_map_classes_by_hand():
    """Two strata (designed on another map) of 1,000 and 3,000 px, 4 points each; the assessed map
    has classes 0/1. Worked by hand with Stehman 2014's eqs. 3, 25, 27, 28."""
    sizes = [1000, 3000]
    strata = [0, 0, 0, 0, 1, 1, 1, 1]
    mapped = [0, 0, 1, 0, 1, 1, 0, 1]
    refer = [0, 1, 1, 0, 1, 0, 0, 1]
    s = StratifiedSample(sizes, strata, mapped, refer, 2, fpc=True)
    est = s.estimates()
    # OA: y = map == reference: stratum 0 -> 1,0,1,1 (mean 3/4); stratum 1 -> 1,0,1,1 (3/4)
    assert est["overall"].value == pytest.approx((1000 * 0.75 + 3000 * 0.75) / 4000)
    # s^2 = (3/4)(1/4) 4/3 = 1/4 in both; var = sum N_h^2 (1 - n_h/N_h) s^2 / n_h / N^2
    var = (1000**2 * (1 - 4 / 1000) * 0.25 / 4 + 3000**2 * (1 - 4 / 3000) * 0.25 / 4) / 4000**2
    assert est["overall"].se == pytest.approx(np.sqrt(var))
    # area share of class 1: y = reference == 1 -> stratum 0: 0,1,1,0 (1/2); stratum 1: 1,0,0,1 (1/2)
    assert est["area_share"][1].value == pytest.approx(0.5)
    # user's accuracy of class 0: y = (m=0 & r=0) -> 1,0,0,1 | 0,0,1,0 ; x = (m=0) -> 1,1,0,1 | 0,0,1,0
    ty, tx = 1000 * 2 / 4 + 3000 * 1 / 4, 1000 * 3 / 4 + 3000 * 1 / 4
    r = ty / tx
    assert est["users"][0].value == pytest.approx(r)

    def s2(a, b):  # sample covariance
        a, b = np.array(a, float), np.array(b, float)
        return float(((a - a.mean()) * (b - b.mean())).sum() / (len(a) - 1))

    y0, x0, y1, x1 = [1, 0, 0, 1], [1, 1, 0, 1], [0, 0, 1, 0], [0, 0, 1, 0]
    v = sum(
        nh**2 * (1 - 4 / nh) * (s2(y, y) + r * r * s2(x, x) - 2 * r * s2(x, y)) / 4
        for nh, y, x in ((1000, y0, x0), (3000, y1, x1))
    )
    assert est["users"][0].se == pytest.approx(np.sqrt(v) / tx)


def test_a_stratum_with_one_point_has_no_variance_unless_the_quantity_is_zero_there_by_design():
    # strata = map classes; class 2's stratum has 1 point
    m = np.array([0] * 5 + [1] * 5 + [2])
    r = np.array([0, 0, 0, 1, 0, 1, 1, 1, 1, 0, 2])
    est = StratifiedSample([500, 400, 100], m, m, r, 3, strata_are_map_classes=True).estimates()
    assert est["users"][0].se is not None  # class 0's map indicator is 0 in stratum 2 by design
    assert est["users"][2].se is None and est["users"][2].value == 1.0
    assert est["overall"].se is None  # stratum 2 holds part of the overall accuracy
    assert est["area_share"][0].se is None
    assert StratifiedSample([500, 400, 100], m, m, r, 3, True).thin_strata() == [2]


def test_sample_size_by_hand():
    # W = (0.1, 0.3, 0.6), U = (0.7, 0.8, 0.9), S(O) = 0.01: (0.1*0.458258 + 0.3*0.4 + 0.6*0.3)^2 / 1e-4
    n = sample_size([0.1, 0.3, 0.6], [0.7, 0.8, 0.9], 0.01)
    assert n == int(np.ceil((0.1 * np.sqrt(0.21) + 0.3 * 0.4 + 0.6 * 0.3) ** 2 / 1e-4)) == 1196
    with pytest.raises(ValueError, match="sum to 1"):
        sample_size([0.5, 0.6], [0.8, 0.8], 0.01)


def test_allocation():
    sizes = [1_000_000, 200_000, 30, 5_000]
    n = allocate(600, sizes, 50)
    assert n.sum() == 600 and n[2] == 30 and n[3] >= 50  # a stratum of 30 px gives all it has
    rest = 600 - 30 - 50 * 3
    assert abs(n[0] - (50 + rest * 1_000_000 / sum(sizes))) < 1.5
    assert allocate(10, [5, 5], 50).tolist() == [5, 5]  # never more points than pixels


def test_bad_samples_are_refused():
    with pytest.raises(ValueError, match="no sample point"):
        StratifiedSample([10, 10], [0, 0], [0, 0], [0, 1], 2)
    with pytest.raises(ValueError, match="outside"):
        StratifiedSample([10, 10], [0, 1], [0, 5], [0, 1], 2)
    with pytest.raises(ValueError, match="not its stratum"):
        StratifiedSample([10, 10], [0, 1], [1, 1], [0, 1], 2, strata_are_map_classes=True)
