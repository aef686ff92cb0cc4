"""The model card's markdown (`registry.model_card`) from a version's facts, without a store: every
fact in its place, table cells that cannot break the table, and a card that fits MLflow's 5000
characters however many evaluations the version has. (Against a real server, registered as
training registers: tests/integration/test_model_card.py.)"""
from __future__ import annotations

from jobs.tracking.promotion import Evaluation
from jobs.tracking.protocol import EvalProtocol
from jobs.tracking.registry import CARD_MAX_CHARS, model_card


def facts(evaluations) -> dict:
    return {"name": "m", "version": "3", "spec_name": "quickstart", "spec_sha": "5bec5bec5bec5bec",
            "git_sha": "abc123", "git_dirty": True, "data_url": "s3://b/a|b", "data_fingerprint": "f" * 64,
            "augmentations": ["HorizontalFlip"], "augment": {"ada": {"target": 0.6}}, "search_run": "s1",
            "run_id": "r1", "run_link": "http://h/#/experiments/1/runs/r1", "sample_grid": "runs:/r1/samples/g.png",
            "tracking_uri": "http://h", "built_on": {"stage1_from": {"ref": "models:/s1@champion", "name": "s1",
                                                                     "version": "2"}},
            "card_evaluations": evaluations,
            "reproduce": ["git checkout abc123", "orbitgen train spec.yaml"]}


def protocol(n: int) -> EvalProtocol:
    return EvalProtocol("f" * 64, "all", 0, 1_000_000, n, {"orbitgen-randconv64-v1": "00ff00ff00ff00ff"})


def test_every_fact_is_in_its_place():
    text = model_card(facts([Evaluation(protocol(64), {"fid": 1.5}, "e1"), Evaluation(None, {"fid": 9.0}, "r1")]))
    for fact in ("# m v3", "`quickstart`, sha `5bec5bec5bec5bec`", "`abc123` (work tree had uncommitted changes)",
                 "`s3://b/a\\|b`", "MineAug: HorizontalFlip; ADA: {\"target\": 0.6}", "`s1`",
                 "http://h/#/experiments/1/runs/r1", "`runs:/r1/samples/g.png`",
                 "model.stage1_from: `models:/s1@champion` = s1 v2", f"`{protocol(64).key()}`", "64 samples",
                 "| 1.5 |", "none recorded", "```bash\ngit checkout abc123\norbitgen train spec.yaml\n```"):
        assert fact in text, fact
    assert "none yet" in model_card(facts([]))


def test_a_card_with_many_evaluations_fits_and_says_how_many_it_left_out():
    many = [Evaluation(protocol(100 + i), {"fid": float(i), "kid": 0.1, "ssim": 0.5}, f"e{i}") for i in range(60)]
    text = model_card(facts(many))
    assert len(text) <= CARD_MAX_CHARS
    shown = sum(1 for line in text.splitlines() if line.startswith("| `") and " samples, " in line)
    assert 0 < shown < 60 and f"{60 - shown} more evaluations" in text
    assert text.rstrip().endswith("set them again before training.")   # the reproduce section is kept
