"""Stage 2's verdict: does a subset train a better generator than plain data, beyond seed noise?

Each compared subset s ran with the same seeds as "none". Its effect is the mean of the paired
differences d_j = FID(s, seed j) − FID(none, seed j) (negative: s is better). Its uncertainty is a
percentile bootstrap over seeds: B resamples of the n pairs with replacement
(`numpy.random.default_rng(seed).integers(0, n, (B, n))`), the mean of each, and the quantiles
α'/2 and 1 − α'/2 of those means (`numpy.quantile`, linear).

Correction for comparing several subsets: Holm's step-down, applied to the bootstrap intervals.
Comparisons are ordered by their bootstrap p-value (two-sided: twice the smaller share of resampled
means on either side of 0, at most 1); the j-th of m (from 0) is judged at α' = α/(m − j), and a
comparison counts only while every one before it did. A subset beats "none" when its interval at
its Holm level lies wholly below 0. With 3 seeds that needs all three pairs to favour the subset.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import numpy as np

RESAMPLES = 10_000
CORRECTION = "Holm step-down over the subsets compared with none (family-wise alpha {alpha:g})"


@dataclass
class Interval:
    mean: float
    low: float
    high: float
    level: float        # the confidence level of [low, high]


def bootstrap_means(diffs: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0) -> np.ndarray:
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size < 1:
        raise ValueError("need at least one paired difference")
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    return d[idx].mean(axis=1)


def paired_interval(diffs: Sequence[float], *, level: float = 0.95, resamples: int = RESAMPLES,
                    seed: int = 0) -> Interval:
    """Mean of the paired differences and its percentile bootstrap interval at `level`."""
    means = bootstrap_means(diffs, resamples=resamples, seed=seed)
    tail = (1.0 - level) / 2
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(np.mean(diffs)), float(low), float(high), float(level))


def bootstrap_pvalue(diffs: Sequence[float], *, resamples: int = RESAMPLES, seed: int = 0) -> float:
    means = bootstrap_means(diffs, resamples=resamples, seed=seed)
    return float(min(1.0, 2 * min(np.mean(means >= 0), np.mean(means <= 0))))


@dataclass
class Comparison:
    key: str            # the subset's key
    label: str          # which rule produced it (control name, or "best Optuna proposal")
    seeds: list[int]
    diffs: list[float]  # FID(subset) − FID(none), seed by seed
    mean: float
    low: float
    high: float
    level: float
    pvalue: float
    beats_none: bool    # the interval lies below 0 and Holm's step-down reached it

    def as_dict(self) -> dict:
        return asdict(self)


def compare_with_none(fids: Mapping[str, Mapping[int, float]], none: Mapping[int, float],
                      labels: Mapping[str, str], *, alpha: float = 0.05, resamples: int = RESAMPLES,
                      seed: int = 0) -> list[Comparison]:
    """Every subset of `fids` (key -> {seed: FID}) against `none` ({seed: FID}) at the seeds both
    have; subsets with no common seed are left out. Returned in Holm order."""
    paired = {}
    for key, by_seed in fids.items():
        seeds = sorted(set(by_seed) & set(none))
        if seeds:
            paired[key] = (seeds, [float(by_seed[s]) - float(none[s]) for s in seeds])
    pvalues = {k: bootstrap_pvalue(d, resamples=resamples, seed=seed) for k, (_, d) in paired.items()}
    order = sorted(paired, key=lambda k: (pvalues[k], k))
    out, still = [], True
    for j, key in enumerate(order):
        seeds, diffs = paired[key]
        level = 1.0 - alpha / (len(order) - j)
        iv = paired_interval(diffs, level=level, resamples=resamples, seed=seed)
        significant = iv.high < 0 or iv.low > 0
        still = still and significant
        out.append(Comparison(key, labels.get(key, key), seeds, diffs, iv.mean, iv.low, iv.high, level,
                              pvalues[key], still and iv.high < 0))
    return out


def no_winner_sentence(budget_steps: int, seeds: int) -> str:
    return (f"No subset beat plain data at this budget ({budget_steps} steps, {seeds} seed(s)): the paired "
            f"FID differences against no augmentation have intervals that include zero (or favour no augmentation).")


def winner_sentence(c: Comparison) -> str:
    return (f"{c.key} ({c.label}) beat plain data: FID {c.mean:+.4g} against no augmentation, "
            f"{c.level:.1%} interval [{c.low:.4g}, {c.high:.4g}] over seeds {c.seeds}.")
