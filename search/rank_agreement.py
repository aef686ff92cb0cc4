"""How far stage 1's mixture FID predicts the trained FID: Kendall τ and Spearman ρ per subset size.

Only subsets of the same size are compared (mixture FIDs of different sizes differ by the share
of augmented copies alone), the empty set is left out (its mixture FID is 0 by construction),
and only subsets trained to the full budget count (ASHA's survivors alone would be a selected
sample). Each subset's trained FID is the mean over its full-budget seeds. Intervals: percentile
bootstrap over subsets (pairs resampled with replacement, `numpy.random.default_rng(seed)`),
resamples where a statistic is undefined (constant input) left out.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
from scipy.stats import kendalltau, spearmanr

LOW_TAU = 0.3
RESAMPLES = 1000
MIN_PAIRS = 3


@dataclass
class SizeAgreement:
    size: int
    subsets: int
    tau: float | None
    tau_low: float | None
    tau_high: float | None
    rho: float | None
    rho_low: float | None
    rho_high: float | None
    warning: str

    def as_dict(self) -> dict:
        return asdict(self)


def _stat(fn, x: np.ndarray, y: np.ndarray) -> float:
    if np.ptp(x) == 0 or np.ptp(y) == 0:   # constant input: undefined (scipy would warn and give NaN)
        return float("nan")
    with np.errstate(all="ignore"):
        v = fn(x, y).statistic
    return float(v) if np.isfinite(v) else float("nan")


def _interval(fn, x: np.ndarray, y: np.ndarray, resamples: int, seed: int, level: float) -> tuple[float, float] | None:
    idx = np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))
    stats = np.array([_stat(fn, x[i], y[i]) for i in idx])
    stats = stats[np.isfinite(stats)]
    if stats.size == 0:
        return None
    low, high = np.quantile(stats, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(low), float(high)


def agreement_by_size(points: Sequence[tuple[int, float, float]], *, resamples: int = RESAMPLES, seed: int = 0,
                      level: float = 0.95) -> list[SizeAgreement]:
    """`points`: (subset size, stage-1 mixture FID, trained FID) of subsets trained to the full budget."""
    out = []
    for size in sorted({p[0] for p in points if p[0] > 0}):
        x = np.array([p[1] for p in points if p[0] == size], dtype=np.float64)
        y = np.array([p[2] for p in points if p[0] == size], dtype=np.float64)
        if len(x) < MIN_PAIRS:
            out.append(SizeAgreement(size, len(x), None, None, None, None, None, None,
                                     f"size {size}: only {len(x)} subset(s) trained to the full budget; "
                                     f"rank agreement needs {MIN_PAIRS}, so nothing says whether stage 1 predicts training."))
            continue
        tau, rho = _stat(kendalltau, x, y), _stat(spearmanr, x, y)
        t_iv = _interval(kendalltau, x, y, resamples, seed, level)
        r_iv = _interval(spearmanr, x, y, resamples, seed, level)
        tau = None if np.isnan(tau) else tau
        rho = None if np.isnan(rho) else rho
        warning = ""
        if tau is None or t_iv is None:
            warning = f"size {size}: Kendall tau is undefined (constant FIDs); stage 1's ranking cannot be checked."
        elif tau < LOW_TAU or t_iv[0] <= 0 <= t_iv[1]:
            warning = (f"size {size}: stage 1's mixture FID did not reliably predict the trained FID (Kendall tau "
                       f"{tau:.2f}, interval [{t_iv[0]:.2f}, {t_iv[1]:.2f}] over {len(x)} subsets): do not trust "
                       f"stage 1's ranking of {size}-subsets on this data; prefer the validated ones.")
        out.append(SizeAgreement(size, len(x), tau, *(t_iv or (None, None)), rho, *(r_iv or (None, None)), warning))
    return out
