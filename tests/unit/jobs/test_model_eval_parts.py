"""The pieces of a distributed evaluation without Ray: merged suites equal one suite, the plan
cuts the work into disjoint batch-aligned ranges, and `evaluate_model` refuses bad input before
it starts anything."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from data_shards.errors import UserError
from data_shards.synthetic import crater_field
from data_shards.writer import write_shards
from jobs.eval.core import EvalSettings
from jobs.eval.distributed import plan
from jobs.eval.core import eval_split, feature_extractors, protocol_of, split_holdout
from jobs.eval.model import evaluate_model
from models.metrics.extractors import RandConvExtractor
from models.metrics.suite import METRICS, MetricSuite, named_for_weights
from models.registry import make_family
from models.snapshot import save_snapshot
from tiny_specs import tiny_model

RES = 16


def _images(n: int, channels: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, RES, RES), generator=g, dtype=torch.uint8)


def test_suites_of_the_parts_merge_into_the_suite_of_the_whole():
    fake, real, cond = _images(24, 3, 0), _images(24, 3, 1), _images(24, 3, 2)
    cuts = [(0, 8), (8, 12), (12, 24)]   # the batches of three workers, in order
    whole = MetricSuite(METRICS, extractor=RandConvExtractor())
    parts = [MetricSuite(METRICS, extractor=RandConvExtractor()) for _ in cuts]
    for part, (a, b) in zip(parts, cuts):
        for suite in (whole, part):
            suite.update(fake=fake[a:b], real=real[a:b], cond=cond[a:b])
    merged = MetricSuite(METRICS, extractor=RandConvExtractor())
    for part in parts:
        merged.merge(part.state())
    expected, got = whole.compute(), merged.compute()
    # pr gives precision and recall; without weights, `lpips` is computed as `perceptual_randconv`
    assert set(got) == set(expected) and len(got) == len(named_for_weights(METRICS)) + 1
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    assert merged.params() == whole.params()

    # The features' order counts: KID draws its subsets by index (here subsets of 10 of the 24).
    def kid(order) -> float:
        merged = MetricSuite(["kid"], extractor=RandConvExtractor())
        merged.kid.subset_size = 10
        for a, b in order:
            part = MetricSuite(["kid"], extractor=RandConvExtractor())
            part.update(fake=fake[a:b], real=real[a:b])
            merged.merge(part.state())
        return merged.compute()["kid"]

    one = MetricSuite(["kid"], extractor=RandConvExtractor())
    one.kid.subset_size = 10
    one.update(fake=fake, real=real)
    assert kid(cuts) == pytest.approx(one.compute()["kid"], rel=1e-6)
    assert kid(reversed(cuts)) != pytest.approx(one.compute()["kid"], rel=1e-6)


def test_the_plan_gives_each_batch_to_one_worker_in_order():
    positions = [np.arange(5), np.array([0, 2, 3, 6, 7, 8, 9]), np.arange(9)]
    settings = EvalSettings(metrics=("fid",), num_samples=30, batch=4)
    chunks = plan(positions, settings, conditional=False, workers=3)
    assert len(chunks) == 3 and all(chunks)
    flat = [c for worker in chunks for c in worker]
    reals = [np.concatenate([c.positions[s] for c in flat]) for s in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(reals, positions))          # every real once, in order
    assert [s for c in flat for s in c.fake_starts] == list(range(0, 30, 4))    # every seed batch once, in order
    sizes = [sum(len(p) for p in c.positions) for c in flat]
    assert all(n % 4 == 0 for n in sizes[:-1])                                  # cut at whole batches
    assert sum(c.images for c in flat) == 21 + 30
    # Conditional: no generated batches; more workers than batches leaves some idle.
    idle = plan(positions, settings, conditional=True, workers=9)
    assert sum(1 for w in idle if w) == 6 and not any(c.fake_starts for w in idle for c in w)


def test_the_split_names_read_back():
    cond = make_family("pix2pix", tiny_model("pix2pix"), resolution=RES, channels=3, lr=2e-4)
    uncond = make_family("dcgan", tiny_model("dcgan"), resolution=RES, channels=1, lr=2e-4)
    for holdout in (0.1, 5, None):
        assert split_holdout(eval_split(cond, holdout)) == holdout
    assert eval_split(uncond, 0.1) == "all"


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval-input")
    family = make_family("dcgan", tiny_model("dcgan"), resolution=RES, channels=1, lr=2e-4)
    torch.manual_seed(0)
    snapshot = tmp / "generator.pt"
    save_snapshot(snapshot, family, family.build()[family.sampler_role])
    url = str(tmp / "craters")
    write_shards(crater_field(12, RES, channels=1, seed=3), url, layout="synthetic:craters", resolution=RES,
                 channels=1, source="test", shard_samples=6, progress=False)
    rgb = str(tmp / "rgb")
    write_shards(crater_field(6, RES, channels=3, seed=3), rgb, layout="synthetic:craters", resolution=RES,
                 channels=3, source="test", shard_samples=6, progress=False)
    return family, snapshot, url, rgb, f"sqlite:///{tmp / 'no-store.db'}"


def test_bad_input_is_refused_before_anything_starts(model_and_data):
    family, snapshot, url, rgb, store = model_and_data
    refused = {
        "judged by": dict(model=str(snapshot), data_url=url, metrics=["lpips"]),
        "no snapshot file": dict(model=str(snapshot.parent / "nothing"), data_url=url),
        "give --data": dict(model=str(snapshot)),
        "3-channel": dict(model=str(snapshot), data_url=rgb),
        "2 or more": dict(model=str(snapshot), data_url=url, num_samples=1),
        "no MLflow store": dict(model="models:/nothing@champion"),
    }
    for message, kwargs in refused.items():
        with pytest.raises(UserError, match=message):
            evaluate_model(tracking_uri=store, log=False, **kwargs)
    assert not (snapshot.parent / "no-store.db").exists()   # reading never creates a store

    # Under another protocol: the data and the extractor must be the protocol's.
    used = feature_extractors(["fid"], extractor="randconv", inception_weights=None)
    like = protocol_of(used, family, data_url=url, num_samples=8, holdout=None)
    other_data = dataclasses.replace(like, data_fingerprint="0" * 64)
    with pytest.raises(UserError, match=f"the data at {url} is another data set"):
        evaluate_model(str(snapshot), tracking_uri=store, data_url=url, like=other_data, log=False)
    other_weights = dataclasses.replace(like, extractors={RandConvExtractor.name: "0" * 16})
    with pytest.raises(UserError, match="feature extractors differ"):
        evaluate_model(str(snapshot), tracking_uri=store, data_url=url, like=other_weights, log=False)
