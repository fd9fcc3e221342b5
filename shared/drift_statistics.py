"""Drift statistics: PSI and Kolmogorov-Smirnov against a model's reference profile, and agreement with teachers.

Everything here works on counts in the reference bins, never on the training data: a model's
metadata carries, per feature and for the prediction, the quantiles of its held-out split and the
held-out counts between them (its reference profile), and the service records what it scores as
counts in the same bins (its serving profile).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

PROFILE_QUANTILES = 101  # 100 bins: fine enough for KS, grouped into deciles for PSI
PSI_GROUPS = 10
PSI_EPSILON = 1e-4  # a bin with no values on one side would make PSI infinite


@dataclass(frozen=True)
class ReferenceProfile:
    """Bins of one variable (a feature or the prediction) and how the held-out split fell into them."""

    edges: np.ndarray  # k + 1 non-decreasing edges; the outer ones only label the range
    counts: np.ndarray  # k held-out counts per bin
    groups: np.ndarray  # k indices: which PSI group (decile) each bin belongs to

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    @classmethod
    def from_values(cls, values: np.ndarray, quantiles: int = PROFILE_QUANTILES) -> ReferenceProfile:
        """Builds the profile of a sample: its quantiles as edges, and its counts between them."""
        edges = np.quantile(np.asarray(values, dtype=np.float64), np.linspace(0.0, 1.0, quantiles))
        bins = len(edges) - 1
        profile = cls(edges, np.zeros(bins, dtype=np.int64), (np.arange(bins) * PSI_GROUPS) // bins)
        return cls(edges, profile.bin_counts(values), profile.groups)

    @classmethod
    def from_metadata(cls, entry: Mapping[str, Any], n: int) -> ReferenceProfile:
        """Reads a metadata reference entry: the quantile profile (schema 2), or the deciles of schema 1."""
        if "quantiles" in entry:
            edges = np.asarray(entry["quantiles"], dtype=np.float64)
            counts = np.asarray(entry["counts"], dtype=np.int64)
            bins = len(counts)
            return cls(edges, counts, (np.arange(bins) * PSI_GROUPS) // bins)
        # Schema 1 kept decile edges and proportions only: each decile is one bin and one PSI group.
        edges = np.asarray(entry["edges"], dtype=np.float64)
        counts = np.rint(np.asarray(entry["proportions"], dtype=np.float64) * n).astype(np.int64)
        return cls(edges, counts, np.arange(len(counts)))

    def to_metadata(self) -> dict[str, Any]:
        return {"quantiles": [round(float(e), 9) for e in self.edges], "counts": [int(c) for c in self.counts]}

    def bin_of(self, values: np.ndarray) -> np.ndarray:
        """Returns each value's bin: values below the first edge fall in the first bin, above the last in the last."""
        return np.searchsorted(self.edges[1:-1], values, side="right")

    def bin_counts(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        return np.bincount(self.bin_of(values), minlength=len(self.counts)).astype(np.int64)


def psi(reference: ReferenceProfile, current: np.ndarray) -> float:
    """Population stability index of current counts against the reference, over the PSI groups (deciles)."""
    groups = int(reference.groups.max()) + 1
    expected = np.bincount(reference.groups, weights=reference.counts, minlength=groups)
    actual = np.bincount(reference.groups, weights=np.asarray(current, dtype=np.float64), minlength=groups)
    expected = np.maximum(expected / max(expected.sum(), 1.0), PSI_EPSILON)
    actual = np.maximum(actual / max(actual.sum(), 1.0), PSI_EPSILON)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def kolmogorov_sf(x: float) -> float:
    """Survival function of the Kolmogorov distribution: P(K > x), from its alternating series."""
    if x <= 0.0:
        return 1.0
    if x < 0.2:  # the series converges slowly here, and the probability is 1 to 9 digits
        return 1.0
    k = np.arange(1, 101)
    terms = 2.0 * (-1.0) ** (k - 1) * np.exp(-2.0 * (k * x) ** 2)
    return float(min(1.0, max(0.0, terms.sum())))


def ks_two_sample(reference: ReferenceProfile, current: np.ndarray) -> tuple[float, float]:
    """Returns the two-sample KS statistic over the reference's bin edges and its asymptotic p-value.

    The empirical CDFs are compared at the bin edges only (the sample is kept as counts), which
    bounds the statistic from below; with 100 quantile bins it is within 1 % of the exact value.
    """
    current = np.asarray(current, dtype=np.float64)
    n_ref, n_cur = float(reference.counts.sum()), float(current.sum())
    if n_ref == 0 or n_cur == 0:
        return 0.0, 1.0
    statistic = float(np.max(np.abs(np.cumsum(reference.counts) / n_ref - np.cumsum(current) / n_cur)))
    effective = math.sqrt(n_ref * n_cur / (n_ref + n_cur))
    # Stephens' small-sample correction of the asymptotic distribution
    pvalue = kolmogorov_sf((effective + 0.12 + 0.11 / effective) * statistic)
    return statistic, pvalue


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (as Spearman's rho needs)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    return ranks


def pearson(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denominator if denominator > 0 else 0.0


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float:
    return pearson(_ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64)))


def pearson_ci95(r: float, n: int) -> tuple[float, float]:
    """The 95 % confidence interval of a Pearson r, by Fisher's z transform."""
    if n <= 3:
        return -1.0, 1.0
    z = math.atanh(max(-0.999999, min(0.999999, r)))
    half = 1.959964 / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def fisher_z_difference(r1: float, n1: int, r2: float, n2: int) -> tuple[float, float]:
    """Tests whether two independent correlations differ: returns (z, two-sided p-value)."""
    if n1 <= 3 or n2 <= 3:
        return 0.0, 1.0
    z1 = math.atanh(max(-0.999999, min(0.999999, r1)))
    z2 = math.atanh(max(-0.999999, min(0.999999, r2)))
    z = (z1 - z2) / math.sqrt(1.0 / (n1 - 3) + 1.0 / (n2 - 3))
    return z, math.erfc(abs(z) / math.sqrt(2.0))
