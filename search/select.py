"""Select: from per-candidate scores to a ranking, near-duplicate groups, ties and the best K-sets.

All pure functions of cached scores and features (no augmentation, no extraction here). Where
features are needed, a `features` loader (name -> that candidate's per-repeat features) may stand
in for the scores' own: the search's driver passes `SearchStore.load_features`, and every function
here loads one candidate at a time and drops it before the next (two for a near-duplicate
comparison), so the driver never holds every candidate's features (1.6 GB at the paper's scale).

Near-duplicates are judged from outputs, per image. For candidates a and b with repeats r, r',
and f_a^r(i) the features of image i under a's r-th draw:
    cross(a, b) = mean_{i, r} |f_a^r(i) - f_b^r(i)|^2       (different transforms, same image)
    spread(a)   = mean_{i, r<r'} |f_a^r(i) - f_a^r'(i)|^2    (two draws of the same transform)
For independent draws cross(a, b) = (spread(a) + spread(b)) / 2 + mean_i |m_a(i) - m_b(i)|^2,
m the per-image mean output. Two copies of one transform therefore have cross = spread(a) =
spread(b); different transforms raise cross above the smaller spread, either through their
means or through unequal spreads. Rule: near-duplicates iff cross(a, b) <= DUP_RATIO *
min(spread(a), spread(b)) (deterministic transforms, spread 0, group only with identical
outputs). Why not the FID between the two augmented sets: on rotation-invariant data such as
the crater fields every geometric transform keeps the set's distribution, so set-level FIDs
cannot tell Rotate from ThinPlateSpline (measured on builtin:craters, randconv features:
FID(Rotate, RandomAffine) / FID to originals = 0.09, Rotate vs ThinPlateSpline 0.11), while
the per-image rule gives 0.99 for Rotate/RandomAffine against >= 1.37 for every other pair
and 'never' for HorizontalFlip/VerticalFlip. It needs repeats >= 2 to measure spreads; with one
repeat only identical outputs are grouped.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from search.frechet import MixtureTable, Reference
from search.kid import FULL_KERNEL_MAX, kid_with_std
from search.scoring import CandidateScore, spread

DUP_RATIO = 1.15
SCREEN_RANK = 256     # above this reference rank, subsets are screened before exact scoring
EXACT_TOP = 32
SUBSET_KID_ROWS = 10  # subsets.csv rows (best FID first) that also get a mixture KID

# name -> that candidate's features, float32 (N, d) per repeat
FeatureLoader = Callable[[str], list[np.ndarray]]


def _loader(scores: Mapping[str, CandidateScore], features: FeatureLoader | None) -> FeatureLoader:
    """`features`, else the features the scores hold."""
    return features or (lambda name: scores[name].features)


def _repeats(score: CandidateScore) -> int:
    """Repeats of a score, with its features or without (one FID per repeat)."""
    return len(score.features) or len(score.fids)


@dataclass
class RankRow:
    rank: int
    augmentation: str
    fid: float
    fid_std: float
    mse: float
    kept: bool
    reason: str = ""                 # why not kept (MSE gate, near-duplicate)
    near_duplicate_of: str = ""      # the group's representative (best FID), for its other members
    tied_with: list[str] = field(default_factory=list)   # kept candidates whose fid ± fid_std overlap
    kid: float = float("nan")        # KID(augmented copy, originals), mean over repeats
    kid_std: float = float("nan")    # its spread over repeats

    def as_csv(self) -> dict:
        d = asdict(self)
        d["tied_with"] = " ".join(self.tied_with)
        return d


@dataclass
class SubsetRow:
    rank: int
    augmentations: tuple[str, ...]
    fid: float                       # mixture FID, mean over repeats
    fid_std: float
    fids: list[float]
    exact: bool = True               # False: a screened upper bound (see rank_subsets)
    kid: float = float("nan")        # mixture KID, mean over repeats (add_mixture_kids; nan: not computed)
    kid_std: float = float("nan")

    def as_csv(self) -> dict:
        return {"rank": self.rank, "augmentations": "+".join(self.augmentations), "fid": self.fid,
                "fid_std": self.fid_std, "fids": " ".join(f"{v:.6g}" for v in self.fids), "exact": self.exact,
                "kid": self.kid, "kid_std": self.kid_std}


def _matched_sq(x: np.ndarray, y: np.ndarray) -> float:
    d = x.astype(np.float64) - y.astype(np.float64)
    return float(np.einsum("ij,ij->i", d, d).mean())


def _per_repeat(x: CandidateScore | Sequence[np.ndarray]) -> Sequence[np.ndarray]:
    """A candidate's per-repeat features, from its score or as they are."""
    return x.features if isinstance(x, CandidateScore) else x


