"""Promotion semantics on a real (sqlite) MLflow registry: champion moves only to a version that is
better under a common evaluation protocol, by the margin; rollback walks the champion history; the
promotion lock is a lease tag on the model (no lock model), waited for, and broken once expired.
(Two processes against a server: tests/integration/test_promotion_lock.py.)"""
from __future__ import annotations

import json
import time
from dataclasses import replace

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from data_shards.errors import UserError
from jobs.tracking import registry_lock
from jobs.tracking.protocol import TAG_CHAMPION_HISTORY, TAG_RUN_PROTOCOL, EvalProtocol, version_tags
from jobs.tracking.registry import (ALREADY_CHAMPION, INCOMPARABLE, LOCK_BUSY, NOT_BETTER, PROMOTED,
                                    champion_history, list_models, previous_champion, promote, rollback)
from jobs.tracking.runs import ensure_experiment

P = EvalProtocol(data_fingerprint="f00d" * 4, split="all", real_seed=0, seed_base=1_000_000, num_samples=64,
                 extractors={"orbitgen-randconv64-v1": "00ff00ff00ff00ff"})
P128 = replace(P, num_samples=128)


@pytest.fixture(autouse=True)
def quick_lock(monkeypatch):
    """One process, one sqlite file: no write lands late, so the lock's settle wait can be short."""
    monkeypatch.setenv(registry_lock.SETTLE_ENV, "0.02")


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
    p = promote(g.name, metric="fid", mode="min", candidate=v2, client=g.client, refuse_incomparable=True)
    assert (p.promoted, p.outcome) == (False, INCOMPARABLE)
    assert "num_samples: 64 vs 128" in p.reason
    assert f"orbitgen eval models:/{g.name}/{v1} --metrics fid --num-samples 64" in p.reason
    assert "--reevaluate" in p.reason and g.aliases() == {"champion": v1}     # refused: nothing written
    # training's automatic promotion: the candidate is challenger, and it says why
    p = promote(g.name, metric="fid", mode="min", candidate=v2, client=g.client)
    assert not p.promoted and "challenger" in p.reason and "num_samples: 64 vs 128" in p.reason
    assert p.outcome == INCOMPARABLE and g.aliases() == {"champion": v1, "challenger": v2}


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
    p = promote(g.name, metric="fid", mode="min", candidate=new, client=g.client, refuse_incomparable=True)
    assert p.outcome == INCOMPARABLE
    assert f"champion v{old} has no fid under a recorded evaluation protocol" in p.reason
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


def test_outcomes_and_their_json(g):
    v1 = g.version({"fid": 5.0, "kid": 0.3})
    first = promote(g.name, metric="fid", mode="min", candidate=v1, client=g.client)
    assert (first.outcome, first.champion_after, first.to_dict()["compared"]) == (
        PROMOTED, v1, {"fid": {"candidate": 5.0}, "kid": {"candidate": 0.3}})
    again = promote(g.name, metric="fid", mode="min", candidate=v1, client=g.client)
    assert (again.promoted, again.outcome, again.champion_after) == (False, ALREADY_CHAMPION, v1)
    v2 = g.version({"fid": 6.0, "kid": 0.2})
    d = json.loads(json.dumps(promote(g.name, metric="fid", mode="min", candidate=v2, client=g.client).to_dict()))
    assert (d["promoted"], d["outcome"], d["candidate"], d["champion_before"], d["champion_after"]) == (
        False, NOT_BETTER, v2, v1, v1)
    assert (d["metric"], d["mode"], d["candidate_score"], d["champion_score"], d["protocol"]) == (
        "fid", "min", 6.0, 5.0, P.key())
    assert d["improvement"] == pytest.approx(-0.2) and d["compared"]["kid"] == {"candidate": 0.2, "champion": 0.3}
    assert "does not beat" in d["reason"] and d["comparison_artifact"].startswith("promotion/")


def lease(token: str, *, lease_s: float = 60.0, expires: float = 9e12) -> str:
    return registry_lock.Lease(token, lease_s, expires, "elsewhere:1").to_json()


