"""Two `models generate` finishing at once on one version, against a real MLflow server: every set
they made stays recorded (one tag per set, no read before the write); the same set recorded again
(a retry after a server error) is still one entry."""
from __future__ import annotations

import threading

import pytest
from mlflow.tracking import MlflowClient

from jobs.generate import record_on_version
from jobs.tracking.lineage import read_generated, version_lineage

pytestmark = pytest.mark.integration
NAME, SETS = "lineage-two-writers", 12


def test_two_writers_at_once_lose_no_set(mlflow_server):
    setup = MlflowClient(mlflow_server.url)
    setup.create_registered_model(NAME)
    run = setup.create_run(setup.create_experiment(NAME)).info.run_id
    version = str(setup.create_model_version(NAME, f"runs:/{run}/generator", run).version)
    start = threading.Barrier(2)
    failures = []

    def writer(who: str) -> None:
        client = MlflowClient(mlflow_server.url)       # a writer of its own, as two commands are
        start.wait()
        try:
            for i in range(SETS):
                record_on_version(client, NAME, version, {"url": f"s3://b/{who}/{i}", "n": 8, "seeds": [0, 7],
                                                          "fingerprint": f"{who}{i}"})
        except Exception as e:   # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    # the same set again (a retried write): no second entry
    record_on_version(setup, NAME, version, {"url": "s3://b/a/0", "n": 8, "seeds": [0, 7], "fingerprint": "a0"})

    made = read_generated(setup.get_model_version(NAME, version).tags)
    expected = {f"s3://b/{w}/{i}" for w in ("a", "b") for i in range(SETS)}
    assert sorted(e["url"] for e in made) == sorted(expected)
    assert {g["url"] for g in version_lineage(setup, NAME, version=version)["generated"]} == expected