def output_spread(score: CandidateScore | Sequence[np.ndarray]) -> float:
    """Mean squared feature distance, per image, between two draws of the same candidate (its score,
    or its per-repeat features)."""
    f = _per_repeat(score)
    pairs = [_matched_sq(f[r], f[q]) for r in range(len(f)) for q in range(r + 1, len(f))]
    return float(np.mean(pairs)) if pairs else 0.0


def output_cross(a: CandidateScore | Sequence[np.ndarray], b: CandidateScore | Sequence[np.ndarray]) -> float:
    """Mean squared feature distance, per image, between a's and b's outputs (repeat by repeat)."""
    return float(np.mean([_matched_sq(x, y) for x, y in zip(_per_repeat(a), _per_repeat(b))]))


def near_duplicate_groups(scores: Mapping[str, CandidateScore], names: Sequence[str],
                          ratio: float = DUP_RATIO, features: FeatureLoader | None = None) -> dict[str, str]:
    """member -> representative for every candidate of `names` that joins a group. Greedy by FID:
    each candidate, best first, joins the first representative it duplicates (no chains). With a
    `features` loader, at most two candidates' features are held at once (the one placed, and the
    representative it is compared with)."""
    load = _loader(scores, features)
    order = sorted(names, key=lambda n: scores[n].fid)
    spreads: dict[str, float] = {}   # each from the one load of its candidate below (reps come first)
    reps: list[str] = []
    member_of: dict[str, str] = {}
    for n in order:
        own = load(n)
        spreads[n] = output_spread(own)
        # A tiny absolute floor so that two deterministic, identical transforms (spread 0) group.
        floor = 1e-12 * (1.0 + np.mean(np.square(own[0])))
        for rep in reps:
            if output_cross(own, load(rep)) <= ratio * min(spreads[n], spreads[rep]) + floor:
                member_of[n] = rep
                break
        else:
            reps.append(n)
        del own
    return member_of


def tied(rows: Sequence[RankRow]) -> None:
    """Fill `tied_with`: kept candidates whose intervals fid ± fid_std overlap."""
    kept = [r for r in rows if r.kept]
    for r in kept:
        r.tied_with = [o.augmentation for o in kept if o is not r
                       and abs(o.fid - r.fid) <= o.fid_std + r.fid_std and (o.fid_std + r.fid_std) > 0]


def rank_candidates(scores: Mapping[str, CandidateScore], mse_min: float, dedupe: bool,
                    dup_ratio: float = DUP_RATIO, features: FeatureLoader | None = None) -> list[RankRow]:
    """Kept candidates (MSE > mse_min, not a near-duplicate of a better one when `dedupe`) ranked by
    FID ascending, then the dropped ones in FID order. Near-duplicate groups are reported even when
    `dedupe` is off (then all members stay eligible)."""
    rows = {n: RankRow(0, n, s.fid, s.fid_std, s.mse, True, kid=s.kid, kid_std=s.kid_std) for n, s in scores.items()}
    for n, s in scores.items():
        if not (np.isfinite(s.fid) and np.isfinite(s.mse)):
            # A NaN score (a degenerate augmented set, a failed extraction) would sort anywhere.
            rows[n].kept, rows[n].reason = False, f"FID {s.fid} / MSE {s.mse} not finite (scoring failed)"
        elif not s.mse > mse_min:
            rows[n].kept, rows[n].reason = False, f"mse {s.mse:.4g} <= mse_min {mse_min:g} (near-identity)"
    passing = [n for n in scores if rows[n].kept]
    for member, rep in near_duplicate_groups(scores, passing, dup_ratio, features).items():
        rows[member].near_duplicate_of = rep
        if dedupe:
            rows[member].kept, rows[member].reason = False, f"near-duplicate of {rep} (lower FID)"
    ordered = sorted(rows.values(), key=lambda r: (not r.kept, r.fid if np.isfinite(r.fid) else np.inf, r.augmentation))
    for i, r in enumerate(ordered, start=1):
        r.rank = i
    tied(ordered)
    return ordered


