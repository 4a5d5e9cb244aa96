"""piggyback.kid: unbiased polynomial-kernel MMD² over seeded subsets."""
from __future__ import annotations

import numpy as np
import pytest

from piggyback.kid import KIDResult, kid, mmd2_unbiased, polynomial_kernel


def _mmd2_by_loops(x, y):
    """The unbiased estimator written out pair by pair (Bińkowski et al. 2018, eq. 4)."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_mmd2_matches_definition():
    rng = np.random.default_rng(0)
    x, y = rng.random((7, 5)), rng.random((7, 5)) + 0.3
    assert mmd2_unbiased(x, y) == pytest.approx(_mmd2_by_loops(x, y), rel=1e-12)
    assert polynomial_kernel(x, y).shape == (7, 7)


def test_identical_sets_give_about_zero():
    rng = np.random.default_rng(1)
    f = rng.random((2000, 64))
    result = kid(f, f, subsets=20, subset_size=50)
    # Unbiased: near 0, not exactly 0. Rows drawn into both subsets add k(x, x) to the cross term, a
    # small negative bias of order subset_size / n (here ~ -4e-4; clean-fid has the same).
    assert abs(result.mean) < 1e-3 and result.mean != 0.0
    shifted = kid(f, f + 0.1, subsets=20, subset_size=50)
    assert shifted.mean > 50 * abs(result.mean)
    # Two independent samples of one distribution: about 0 as well.
    assert abs(kid(f[:1000], f[1000:], subsets=20, subset_size=50).mean) < 1e-3


def test_shift_is_detected_and_seeded():
    rng = np.random.default_rng(2)
    a, b = rng.random((120, 32)), rng.random((140, 32)) + 0.2
    result = kid(a, b, subsets=10, subset_size=1000, seed=3)
    assert isinstance(result, KIDResult)
    assert result.subset_size == 120 and result.subsets == 10  # Lowered to the smaller set.
    assert result.mean > 0.01 and result.std >= 0
    assert kid(a, b, subsets=10, subset_size=1000, seed=3) == result
    other = kid(a, b, subsets=10, subset_size=60, seed=4)
    assert other.subset_size == 60 and other.mean != result.mean


def test_rejects_bad_input():
    with pytest.raises(ValueError, match=">= 2"):
        kid(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="equal d"):
        kid(np.zeros((5, 4)), np.zeros((5, 3)))
