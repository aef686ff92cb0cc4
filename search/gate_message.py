"""The message of a search whose MSE gate left fewer candidates than `search.k`.

On smooth images (lunar tiles at 64²) flips change pixels by MSE ≈ 0.015, below the 0.02 gate, so
a search can end with fewer kept candidates than K after every trial ran. The message names what
the gate dropped and at what MSE, and gives the command that reuses every finished trial (a resumed
search reruns none of them; only the ranking is made again).
"""
from __future__ import annotations

import math
from typing import Sequence

from search.select import RankRow


def suggested_mse_min(mses: Sequence[float], needed: int) -> float | None:
    """A gate just below the `needed`-th largest of `mses` (3 significant figures, rounded down), so
    that `needed` of them pass; None if there are fewer than `needed`, or the needed one is 0."""
    ordered = sorted(mses, reverse=True)
    if needed < 1 or len(ordered) < needed or ordered[needed - 1] <= 0:
        return None
    target = ordered[needed - 1]
    scale = 10 ** (math.floor(math.log10(target)) - 2)
    value = math.floor(target / scale) * scale
    if value >= target:   # exactly on the grid: one step lower, since the gate keeps MSE > mse_min
        value -= scale
    return float(f"{value:.3g}")


def too_few_kept(ranking: Sequence[RankRow], k: int, mse_min: float, search_name: str) -> str:
    kept = [r.augmentation for r in ranking if r.kept]
    gated = sorted((r for r in ranking if r.mse <= mse_min), key=lambda r: -r.mse)
    duplicates = [r for r in ranking if not r.kept and r.mse > mse_min]
    parts = [f"search.k: {k} is more than the {len(kept)} kept candidate(s) ({', '.join(kept) or 'none'})."]
    if gated:
        parts.append("The MSE gate (search.mse_min=" + f"{mse_min:g}) dropped "
                     + ", ".join(f"{r.augmentation} (MSE {r.mse:.4g})" for r in gated) + ".")
    if duplicates:
        parts.append("Dropped as near-duplicates: " + ", ".join(f"{r.augmentation} (of {r.near_duplicate_of})"
                                                               for r in duplicates) + " (search.dedupe=false keeps them).")
    value = suggested_mse_min([r.mse for r in gated], k - len(kept))
    if value is not None:
        parts.append(f"To keep {k - len(kept)} more and reuse every finished trial: orbitgen search mineaug SPEC "
                     f"--resume {search_name} --set search.mse_min={value:g}")
    else:
        parts.append("Lower search.k, or lower search.mse_min and resume with --resume " + search_name + ".")
    return " ".join(parts)
