"""Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs"), on Inception features.

Unbiased MMD² with the cubic polynomial kernel k(x, y) = (x·y / d + 1)³, averaged over random subsets,
the convention of clean-fid (`kernel_distance`) and torch-fidelity (`metric_kid`). Unlike them the subsets
come from a seeded numpy Generator, and the subset size is lowered to the smaller set for small test sets.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class KIDResult(NamedTuple):
    mean: float         # Mean of the unbiased MMD² over the subsets.
    std: float          # Its standard deviation over the subsets (spread of the estimate, not an error bar).
    subset_size: int    # Samples per set in each subset: min(n1, n2, requested subset_size).
    subsets: int        # Number of subsets drawn.


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(x·y / d + 1)³ for every row pair: (n, d), (m, d) -> (n, m)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD² between two equal-size samples (m, d): the diagonal of k(x, x) and k(y, y) is left out."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(within - 2.0 * k_xy.sum() / (m * m))


def kid(feats1: np.ndarray, feats2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> KIDResult:
    """KID between two feature sets (n1, d), (n2, d): (mean, std, subset_size used, subsets).

    Each subset draws `subset_size` rows of each set without replacement. Unbiased, so identical sets
    give about 0 (and it can be slightly negative). Needs at least 2 samples per set.
    """
    feats1, feats2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    if feats1.ndim != 2 or feats2.ndim != 2 or feats1.shape[1] != feats2.shape[1]:
        raise ValueError(f"features must be (n, d) with equal d, got {feats1.shape} and {feats2.shape}")
    m = min(len(feats1), len(feats2), subset_size)
    if m < 2:
        raise ValueError(f"KID needs >= 2 samples per set, got {len(feats1)} and {len(feats2)}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        x = feats1[rng.choice(len(feats1), m, replace=False)]
        y = feats2[rng.choice(len(feats2), m, replace=False)]
        values[i] = mmd2_unbiased(x, y)
    return KIDResult(float(values.mean()), float(values.std()), m, subsets)