def test_a_held_lease_makes_promoters_wait_then_says_registered_not_promoted(g, monkeypatch):
    v1 = g.version({"fid": 5.0})
    g.client.set_registered_model_tag(g.name, registry_lock.TAG_LEASE, lease("theirs"))
    with pytest.raises(registry_lock.LockBusy, match="holds its lock.*elsewhere:1"):
        with registry_lock.promotion_lock(g.client, g.name, wait_s=0.3):
            pass
    monkeypatch.setenv(registry_lock.WAIT_ENV, "0.3")
    p = promote(g.name, metric="fid", mode="min", candidate=v1, client=g.client)
    assert (p.promoted, p.outcome) == (False, LOCK_BUSY) and "registered but not promoted" in p.reason
    assert f"orbitgen models promote {g.name} --version {v1} --metric fid --mode min" in p.reason
    assert g.aliases() == {}
    # its holder died long ago (expiry a whole lease in the past): broken at once
    monkeypatch.delenv(registry_lock.WAIT_ENV)
    g.client.set_registered_model_tag(g.name, registry_lock.TAG_LEASE, lease("theirs", expires=1.0))
    assert promote(g.name, metric="fid", mode="min", candidate=v1, client=g.client).promoted
    tags = g.client.get_registered_model(g.name).tags
    assert registry_lock.TAG_LEASE not in tags                                # released
    assert [m.name for m in g.client.search_registered_models(f"name LIKE '{g.name}%'")] == [g.name]


def test_a_lease_not_renewed_for_its_length_is_taken_over_whatever_the_clocks(g):
    """A holder that died stops renewing: the waiter measures the unchanged lease on its own
    clock (the expiry written by the holder is far in the future: its clock may be ahead)."""
    g.version({"fid": 5.0})
    g.client.set_registered_model_tag(g.name, registry_lock.TAG_LEASE, lease("dead", lease_s=0.5))
    with registry_lock.promotion_lock(g.client, g.name, wait_s=5) as check:
        check()
        assert registry_lock.read_lease(g.client, g.name).token != "dead"


def test_a_live_holder_renews_its_lease_and_loses_it_when_overwritten(g):
    g.version({"fid": 5.0})
    with registry_lock.promotion_lock(g.client, g.name, lease_s=0.3) as check:
        first = registry_lock.read_lease(g.client, g.name)
        time.sleep(0.5)                          # longer than the lease: renewed meanwhile
        check()
        renewed = registry_lock.read_lease(g.client, g.name)
        assert renewed.token == first.token and renewed.expires > first.expires
        # a waiter that (wrongly) took it over: the holder sees it before its next write
        g.client.set_registered_model_tag(g.name, registry_lock.TAG_LEASE, lease("usurper"))
        with pytest.raises(registry_lock.LockLost):
            check()
    assert registry_lock.read_lease(g.client, g.name).token == "usurper"   # not ours: not released by us


def test_each_acquisition_has_its_own_token_and_an_own_leftover_is_not_waited_for(g):
    g.version({"fid": 5.0})
    tokens = []
    for _ in range(2):
        with registry_lock.promotion_lock(g.client, g.name):
            tokens.append(registry_lock.read_lease(g.client, g.name).token)
    assert tokens[0] != tokens[1] and len(tokens[0]) == 32
    # a release that failed (server away) leaves our lease; our next promotion does not wait for it
    g.client.set_registered_model_tag(g.name, registry_lock.TAG_LEASE, lease(tokens[1]))
    with registry_lock.promotion_lock(g.client, g.name, wait_s=0.2):
        pass


def test_an_old_lock_model_is_respected_while_unexpired_and_hidden_from_lists(g):
    v1 = g.version({"fid": 5.0})
    old = registry_lock.lock_name(g.name)
    g.client.create_registered_model(old, tags={registry_lock.LEGACY_TAG_OWNER: "host:1:2",
                                                registry_lock.LEGACY_TAG_EXPIRES: "9e12"})
    with pytest.raises(registry_lock.LockBusy, match="older orbitgen"):
        with registry_lock.promotion_lock(g.client, g.name, wait_s=0.3):
            pass
    assert old not in [m["name"] for m in list_models(g.client)]
    g.client.set_registered_model_tag(old, registry_lock.LEGACY_TAG_EXPIRES, "1")   # its promoter died
    assert promote(g.name, metric="fid", mode="min", candidate=v1, client=g.client).promoted
