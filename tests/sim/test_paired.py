"""Paired comparisons over seeds against SciPy: the t distribution, the paired t-test, Holm's correction."""

import math

import numpy as np
import pytest
from scipy import stats

from nordfl.sim.paired import holm, paired_t, t_quantile, t_sf_two_sided


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 7.0, -3.0])
def test_t_tail_and_quantile_match_scipy(df, t):
    assert t_sf_two_sided(t, df) == pytest.approx(2 * stats.t.sf(abs(t), df), rel=1e-9, abs=1e-12)
    assert t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_paired_t_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(0.75, 0.02, 5)
    b = a - rng.normal(0.01, 0.01, 5)
    got = paired_t(list(a), list(b))
    want = stats.ttest_rel(a, b)
    assert got.p == pytest.approx(want.pvalue, rel=1e-8)
    d = a - b
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
    assert (got.mean, got.low, got.high) == pytest.approx((d.mean(), d.mean() - half, d.mean() + half), rel=1e-9)


def test_paired_t_edge_cases():
    assert math.isnan(paired_t([0.7], [0.6]).p)  # one seed: no test
    same = paired_t([0.7, 0.8], [0.7, 0.8])
    assert same.p == 1.0 and same.low == same.high == 0.0
    shifted = paired_t([1.5, 2.5], [1.0, 2.0])  # a constant difference: certain
    assert shifted.p == 0.0 and shifted.mean == 0.5
    with pytest.raises(ValueError, match="must pair up, got 2 and 1"):
        paired_t([0.1, 0.2], [0.1])


def test_holm_against_its_definition():
    p = [0.01, 0.04, 0.03, 0.005, math.nan]
    # sorted: 0.005 (x4), 0.01 (x3), 0.03 (x2), 0.04 (x1); running maximum
    assert holm(p)[:4] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert math.isnan(holm(p)[4])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
