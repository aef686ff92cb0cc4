"""Search trials that share a GPU (issue 24, item 12), tested without one: the share comes from the
trial's resources, the cap is set to it (CUDA stood in by monkeypatching `torch.cuda`) before the
work and the cache emptied after it, nothing happens without CUDA, and stage 1 moves the
originals to the device once per trial, not once per repeat."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import search.stage1 as stage1
import search.validate as validate
from search.gpu_share import cap_gpu_memory, gpu_share
from search.originals import from_tensors
from search.scoring import CandidateScore, score_candidate


@pytest.mark.parametrize("resources, share", [({"CPU": 1, "GPU": 0.25}, 0.25), ({"CPU": 2, "GPU": 0.5}, 0.5),
                                              ({"CPU": 1, "GPU": 0.0}, None), ({"CPU": 1}, None),
                                              ({"CPU": 1, "GPU": 1.0}, None), ({"CPU": 1, "GPU": 2.0}, None)])
def test_share_is_the_fractional_gpu_of_the_trials_resources(resources, share):
    assert gpu_share(resources) == share


def fake_cuda(monkeypatch, events: list, available: bool = True) -> None:
    """CUDA as `torch.cuda` reports it, the cap and the cache release recorded in `events`."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction",
                        lambda fraction, device=None: events.append(("cap", fraction)))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: events.append(("empty_cache",)))


def test_without_cuda_nothing_is_capped(monkeypatch):
    events: list = []
    fake_cuda(monkeypatch, events, available=False)
    assert cap_gpu_memory(0.25) is False and events == []
    with validate.trial_gpu_share({"CPU": 1, "GPU": 0.25}) as share:
        assert share == 0.25
    assert events == []


class _Store:
    def __init__(self):
        self.saved, self.json = [], {}

    def save_score(self, score):
        self.saved.append(score)

    def exists(self, *parts):
        return False

    def write_json(self, obj, *parts):
        self.json["/".join(parts)] = obj


def test_stage1_trial_caps_to_its_share_and_empties_the_cache_after(monkeypatch):
    events: list = []
    fake_cuda(monkeypatch, events)
    monkeypatch.setattr(stage1.ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(stage1.tune, "report", lambda metrics: events.append(("report",)))

    def score(name, originals, reference, extractor, weights, repeats, seed, device):
        events.append(("score", device))
        return CandidateScore(name, [1.0], [0.1], [np.zeros((2, 2), np.float32)], kids=[0.0])

    monkeypatch.setattr(stage1, "_score", score)
    store = _Store()
    payload = (None, None, "randconv", None, 1, 0, store, {"CPU": 1.0, "GPU": 0.25})
    stage1._trial({"candidate": "Rotate"}, payload)
    assert events == [("cap", 0.25), ("score", "cuda"), ("empty_cache",), ("report",)]
    assert [s.name for s in store.saved] == ["Rotate"]


def test_stage1_trial_on_a_whole_gpu_is_not_capped_but_still_releases(monkeypatch):
    events: list = []
    fake_cuda(monkeypatch, events)
    monkeypatch.setattr(stage1.ray, "get_gpu_ids", lambda: [0])
    monkeypatch.setattr(stage1.tune, "report", lambda metrics: None)
    monkeypatch.setattr(stage1, "_score", lambda name, *a: CandidateScore(name, [1.0], [0.1],
                                                                          [np.zeros((2, 2), np.float32)]))
    stage1._trial({"candidate": "Rotate"}, (None, None, "randconv", None, 1, 0, _Store(), {"CPU": 1.0, "GPU": 1.0}))
    assert events == [("empty_cache",)]


def test_stage2_trial_caps_the_proxy_training_and_empties_the_cache_after(monkeypatch, tmp_path):
    events: list = []
    fake_cuda(monkeypatch, events)
    monkeypatch.setattr(validate.tune, "report", lambda metrics: events.append(("report",)))
    monkeypatch.setattr(validate.tune, "get_context",
                        lambda: type("Ctx", (), {"get_trial_dir": lambda self: str(tmp_path)})())

    def train_fn(augmentations, budget, report, trial_dir, *, seed, policy):
        events.append(("train", tuple(augmentations), seed))
        return {"fid": 3.0}

    store = _Store()
    payload = (train_fn, ["Rotate", "Invert"], 8, store, "randconv", None, {"CPU": 1.0, "GPU": 0.5}, 11)
    validate._trial({"subset": "Rotate"}, payload)
    assert events == [("cap", 0.5), ("train", ("Rotate",), 11), ("report",), ("empty_cache",)]
    (record,) = store.json.values()
    assert record["fid"] == 3.0 and record["seed"] == 11


class _CountsDeviceMoves(torch.Tensor):
    """Counts `.to(<device>)` calls on one watched tensor (the originals' pixels); dtype-only
    conversions are not transfers and are not counted."""

    watched: torch.Tensor | None = None
    moves = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and args and args[0] is cls.watched:
            if "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args[1:]):
                cls.moves += 1
        return super().__torch_function__(func, types, args, kwargs)


def test_stage1_moves_the_originals_once_per_trial(monkeypatch):
    images = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    originals = from_tensors(images, None, _Extractor())
    watched = originals.images.as_subclass(_CountsDeviceMoves)
    originals.images = _CountsDeviceMoves.watched = watched
    _CountsDeviceMoves.moves = 0
    # The augmentation itself is beside the point: a plain copy of what it was given.
    monkeypatch.setattr("search.scoring.apply_uint8",
                        lambda name, imgs, channels, seed: imgs.as_subclass(torch.Tensor).clone())
    score = score_candidate("Rotate", originals, _Extractor(), repeats=4, search_seed=0, device="cpu")
    assert len(score.fids) == 4
    assert _CountsDeviceMoves.moves == 1   # 4 on the former code: one per repeat


class _Extractor(torch.nn.Module):
    """Features of (N, 4): the first pixels, as floats (enough for FID's statistics on 6 images)."""

    name = "first-pixels"

    def forward(self, x):
        return x.flatten(1)[:, :4].float() + torch.arange(4.0)
