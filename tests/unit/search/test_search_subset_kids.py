"""subsets.csv carries each top K-set's mixture KID beside its mixture FID (issue 23, leftover of
item 7): the values against models.metrics.kid on the concatenated mixture, the count bound, and
the columns."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.metrics.kid import kid_from_features
from search.frechet import Reference
from search.run import SUBSET_COLUMNS
from search.scoring import CandidateScore
from search.select import add_mixture_kids, mixture_table, rank_subsets

NAMES = ["A", "B", "C", "D"]


@pytest.fixture(scope="module")
def ranked():
    rng = np.random.default_rng(4)
    orig = rng.normal(size=(40, 6)).astype(np.float32)
    scores = {n: CandidateScore(n, [0.0, 0.0], [0.1, 0.1],
                                [rng.normal(0.15 * i, size=(40, 6)).astype(np.float32) for _ in range(2)])
              for i, n in enumerate(NAMES)}
    ref = Reference(orig)
    subsets = rank_subsets(mixture_table(ref, scores, NAMES), NAMES, 2)
    return orig, scores, subsets


def direct_kid(orig, scores, subset) -> tuple[float, float]:
    """Mean and sample spread over repeats of models.metrics.kid on originals + one copy per member."""
    kids = [kid_from_features(torch.tensor(orig), torch.tensor(np.concatenate([orig, *(scores[a].features[r]
                                                                                       for a in subset)])))
            for r in range(2)]
    return float(np.mean(kids)), float(np.std(kids, ddof=1))


def test_the_top_rows_get_the_kid_of_their_mixture(ranked):
    orig, scores, subsets = ranked
    rows = [type(s)(**vars(s)) for s in subsets]   # fresh copies: the fixture is shared
    assert add_mixture_kids(rows, orig, scores, rows=2) == 2
    for row in rows[:2]:
        assert (row.kid, row.kid_std) == pytest.approx(direct_kid(orig, scores, row.augmentations), rel=1e-9)
    assert all(np.isnan(r.kid) and np.isnan(r.kid_std) for r in rows[2:])   # bounded by count
    assert len(rows) == 6   # C(4, 2): the bound is what left the last four out


def test_no_kid_above_the_row_cap(ranked):
    orig, scores, subsets = ranked
    rows = [type(s)(**vars(s)) for s in subsets]
    assert add_mixture_kids(rows, orig, scores, rows=10, max_rows=100) == 0   # 40 x (1 + 2) = 120 rows
    assert all(np.isnan(r.kid) for r in rows)


def test_subsets_csv_has_kid_beside_fid_after_the_former_columns(ranked):
    orig, scores, subsets = ranked
    row = type(subsets[0])(**vars(subsets[0]))
    add_mixture_kids([row], orig, scores, rows=1)
    assert SUBSET_COLUMNS[:6] == ("rank", "augmentations", "fid", "fid_std", "fids", "exact")
    assert SUBSET_COLUMNS[6:] == ("kid", "kid_std")
    csv_row = row.as_csv()
    assert set(SUBSET_COLUMNS) <= set(csv_row)
    assert csv_row["kid"] == pytest.approx(direct_kid(orig, scores, row.augmentations)[0], rel=1e-9)
