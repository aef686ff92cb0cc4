"""Promotion semantics on a real (sqlite) MLflow registry: champion moves only to a version that is
better under a common evaluation protocol, by the margin; rollback walks the champion history."""
from __future__ import annotations

import json
from dataclasses import replace

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from data_shards.errors import UserError
from jobs.tracking import registry_lock
from jobs.tracking.protocol import TAG_CHAMPION_HISTORY, TAG_RUN_PROTOCOL, EvalProtocol, version_tags
from jobs.tracking.registry import champion_history, list_models, previous_champion, promote, rollback
from jobs.tracking.runs import ensure_experiment

P = EvalProtocol(data_fingerprint="f00d" * 4, split="all", real_seed=0, seed_base=1_000_000, num_samples=64,
                 extractors={"orbitgen-randconv64-v1": "00ff00ff00ff00ff"})
P128 = replace(P, num_samples=128)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating one takes seconds); each test has its own model."""
    folder = tmp_path_factory.mktemp('registry')
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.set_experiment(experiment_id=ensure_experiment(uri, "promotion", folder / "artifacts"))
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(None)


class Model:
    """One test's registered model in the shared store."""

    def __init__(self, client: MlflowClient, name: str):
        self.client, self.name = client, name
        client.create_registered_model(name)

    def version(self, scores=None, protocol=P, *, run_metrics=None, run_protocol=None) -> str:
        """A new version: `scores` recorded on its tags under `protocol` (as training and `orbitgen
        eval` do); `run_metrics` only on its run (a version from before protocols), with the run's
        protocol tag when `run_protocol` is given."""
        with mlflow.start_run() as run:
            for m, v in (run_metrics or {}).items():
                mlflow.log_metric(m, v)
            if run_protocol is not None:
                mlflow.set_tag(TAG_RUN_PROTOCOL, run_protocol.to_json())
            mlflow.log_text("weights", "generator/MLmodel")
        tags = version_tags(protocol, scores, run.info.run_id) if scores else {}
        return str(self.client.create_model_version(self.name, f"runs:/{run.info.run_id}/generator",
                                                    run.info.run_id, tags=tags).version)

    def aliases(self) -> dict[str, str]:
        return {a: str(v) for a, v in self.client.get_registered_model(self.name).aliases.items()}


@pytest.fixture
def g(store, request):
    return Model(store, request.node.name.removeprefix("test_")[:60])


def test_champion_moves_only_to_a_better_version_and_history_follows(g):
    v1 = g.version({"fid": 5.0})
    assert promote(g.name, metric="fid", mode="min", candidate=v1, client=g.client).promoted
    v2 = g.version({"fid": 7.0})
    p = promote(g.name, metric="fid", mode="min", candidate=v2, client=g.client)
    assert not p.promoted and "does not beat" in p.reason
    assert g.aliases() == {"champion": v1, "challenger": v2}
    v3 = g.version({"fid": 3.0})
    assert promote(g.name, metric="fid", mode="min", candidate=v3, client=g.client).promoted
    assert g.aliases()["champion"] == v3
    assert champion_history(g.client, g.name) == [v1, v3] and previous_champion(g.client, g.name) == v1


def test_margin_is_relative_to_the_champion_and_inclusive(g):
    """--min-improvement 0.02: FID 4.9 against 5.0 is exactly 2% better and wins; 4.91 is not."""
    v1 = g.version({"fid": 5.0})
    promote(g.name, metric="fid", mode="min", candidate=v1, client=g.client)
    short = g.version({"fid": 4.91})
    assert not promote(g.name, metric="fid", mode="min", candidate=short, client=g.client,
                       min_improvement=0.02).promoted
    exact = g.version({"fid": 4.9})
    p = promote(g.name, metric="fid", mode="min", candidate=exact, client=g.client, min_improvement=0.02)
    assert p.promoted and "2.00% better" in p.reason
    # mode max: 4.998 against 4.9 is 2% better; a tie is no improvement even with no margin
    up = g.version({"fid": 4.9 * 1.02})
    assert promote(g.name, metric="fid", mode="max", candidate=up, client=g.client, min_improvement=0.02).promoted
    tie = g.version({"fid": 4.9 * 1.02})
    assert not promote(g.name, metric="fid", mode="max", candidate=tie, client=g.client).promoted


def test_incomparable_versions_are_refused_naming_the_difference_and_the_fix(g):
    v1 = g.version({"fid": 5.0}, P128)
    promote(g.name, metric="fid", mode="min", candidate=v1, client=g.client)
    v2 = g.version({"fid": 1.0})               # far better, but over 64 samples, not 128
    with pytest.raises(UserError) as e:
        promote(g.name, metric="fid", mode="min", candidate=v2, client=g.client, refuse_incomparable=True)
    msg = str(e.value)
    assert "num_samples: 64 vs 128" in msg
    assert f"orbitgen eval models:/{g.name}/{v1} --metrics fid --num-samples 64" in msg
    assert "--reevaluate" in msg and g.aliases() == {"champion": v1}
    # training's automatic promotion does not fail: the candidate is challenger, and it says why
    p = promote(g.name, metric="fid", mode="min", candidate=v2, client=g.client)
    assert not p.promoted and "challenger" in p.reason and "num_samples: 64 vs 128" in p.reason
    assert g.aliases() == {"champion": v1, "challenger": v2}


