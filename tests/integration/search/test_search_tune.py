"""Stage 1 and stage 2 on real Ray Tune (and Optuna), logged to a real (sqlite) MLflow store.

Small: 96 crater images at 32², a handful of candidates, 2 CPUs.
"""
import sys

import numpy as np
import pytest
import ray.cloudpickle
import torch
from mlflow.tracking import MlflowClient

from data_shards.synthetic import crater_field
from models.augment.pool import apply_uint8
from models.metrics.extractors import make_extractor
from models.metrics.fid import frechet_distance
from search.config import SearchConfigError
from search.frechet import Reference
from search.originals import from_tensors
from search.run import run_search
from search.scoring import score_candidate
from search.select import rank_candidates
from search.tracking import TAG_CHOSEN, TAG_PARENT, TAG_TRIAL, read_ranking, show_search

# The fake train_fn below travels to Tune's workers by value (this module is not importable there).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

NAMES = ["HorizontalFlip", "VerticalFlip", "Rotate", "RandomAffine", "Invert", "Shear"]


def craters(n, res):
    samples = list(crater_field(n, res, 1, seed=0))
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).contiguous()
    return images, [s.key for s in samples]


@pytest.fixture(scope="module")
def originals():
    return from_tensors(*craters(96, 32), "randconv")


def search(tmp_path, originals, name="s1", **kw):
    cfg = {"k": 2, "candidates": NAMES, "repeats": 2, "concurrency": 2, **kw.pop("config", {})}
    return run_search(originals, channels=1, config=cfg, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                      experiment="search-test", name=name, storage=str(tmp_path / name), **{"progress": None, **kw})


def test_stage1_on_tune_equals_serial_and_is_tracked(ray_local, tmp_path, originals):
    result = search(tmp_path, originals)
    # The same scores computed serially, in this process, with the same seeds.
    ref, ex = Reference(originals.features), make_extractor("randconv")
    serial = {n: score_candidate(n, originals, ex, 2, 0, ref) for n in NAMES}
    expected = rank_candidates(serial, 0.02, dedupe=True)
    assert [r.augmentation for r in result.ranking] == [r.augmentation for r in expected]
    for got, want in zip(result.ranking, expected):
        assert got.fid == pytest.approx(want.fid, rel=1e-5) and got.mse == pytest.approx(want.mse, rel=1e-6)
        assert (got.kept, got.near_duplicate_of) == (want.kept, want.near_duplicate_of)
    assert sorted(result.stage1_ran) == sorted(NAMES) and result.stage1_reused == []
    assert result.chosen == result.best_set and len(result.chosen) == 2

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[TAG_CHOSEN] == ",".join(result.chosen)
    assert "NOT the paper's" in parent.data.tags["orbitgen.search.features"]   # randconv features, said so
    assert result.chosen_rule.startswith("search.select=sets")
    children = client.search_runs([parent.info.experiment_id], f"tags.`{TAG_PARENT}` = '{result.parent_run_id}'")
    assert sorted(c.data.tags[TAG_TRIAL] for c in children) == sorted(NAMES)
    for c in children:
        assert c.data.params["candidate"] == c.data.tags[TAG_TRIAL] and c.data.params["repeats"] == "2"
        assert {"fid", "fid_std", "kid", "kid_std", "mse", "kept"} <= set(c.data.metrics)   # KID beside FID
    arts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"ranking.csv", "subsets.csv", "fid_bar.png", "contact_sheet.png", "summary.json"} <= arts
    rows, _ = read_ranking(result.parent_run_id, f"sqlite:///{tmp_path}/mlflow.db")
    assert [r["augmentation"] for r in rows] == [r.augmentation for r in result.ranking]
    assert float(rows[0]["fid"]) == pytest.approx(result.ranking[0].fid, rel=1e-5)
    from PIL import Image
    png = client.download_artifacts(result.parent_run_id, "contact_sheet.png", str(tmp_path))
    assert Image.open(png).size[1] > 72 * len(NAMES)
    text = show_search(result.parent_run_id, f"sqlite:///{tmp_path}/mlflow.db")
    assert all(n in text for n in NAMES) and "chosen (search.select=sets: " in text and "NOT the paper" in text

    # Resuming a finished search reruns nothing and makes no second child run.
    lines = []
    again = search(tmp_path, originals, resume=True, progress=lines.append)
    assert again.stage1_ran == [] and sorted(again.stage1_reused) == sorted(NAMES)
    counts = [line.split("]")[0].split("[")[1] for line in lines if line.startswith("  [")]
    assert counts and all(c.split("/")[0].strip() == str(len(NAMES)) for c in counts)   # never [7/6]
    assert again.parent_run_id == result.parent_run_id and again.chosen == result.chosen
    children = client.search_runs([parent.info.experiment_id], f"tags.`{TAG_PARENT}` = '{result.parent_run_id}'")
    assert len(children) == len(NAMES)
    # Starting a new search over the stored one is refused; a changed config cannot resume it.
    with pytest.raises(SearchConfigError, match="already holds a search"):
        search(tmp_path, originals)
    with pytest.raises(SearchConfigError, match=r"^search\.repeats"):
        search(tmp_path, originals, resume=True, config={"repeats": 3})


