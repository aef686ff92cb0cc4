"""The evaluation protocol: its key, its JSON, the extractor hash and the version-tag format."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from torch import nn

from jobs.tracking.protocol import EvalProtocol, read_version_tags, version_tags, weights_hash
from models.metrics.extractors import RandConvExtractor

P = EvalProtocol(data_fingerprint="abc", split="all", real_seed=0, seed_base=1_000_000, num_samples=64,
                 extractors={"orbitgen-randconv64-v1": "00ff"})


def test_key_is_sha256_of_sorted_json_and_round_trips():
    text = json.dumps({"data_fingerprint": "abc", "extractors": {"orbitgen-randconv64-v1": "00ff"},
                       "num_samples": 64, "real_seed": 0, "seed_base": 1_000_000, "split": "all"},
                      separators=(",", ":"))
    assert P.to_json() == text
    assert P.key() == hashlib.sha256(text.encode()).hexdigest()[:12]
    assert EvalProtocol.from_json(P.to_json()) == P


def test_any_field_changes_the_key_and_differences_name_it():
    other = EvalProtocol(**{**json.loads(P.to_json()), "num_samples": 128})
    assert other.key() != P.key()
    assert P.differences(other) == ["num_samples: 64 vs 128"]
    assert P.differences(P) == []


def test_from_json_refuses_other_objects():
    with pytest.raises(ValueError, match="not an evaluation protocol"):
        EvalProtocol.from_json('{"fid": 1}')


def test_weights_hash_sees_buffers_and_every_weight():
    a = weights_hash(RandConvExtractor())
    assert a == weights_hash(RandConvExtractor())          # fixed-seed weights: same in every process
    net = nn.Linear(2, 2)
    before = weights_hash(net)
    with torch.no_grad():
        net.bias[0] += 1e-3
    assert weights_hash(net) != before and len(a) == 16


def test_version_tags_round_trip_and_drop_nan():
    tags = version_tags(P, {"fid": 1.25, "kid": float("nan")}, "run1") | {"unrelated": "x"}
    assert tags[f"orbitgen.eval.{P.key()}.fid"] == "1.25"
    assert read_version_tags(tags) == {P.key(): (P, {"fid": 1.25}, "run1")}


def test_precision_is_recorded_and_protocols_from_before_it_stay_equal():
    # A protocol recorded before the field existed (no "precision" key) was measured in fp32 on CPUs:
    # it reads back as fp32-highest, with the same key, so old version tags stay comparable.
    old_json = P.to_json()
    assert "precision" not in old_json
    old = EvalProtocol.from_json(old_json)
    assert old.precision == "fp32-highest" and old == P and old.key() == P.key()
    tf32 = EvalProtocol(**{**json.loads(old_json), "precision": "tf32"})
    assert json.loads(tf32.to_json())["precision"] == "tf32"
    assert tf32.key() != P.key() and P.differences(tf32) == ["precision: fp32-highest vs tf32"]
    assert EvalProtocol.from_json(tf32.to_json()) == tf32
    with pytest.raises(ValueError, match="not an evaluation protocol"):
        EvalProtocol.from_json(json.dumps({**json.loads(old_json), "extra": 1}))


def test_evaluation_runs_with_tf32_off_and_highest_matmul_precision_then_restores():
    from jobs.eval.core import fp32_highest

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              torch.get_float32_matmul_precision())
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
    torch.set_float32_matmul_precision("high")
    try:
        with fp32_highest():
            inside = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                      torch.get_float32_matmul_precision())
        assert inside == (False, False, "highest")
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.get_float32_matmul_precision()) == (True, True, "high")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]
        torch.set_float32_matmul_precision(before[2])


def test_score_part_extracts_features_under_fp32_highest(monkeypatch):
    import jobs.eval.core as core

    seen = []
    monkeypatch.setattr(core, "_score_part", lambda *a, **k: seen.append(
        (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision())))
    core.score_part(None, None, None, data_url="", positions=None, fake_starts=(), num_samples=0,
                    device=torch.device("cpu"))
    assert seen == [(False, "highest")]
