"""The search's driver at the paper's scale (issue 23 item 8: peak under 2 GB): the mixture table
built incrementally with its r x r matrices on disk gives today's FIDs, the ranking path holds one
candidate's features at a time (two for a near-duplicate comparison), and the originals are
featurised in small batches."""
from __future__ import annotations

import itertools
import os
import weakref

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from search.frechet import MixtureTable, Reference
from search.originals import EXTRACT_BATCH, extract
from search.scoring import CandidateScore, with_kids
from search.select import add_mixture_kids, mixture_kid, mixture_table, rank_candidates, rank_subsets
from search.set_matrices import SetMatrices
from search.store import SearchStore

C, R, D, N = 5, 3, 16, 60


def scipy_fid(x, y) -> float:
    """pytorch-fid's formula, independent of search.frechet."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2)
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * root.real))


@pytest.fixture(scope="module")
def sets():
    rng = np.random.default_rng(23)
    mix = rng.normal(size=(D, D)) / np.sqrt(D)
    orig = (rng.normal(size=(N, D)) @ mix).astype(np.float32)
    cands = [[(rng.normal(size=(N, D)) @ mix * (1 + 0.1 * r) + 0.2 * c).astype(np.float32) for r in range(R)]
             for c in range(C)]
    return orig, cands


def test_a_table_built_repeat_by_repeat_on_disk_gives_the_all_at_once_fids(sets):
    orig, cands = sets
    ref = Reference(orig)
    at_once = MixtureTable(ref, [[ref.stats(f) for f in per] for per in cands])   # in memory, as before
    assert not at_once.outer.on_disk
    built = MixtureTable(ref, candidates=C, repeats=R, memory_bytes=0)              # every matrix on disk
    assert built.outer.on_disk and os.path.isdir(built.outer.folder)
    for rep in range(R):                       # repeat by repeat: one repeat's statistics at a time
        for c in range(C):
            built.add(c, rep, ref.stats(cands[c][rep]))
    subsets = np.array(list(itertools.combinations(range(C), 3)))
    got, want = built.fids(subsets), at_once.fids(subsets)
    np.testing.assert_allclose(got, want, rtol=1e-9)
    np.testing.assert_allclose(built.fids(subsets, batch_bytes=1), want, rtol=1e-9)   # one subset a batch
    for row, subset in zip(got[:3], subsets[:3]):          # and against the formula on the features
        for rep in range(R):
            mixed = np.concatenate([orig, *(cands[c][rep] for c in subset)])
            assert row[rep] == pytest.approx(scipy_fid(orig, mixed), rel=1e-6)
    # The screening bounds read the leading block: the same from disk (cached or block by block).
    lo, up = at_once.bounds(subsets, 4)
    for budget in (0, 4096):   # nothing in memory; the 4 x 4 blocks (1.9 kB) but not the matrices (31 kB)
        t = MixtureTable(ref, [[ref.stats(f) for f in per] for per in cands], memory_bytes=budget)
        assert t.outer.on_disk
        blo, bup = t.bounds(subsets, 4)
        np.testing.assert_allclose(blo, lo, rtol=1e-9)
        np.testing.assert_allclose(bup, up, rtol=1e-9)
        t.close()
    folder = built.outer.folder
    built.close()
    assert not os.path.exists(folder)


def test_a_table_refuses_to_score_before_every_set_is_added(sets):
    orig, cands = sets
    ref = Reference(orig)
    table = MixtureTable(ref, candidates=2, repeats=R)
    table.add(0, 0, ref.stats(cands[0][0]))
    with pytest.raises(ValueError, match="never added"):
        table.fids(np.array([[0]]))


def test_set_matrices_sum_members_in_memory_and_on_disk():
    rng = np.random.default_rng(0)
    mats = rng.normal(size=(4, 2, 6, 6))
    members = np.array([[0, 2], [1, 3], [3, 3]])
    want = mats[members, 1].sum(1)
    for budget in (2**20, 0):
        held = SetMatrices(4, 2, 6, memory_bytes=budget)
        for c, rep in itertools.product(range(4), range(2)):
            held.put(c, rep, mats[c, rep])
        np.testing.assert_allclose(held.summed(members, 1, slice(None)), want, rtol=1e-15)
        np.testing.assert_allclose(held.summed(members, 1, slice(2, None)), want[:, 2:, 2:], rtol=1e-15)
        held.close()


class CountingLoader:
    """Stands in for SearchStore.load_features: fresh arrays on every call, like a read from disk,
    and at each call the number of candidates whose loaded arrays are still alive (weak references)."""

    def __init__(self, features: dict[str, list[np.ndarray]]):
        self.features, self.refs, self.most = features, [], 0

    def live(self) -> set[str]:
        return {name for name, ref in self.refs if ref() is not None}

    def __call__(self, name: str) -> list[np.ndarray]:
        out = [f.copy() for f in self.features[name]]
        self.refs += [(name, weakref.ref(f)) for f in out]
        self.most = max(self.most, len(self.live() | {name}))
        return out


def test_the_ranking_path_holds_one_candidates_features_at_a_time(sets):
    orig, cands = sets
    names = [f"c{i}" for i in range(C)]
    feats = {n: cands[i] for i, n in enumerate(names)}
    full = {n: with_kids(CandidateScore(n, [float(i)] * R, [0.1] * R, feats[n]), orig) for i, n in enumerate(names)}
    # What the driver now holds: the scores without features (as SearchStore.load_score(features=False)).
    lean = {n: CandidateScore(n, s.fids, s.mses, [], s.seconds, []) for n, s in full.items()}
    ref = Reference(orig)

    load = CountingLoader(feats)
    lean = {n: with_kids(s, orig, load) for n, s in lean.items()}
    assert load.most == 1 and all(lean[n].kids == pytest.approx(full[n].kids, rel=1e-12) for n in names)

    load = CountingLoader(feats)
    ranking = rank_candidates(lean, 0.02, dedupe=True, features=load)
    assert load.most <= 2      # a near-duplicate comparison: the candidate placed and one representative
    assert [r.as_csv() for r in ranking] == [r.as_csv() for r in rank_candidates(full, 0.02, dedupe=True)]

    load = CountingLoader(feats)
    table = mixture_table(ref, lean, names, load)
    assert load.most == 1
    subsets = rank_subsets(table, names, 2)
    want = rank_subsets(mixture_table(ref, full, names), names, 2)
    assert [(s.augmentations, s.fids) for s in subsets] == [(s.augmentations, s.fids) for s in want]

    load = CountingLoader(feats)
    assert add_mixture_kids(subsets, orig, lean, rows=3, features=load) == 3
    assert mixture_kid(orig, lean, ["c0", "c1"], features=load) == mixture_kid(orig, full, ["c0", "c1"])
    assert load.most == 1      # members loaded in turn, only one repeat of each kept
    add_mixture_kids(want, orig, full, rows=3)
    assert [(s.kid, s.kid_std) for s in subsets[:3]] == [(s.kid, s.kid_std) for s in want[:3]]


def test_the_store_reads_a_summary_without_features(tmp_path):
    store = SearchStore(str(tmp_path / "s"))
    feats = [np.full((4, 3), r, np.float32) for r in range(2)]
    store.save_score(CandidateScore("A", [1.0, 2.0], [0.1, 0.2], feats, 0.5, [0.01, 0.03]))
    lean = store.load_score("A", features=False)
    assert lean.features == [] and lean.fids == [1.0, 2.0] and lean.kids == [0.01, 0.03]
    np.testing.assert_array_equal(np.stack(store.load_features("A")), np.stack(feats))
    assert [f.tolist() for f in store.load_score("A").features] == [f.tolist() for f in feats]


class _Recording(nn.Module):
    """A linear 'extractor' that records the batch sizes it is given and whether autograd records."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 5)
        self.batches: list[int] = []
        self.grad = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        y = self.lin(x.float().flatten(1) / 255)
        self.grad.append(y.requires_grad)
        return y