def best_singles(rows: Sequence[RankRow], k: int) -> list[str]:
    """The published choice: the k kept candidates of lowest FID."""
    return [r.augmentation for r in rows if r.kept][:k]


def mixture_table(reference: Reference, scores: Mapping[str, CandidateScore], names: Sequence[str],
                  features: FeatureLoader | None = None) -> MixtureTable:
    """The table of `names` (in that order), built candidate by candidate: one candidate's features
    are loaded, turned into per-repeat statistics, and dropped before the next."""
    load = _loader(scores, features)
    table = MixtureTable(reference, candidates=len(names), repeats=_repeats(scores[names[0]]) if names else 0)
    for c, name in enumerate(names):
        feats = load(name)
        if len(feats) != table.repeats:
            raise ValueError(f"{name}: {len(feats)} repeats of features, the table has {table.repeats}")
        for rep in range(len(feats)):
            table.add(c, rep, reference.stats(feats[rep]))
        del feats   # no name left holding a repeat of it while the next one loads
    return table


def mixture_fid(table: MixtureTable, names: Sequence[str], subset: Sequence[str]) -> tuple[float, float]:
    """(mean, spread over repeats) of the FID of the originals plus one copy per `subset` member."""
    index = {n: i for i, n in enumerate(names)}
    fids = table.fids(np.array([[index[n] for n in subset]], dtype=np.int64).reshape(1, len(subset)))[0]
    return float(fids.mean()), spread(fids)


def mixture_kid(originals_features: np.ndarray, scores: Mapping[str, CandidateScore], subset: Sequence[str],
                max_rows: int = FULL_KERNEL_MAX, features: FeatureLoader | None = None) -> tuple[float, float]:
    """(mean, spread over repeats) of the KID of the expanded mixture (originals plus one copy per
    `subset` member, repeat r mixing the r-th copies) against the originals; (nan, nan) above
    `max_rows` mixture rows, where its kernel matrices stop being cheap (the FID table is not).
    Repeat by repeat: each member is loaded in turn and only its repeat-r rows are kept."""
    n = originals_features.shape[0] * (1 + len(subset))
    if n > max_rows or not subset:
        return float("nan"), float("nan")
    load = _loader(scores, features)
    repeats = min(_repeats(scores[a]) for a in subset)
    kids = []
    for r in range(repeats):
        rows = [originals_features]
        for a in subset:
            rows.append(np.array(load(a)[r]))   # a copy: the member's other repeats are not kept alive
        kids.append(kid_with_std(originals_features, np.concatenate(rows))[0])
        del rows
    return float(np.mean(kids)), spread(kids)


def add_mixture_kids(subsets: Sequence[SubsetRow], originals_features: np.ndarray,
                     scores: Mapping[str, CandidateScore], rows: int = SUBSET_KID_ROWS,
                     max_rows: int = FULL_KERNEL_MAX, features: FeatureLoader | None = None) -> int:
    """Fills `kid`/`kid_std` (mixture_kid) of the first `rows` exact subsets, in rank order; how many
    got one. Bounded by count: a mixture KID costs kernel matrices over every mixture row, so all
    C(M, K) subsets (thousands at the paper's 26 candidates) would outlast the whole of stage 1;
    the top rows are the ones a choice is made from. Above `max_rows` mixture rows none is computed."""
    done = 0
    for row in subsets:
        if done >= rows:
            break
        if not row.exact:
            continue
        row.kid, row.kid_std = mixture_kid(originals_features, scores, row.augmentations, max_rows, features)
        done += int(np.isfinite(row.kid))
        if not np.isfinite(row.kid):
            break   # every subset has the same size: none fits under max_rows
    return done