def test_reevaluate_compares_under_the_candidates_protocol(g):
    v1 = g.version({"fid": 5.0}, P128)
    promote(g.name, metric="fid", mode="min", candidate=v1, client=g.client)
    v2 = g.version({"fid": 4.0})
    asked = []

    def evaluate(version, like):        # what `orbitgen eval` records: scores under protocol `like`
        asked.append((version, like))
        for k, v in version_tags(like, {"fid": 4.5}, "eval-run").items():
            g.client.set_model_version_tag(g.name, version, k, v)

    p = promote(g.name, metric="fid", mode="min", candidate=v2, client=g.client, refuse_incomparable=True,
                reevaluate=evaluate)
    assert asked == [(v1, P)] and p.promoted and p.champion_score == 4.5
    assert g.aliases()["champion"] == v2


def test_a_run_without_recorded_protocol_is_not_comparable_one_with_it_is(g):
    old = g.version(run_metrics={"fid": 9.0, "loss_g": 1.0})            # before protocols
    g.client.set_registered_model_alias(g.name, "champion", old)
    new = g.version({"fid": 8.0})
    with pytest.raises(UserError, match=f"champion v{old} has no fid under a recorded evaluation protocol"):
        promote(g.name, metric="fid", mode="min", candidate=new, client=g.client, refuse_incomparable=True)
    # a run that recorded its protocol as a tag counts under it (its evaluation metrics, not its losses)
    tagged = g.version(run_metrics={"fid": 6.0, "loss_g": 1.0}, run_protocol=P)
    g.client.set_registered_model_alias(g.name, "champion", tagged)
    p = promote(g.name, metric="fid", mode="min", candidate=new, client=g.client, refuse_incomparable=True)
    assert not p.promoted and p.champion_score == 6.0


def test_table_has_every_shared_metric_and_is_logged_on_the_candidates_run(g):
    v1 = g.version({"fid": 5.0, "kid": 0.2, "precision": 0.4})
    promote(g.name, metric="fid", mode="min", candidate=v1, client=g.client)
    v2 = g.version({"fid": 4.0, "kid": 0.1, "recall": 0.3})
    p = promote(g.name, metric="fid", mode="min", candidate=v2, client=g.client)
    rows = [line.split()[0] for line in p.table.splitlines()[2:]]
    assert rows == ["fid", "kid"] and P.key() in p.table and "64 samples" in p.table
    assert p.artifact.startswith("promotion/") and p.artifact.endswith(f"-v{v2}-vs-v{v1}.txt")
    run = g.client.get_model_version(g.name, v2).run_id
    logged = mlflow.artifacts.load_text(f"runs:/{run}/{p.artifact}")
    assert "-20.0%" in logged and p.reason in logged


def test_rollback_returns_to_the_previous_champion_then_runs_out(g):
    v1 = g.version({"fid": 5.0})
    g.client.set_registered_model_alias(g.name, "champion", v1)     # a champion from before the history was kept
    v2 = g.version({"fid": 4.0})
    v3 = g.version({"fid": 3.0})
    for v in (v2, v3):
        promote(g.name, metric="fid", mode="min", candidate=v, client=g.client)
    assert champion_history(g.client, g.name) == [v1, v2, v3]
    assert f"v{v3} → v{v2}" in rollback(g.name, g.client)
    assert g.aliases()["champion"] == v2 and previous_champion(g.client, g.name) == v1
    rollback(g.name, g.client)
    assert g.aliases()["champion"] == v1
    assert json.loads(g.client.get_registered_model(g.name).tags[TAG_CHAMPION_HISTORY]) == [v1]
    with pytest.raises(UserError, match="no previous champion to roll back to"):
        rollback(g.name, g.client)


def test_best_version_chosen_without_candidate_and_max_mode(g):
    for fid in (4.0, 2.0, None, 6.0):
        g.version({"fid": fid} if fid else None)
    g.version({"fid": 0.5}, P128)          # best, but alone under its protocol
    assert promote(g.name, metric="fid", mode="min", client=g.client).candidate == "2"
    p = promote(g.name, metric="fid", mode="max", client=g.client)
    assert p.promoted and p.candidate == "4"


def test_unknown_model_or_metric_is_an_error(g):
    with pytest.raises(UserError, match="no registered model"):
        promote("nope", metric="fid", mode="min", client=g.client)
    g.version(run_metrics={"psnr": 20.0})
    with pytest.raises(UserError, match="metric 'fid'.*psnr"):
        promote(g.name, metric="fid", mode="min", client=g.client)
    with pytest.raises(UserError, match="no previous champion"):
        rollback(g.name, g.client)


def test_a_held_lock_makes_promoters_wait_and_an_expired_one_is_broken(g):
    v1 = g.version({"fid": 5.0})
    lock = registry_lock.lock_name(g.name)
    g.client.create_registered_model(lock, tags={registry_lock.TAG_OWNER: "elsewhere:1:x",
                                               registry_lock.TAG_EXPIRES: "9e12"})
    with pytest.raises(UserError, match="holds its lock.*elsewhere:1:x"):
        with registry_lock.promotion_lock(g.client, g.name, wait_s=0.5):
            pass
    assert lock not in [m["name"] for m in list_models(g.client)]       # the lock is no model
    g.client.set_registered_model_tag(lock, registry_lock.TAG_EXPIRES, "1")   # its promoter died long ago
    assert promote(g.name, metric="fid", mode="min", candidate=v1, client=g.client).promoted
    assert not g.client.search_registered_models(f"name='{lock}'")