def test_the_originals_are_featurised_in_small_batches_without_autograd():
    images = torch.randint(0, 256, (300, 3, 2, 2), dtype=torch.uint8)
    net = _Recording()
    out = extract(net, images)
    assert EXTRACT_BATCH <= 16 and max(net.batches) == EXTRACT_BATCH and sum(net.batches) == 300
    assert not any(net.grad)
    with torch.no_grad():
        want = net.lin(images.float().flatten(1) / 255).numpy()
    assert out.dtype == np.float32 and out.shape == (300, 5)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


class _Tracker:
    """The MLflow side of `_search`, recorded in memory (no server: this test is about the driver's arrays)."""

    experiment_id = "0"

    def child(self, trial, stage):
        return f"run-{trial}", False

    def has_metric(self, run_id, key):
        return False

    def log(self, *args, **kwargs):
        pass

    def finish(self, *args, **kwargs):
        pass

    def artifact(self, *args, **kwargs):
        pass


def test_the_search_driver_reads_each_candidates_features_from_the_store_one_at_a_time(tmp_path, monkeypatch):
    """`_search` on a store whose trials all finished (so stage 1 runs no Tune trial): every read of
    features is counted, and at each read at most one other candidate's are still alive (the
    near-duplicate pair); nothing loads a score with its features."""
    import search.run as run
    from search.config import load_config, resolve_candidates
    from search.context import SearchContext
    from search.originals import from_tensors
    from search.scoring import score_candidate
    from models.metrics.extractors import make_extractor

    images = torch.randint(0, 256, (24, 1, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    originals = from_tensors(images, None, "randconv")
    cfg = load_config({"k": 2, "repeats": 2, "candidates": ["Rotate", "HorizontalFlip", "VerticalFlip", "Invert"]})
    candidates = resolve_candidates(cfg, 1)
    store = SearchStore(str(tmp_path / "s"))
    ex = make_extractor("randconv")
    full = {n: score_candidate(n, originals, ex, 2, cfg.seed) for n in candidates}
    for score in full.values():
        store.save_score(score)

    live: list[tuple[str, weakref.ref]] = []
    most = {"features": 0}
    real_features, real_score = SearchStore.load_features, SearchStore.load_score

    def counted_features(self, name):
        out = real_features(self, name)
        live.extend((name, weakref.ref(f)) for f in out)
        most["features"] = max(most["features"], len({n for n, r in live if r() is not None} | {name}))
        return out

    def lean_only(self, name, features=True):
        assert not features, f"the driver loaded {name}'s score with its features"
        return real_score(self, name, features)

    monkeypatch.setattr(SearchStore, "load_features", counted_features)
    monkeypatch.setattr(SearchStore, "load_score", lean_only)
    monkeypatch.setattr(run, "_ensure_ray", lambda: None)
    ctx = SearchContext(config=cfg, candidates=candidates, channels=1, originals=originals, extractor="randconv",
                        extractor_weights=None, store=store, tracker=_Tracker(), parent_run_id="parent", name="t")
    result = run._search(ctx)
    assert live and most["features"] <= 2
    # The same results as from the scores with their features in memory.
    ranking = rank_candidates(full, cfg.mse_min, cfg.dedupe)
    assert [r.as_csv() for r in result.ranking] == [r.as_csv() for r in ranking]
    kept = [r.augmentation for r in ranking if r.kept]
    want = rank_subsets(mixture_table(Reference(originals.features), full, kept), kept, cfg.k)
    add_mixture_kids(want, originals.features, full)
    assert [s.as_csv() for s in result.subsets] == [s.as_csv() for s in want]


def test_the_leak_check_reads_its_members_one_at_a_time():
    from search.validate import _ReadWhenAsked, leak_check

    rng = np.random.default_rng(5)
    orig, samples = rng.normal(size=(120, 8)), rng.normal(size=(100, 8))
    feats = {n: [rng.normal(0.3 * i, size=(120, 8)) for _ in range(2)] for i, n in enumerate(["A", "B", "C"])}
    load = CountingLoader(feats)
    lazy = leak_check(samples, orig, _ReadWhenAsked(list(feats), load))
    assert lazy == leak_check(samples, orig, feats)
    assert load.most <= 2      # the member checked, and the previous one's loop variable until reassigned


def test_the_benchmarks_account_of_what_the_driver_now_holds():
    """benchmarks/mineaug_search.py `held_now_bytes` at the paper's scale, against sizes written out."""
    import importlib.util
    import sys

    path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "benchmarks", "mineaug_search.py")
    spec = importlib.util.spec_from_file_location("mineaug_search_driver_memory", path)
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    try:
        spec.loader.exec_module(bench)
        held = bench.held_now_bytes(2500, 256, 26, 3)
    finally:
        sys.modules.pop(spec.name, None)
    assert held["candidates' features, two at a time (all repeats)"] == 2 * 3 * 2500 * 2048 * 4
    assert held["mixture table r × r matrices in memory (else on disk)"] == 0        # 2.6 GB: on disk
    assert held["screening blocks cached (leading 256 × 256)"] == 78 * 256 * 256 * 8
    assert held["one scoring batch, two (B, r, r) arrays (at most)"] == 2 * 2**26
    assert sum(held.values()) < 0.6e9