def rank_subsets(table: MixtureTable, names: Sequence[str], k: int, screen_rank: int = SCREEN_RANK,
                 exact_top: int = EXACT_TOP, max_exact: int = 4 * EXACT_TOP) -> list[SubsetRow]:
    """Every k-subset of `names` (the kept candidates, in `table`'s order) by mixture FID ascending;
    repeat r of a subset mixes the r-th copy of each member.

    Exact when the reference's rank is at most `screen_rank` (64 for random-conv features, or few
    images). Above it (Inception features of thousands of images: one 2048 x 2048 eigenvalue
    problem per mixture, ~0.5 s on a CPU core), every subset gets cheap bounds from the
    `screen_rank` leading directions (MixtureTable.bounds); subsets are then scored exactly in order
    of their lower bound until the `exact_top` best exact ones provably beat every remaining bound
    (or `max_exact` were scored). Exact rows come first; the others report their lower bound with
    `exact=False`."""
    if k > len(names):
        raise ValueError(f"search.k={k} is larger than the {len(names)} kept candidates ({', '.join(names)})")
    combos = np.array(list(itertools.combinations(range(len(names)), k)), dtype=np.int64).reshape(-1, k)
    exact = np.ones(len(combos), dtype=bool)
    if table.ref.rank > screen_rank and len(combos) > exact_top:
        lower, upper = table.bounds(combos, screen_rank)
        low = lower.mean(axis=1)
        fids, exact[:] = lower.copy(), False
        order = np.argsort(low, kind="stable")
        # Exact scores in order of the lower bound, until the exact_top best exact values cannot be
        # beaten by any bound left (then that top is certain), or max_exact evaluations were spent.
        done = 0
        while done < min(len(order), max_exact):
            batch = order[done:done + exact_top]
            fids[batch] = table.fids(combos[batch])
            exact[batch] = True
            done += len(batch)
            best = np.sort(fids[exact].mean(axis=1))[:exact_top]
            if done >= len(order) or (len(best) >= exact_top and best[-1] <= low[order[done]]):
                break
    else:
        fids = table.fids(combos)
    means = fids.mean(axis=1)
    order = np.lexsort((np.arange(len(combos)), means, ~exact))   # exact rows first, each part by FID
    return [SubsetRow(rank + 1, tuple(names[j] for j in combos[i]), float(means[i]), spread(fids[i]),
                      [float(v) for v in fids[i]], bool(exact[i])) for rank, i in enumerate(order)]


def screening_note(subsets: Sequence[SubsetRow], exact_top: int = EXACT_TOP) -> str:
    """A plain-words line when the screening of `rank_subsets` stopped at `max_exact` before it could
    prove its top: some subset left unscored has a lower bound below the exact_top-th exact FID, so
    it might belong in that top. "" when every subset is exact or the top is proven."""
    exact = sorted(s.fid for s in subsets if s.exact)[:exact_top]
    open_ = [s for s in subsets if not s.exact]
    if not open_ or not exact:
        return ""
    doubtful = [s for s in open_ if s.fid < exact[-1]]
    if not doubtful:
        return ""
    return (f"subset screening stopped at its limit of exact scores ({len([s for s in subsets if s.exact])} of "
            f"{len(subsets)} subsets scored exactly): {len(doubtful)} unscored subset(s) have a lower bound below the "
            f"{len(exact)}-th best exact FID {exact[-1]:.4g}, so the ranking's top {len(exact)} is not proven "
            f"(the best set may still be right; subsets.csv marks the unscored rows exact=False).")
