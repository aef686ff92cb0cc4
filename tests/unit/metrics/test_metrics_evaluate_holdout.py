"""Which reals `jobs.eval.core` scores: a conditional family only the held-out split (when
`data.holdout` is set), an unconditional one a seeded draw from the whole set, never the first N."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import jobs.eval.core
from data_shards.sources import Sample
from data_shards.split import holdout_split, shard_keys
from data_shards.stream import iterate_once
from data_shards.writer import write_shards
from jobs.eval.core import EvalSettings, evaluate, preview, real_samples
from models.metrics.suite import MetricSuite
from models.registry import make_family
from tiny_specs import tiny_model

RES, N, CLASSES = 16, 60, 4
CPU = torch.device("cpu")


def value_of(i: int) -> int:
    """Every pixel of sample i's target holds this value, so a scored image names its sample."""
    return 4 * i + 3


@pytest.fixture(scope="module")
def class_sorted(tmp_path_factory):
    """60 (cond, image) pairs written class by class (as class-folder sets are): keys c{class}-{i}."""
    samples = []
    for i in range(N):
        image = np.full((RES, RES, 3), value_of(i), np.uint8)
        samples.append(Sample(key=f"c{i * CLASSES // N}-{i:03d}", image=image, cond=255 - image, cls=i * CLASSES // N))
    url = str(tmp_path_factory.mktemp("shards") / "sorted")
    write_shards(samples, url, layout="test", resolution=RES, channels=3, source="test", shard_samples=7,
                 progress=False)
    return url


class Identity(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x[:, :3] + 0 * self.w


def family(name: str):
    return make_family(name, tiny_model(name), resolution=RES, channels=3, lr=2e-4)


def keys_of(url, positions) -> set[str]:
    keys = shard_keys(url)
    return {keys[s][i] for s, idx in enumerate(positions) for i in idx}


def scored_samples(monkeypatch, run) -> list[int]:
    """The sample numbers of the real images the metric suite was given while `run()` ran."""
    seen: list[int] = []

    class Recording(MetricSuite):
        def update(self, *, fake=None, real=None, cond=None):
            if real is not None:
                seen.extend(int(v - 3) // 4 for v in real[:, 0, 0, 0].tolist())
            return super().update(fake=fake, real=real, cond=cond)

    monkeypatch.setattr(jobs.eval.core, "MetricSuite", Recording)
    run()
    return seen


def number(key: str) -> int:
    return int(key.rsplit("-", 1)[1])


def test_a_conditional_family_is_scored_on_the_held_out_pairs_only(class_sorted, monkeypatch):
    fam = family("pix2pix")
    held = {number(k) for k in keys_of(class_sorted, holdout_split(class_sorted, 0.2).held_out)}
    assert 0 < len(held) < 30
    scored = scored_samples(monkeypatch, lambda: evaluate(
        fam, Identity(), EvalSettings(num_samples=100, batch=8, metrics=("l1",), holdout=0.2), data_url=class_sorted,
        device=CPU))
    assert sorted(scored) == sorted(held)   # all of the held-out pairs (fewer than num_samples), nothing else
    few = scored_samples(monkeypatch, lambda: evaluate(
        fam, Identity(), EvalSettings(num_samples=3, batch=8, metrics=("l1",), holdout=0.2), data_url=class_sorted,
        device=CPU))
    assert len(few) == 3 and set(few) <= held


def test_the_conditional_preview_shows_held_out_pairs(class_sorted):
    fam = family("pix2pix")
    held = {value_of(number(k)) for k in keys_of(class_sorted, holdout_split(class_sorted, 0.2).held_out)}
    strips = preview(fam, Identity(), data_url=class_sorted, n=64, seed=0, device=CPU, holdout=0.2)
    targets = {int(v) for v in strips[:, 0, -1, 0]}   # the target is the strip's last image
    assert len(strips) == min(len(held), 16) and targets <= held


def test_without_a_holdout_a_conditional_family_is_scored_on_a_seeded_draw(class_sorted):
    fam = family("pix2pix")
    first = [k for b in real_samples(fam, class_sorted, 10, 4) for k in b["__key__"]]
    assert first == [k for b in real_samples(fam, class_sorted, 10, 4) for k in b["__key__"]]
    assert len({k.split("-")[0] for k in first}) > 1   # not the first class's pairs


def test_the_unconditional_reference_is_a_seeded_draw_from_every_class(class_sorted, monkeypatch):
    fam = family("dcgan")
    first_n = [number(k) for b in iterate_once(class_sorted, batch_size=15, limit=15) for k in b["__key__"]]

    def run():
        torch.manual_seed(0)
        return evaluate(fam, fam.build()["G"], EvalSettings(num_samples=15, batch=8, holdout=0.2),
                        data_url=class_sorted, device=CPU)

    once, again = scored_samples(monkeypatch, run), scored_samples(monkeypatch, run)
    assert once == again and len(once) == 15 and len(set(once)) == 15   # the same reals on every call
    assert sorted(once) != first_n   # not the first 15 in manifest order (all of class 0)
    assert len({i * CLASSES // N for i in once}) > 1
    # Drawn from the whole set, whatever data.holdout says: the params record it.
    _, params = run()
    assert params["eval_split"] == "all" and params["eval_real_seed"] == str(jobs.eval.core.REAL_SEED)
