"""Stage 2's proposal space: one categorical over the valid subsets, so no trial is wasted.

A subset of the top-M kept candidates with 1..K members is one choice, named by its key
(`subset_key`: members in top-M order joined by "+"; "none" for the empty set). Optuna's TPE
samples the categorical directly, so every proposal is a valid subset (the former encoding, one
boolean per candidate, made about two thirds of proposals invalid at M=8, K=3). The empty set
and the controls are left out: they always run, with every seed, as controls.
"""
from __future__ import annotations

import itertools
from typing import Iterable, Sequence

NONE_KEY = "none"


def subset_key(subset: Iterable[str]) -> str:
    members = list(subset)
    return "+".join(members) if members else NONE_KEY


def members_of(key: str) -> tuple[str, ...]:
    return () if key == NONE_KEY else tuple(key.split("+"))


def in_order(subset: Iterable[str], order: Sequence[str]) -> tuple[str, ...]:
    """`subset`'s members in `order`'s order (one spelling per subset, whatever order it came in)."""
    wanted = set(subset)
    return tuple(n for n in order if n in wanted)


def valid_subsets(top: Sequence[str], k: int) -> list[tuple[str, ...]]:
    """Every subset of `top` with 1..k members: sum over j of C(M, j) choices."""
    return [c for size in range(1, k + 1) for c in itertools.combinations(top, size)]


def proposal_choices(top: Sequence[str], k: int, controls: Iterable[Iterable[str]] = ()) -> list[str]:
    """Keys of the valid subsets that are not already controls (those run anyway)."""
    taken = {frozenset(c) for c in controls}
    return [subset_key(s) for s in valid_subsets(top, k) if frozenset(s) not in taken]