def test_bad_input_fails_before_anything_is_written(tmp_path, originals):
    for cfg, field in (({"k": 9}, "search.k"), ({"candidates": ["Rotate", "RGBShift"]}, "search.candidates"),
                       ({"validate": {"top_m": 3, "trials": 2, "budget_steps": 2}}, "search.validate.top_m")):
        with pytest.raises(SearchConfigError, match=rf"^{field}"):
            search(tmp_path, originals, name="bad", config=cfg)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "mlflow.db").exists()


def test_k_above_the_kept_candidates(ray_local, tmp_path, originals):
    with pytest.raises(SearchConfigError, match=r"^search\.k: 3 is more than the 2 kept"):
        search(tmp_path, originals, name="k3", config={"k": 3, "candidates": ["HorizontalFlip", "Invert", "Shear"]})


def fake_train(augmentations, budget_steps, report, trial_dir, *, seed=0, policy="expand"):
    """A test double for a proxy training: the 'generator' reproduces its training set (the
    originals plus one copy per augmentation) blurred toward the set's mean, less with every step
    and with more data. Real augmentations, real FID against the originals. (The trivial policy is
    stood in for by the expansion of the same list.)"""
    images, _ = craters(96, 32)
    ex = make_extractor("randconv")
    expanded = torch.cat([images] + [apply_uint8(a, images, 1, 1234 + i + 100 * seed)
                                     for i, a in enumerate(augmentations)])
    mean = expanded.float().mean(0, keepdim=True)
    fid = None
    for step in range(1, budget_steps + 1):
        w = 1.0 / (1 + step * (1 + len(augmentations)))
        samples = ((1 - w) * expanded.float() + w * mean).round().clamp(0, 255).to(torch.uint8)
        fid = frechet_distance([images], [samples], ex)
        report(step, fid)
    return {"fid": fid, "samples": samples}


def test_stage2_runs_controls_and_optuna_proposals(ray_local, tmp_path, originals):
    cfg = {"k": 2, "candidates": ["HorizontalFlip", "VerticalFlip", "Invert", "Rotate"], "repeats": 2,
           "concurrency": 1, "validate": {"top_m": 3, "trials": 2, "budget_steps": 4, "seeds": 1}}
    result = search(tmp_path, originals, name="v", config=cfg, train_fn=fake_train)
    v = result.validation
    assert v is not None and v.reason and result.reason.startswith("stage 2:")
    controls = {r.key: r for r in v.runs if r.role == "control"}
    assert {"none", "trivial"} <= set(controls) and all(r.status == "finished" for r in controls.values())
    for r in v.runs:
        assert r.seed == 0 and (len(r.augmentations) <= 2 or r.policy == "trivial")   # trivial: every kept one
        if r.status == "stopped":
            assert r.fid is None and len(r.steps) < 4   # never scored as if it had finished
        if r.status == "finished" and r.policy == "expand" and r.augmentations:
            assert r.fid == pytest.approx(r.fids[-1]) and r.proxy_fid is not None
    # One seed: no noise estimate, so no winner; the spec keeps search.select's choice and says why.
    assert v.winner is None and result.chosen == result.best_set and "one seed" in result.verdict
    assert v.leak_report.get("checked") in (True, False)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(result.parent_run_id)
    assert parent.data.tags["orbitgen.search.verdict"] == result.verdict
    arts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"verdict.csv", "rungs.csv", "rank_agreement.csv", "optuna_history.png"} <= arts
    children = client.search_runs([result.experiment_id], f"tags.`{TAG_PARENT}` = '{result.parent_run_id}'")
    stage2 = [c for c in children if c.data.tags[TAG_TRIAL].startswith("validate:")]
    assert {c.data.tags[TAG_TRIAL] for c in stage2} == {f"validate:{r.key}@seed{r.seed}" for r in v.runs}
    assert all(c.data.params["seed"] == "0" for c in stage2)
