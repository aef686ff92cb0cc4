"""Two promoters started at once against a real MLflow server, with different candidates, never
leave `champion` on the worse one. The promoters are two long-lived processes, so each
trial costs the promotions, not Python's start; both begin a trial at one agreed instant."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from jobs.tracking.protocol import EvalProtocol, version_tags
from jobs.tracking.registry import champion_history
from jobs.tracking.registry_lock import TAG_LEASE

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TRIALS = 24
P = EvalProtocol(data_fingerprint="race", split="all", real_seed=0, seed_base=1_000_000, num_samples=64,
                 extractors={"orbitgen-randconv64-v1": "00ff00ff00ff00ff"})
# The lock's read-back wait (default 1 s, see registry_lock): a request to the local server takes
# milliseconds, so 0.3 s still covers every write, and the 2 x 24 promotions stay quick.
FAST_LOCK = {"ORBITGEN_PROMOTION_SETTLE_S": "0.3"}

# A promoter: reads "MODEL CANDIDATE START" lines, sleeps until START (epoch seconds), promotes,
# answers one JSON line with what it did and when it ran.
PROMOTER = r"""
import json, sys, time
from mlflow.tracking import MlflowClient
from jobs.tracking.registry import promote
client = MlflowClient(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    name, candidate, start = line.split()
    time.sleep(max(0.0, float(start) - time.time()))
    began = time.time()
    p = promote(name, metric="fid", mode="min", candidate=candidate, client=client)
    print(json.dumps({"promoted": p.promoted, "began": began, "ended": time.time()}), flush=True)
"""


def promoters(uri: str, n: int = 2) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", PROMOTER, uri], cwd=REPO, text=True, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(REPO), **FAST_LOCK})
             for _ in range(n)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    return procs


def registered(client: MlflowClient, experiment: str, name: str, fids: list[float]) -> list[str]:
    """Model `name` with one version per FID, scores recorded under protocol P; v1 champion."""
    client.create_registered_model(name)
    versions = []
    for fid in fids:
        run = client.create_run(experiment).info.run_id
        versions.append(str(client.create_model_version(name, f"runs:/{run}/generator", run,
                                                        tags=version_tags(P, {"fid": fid}, run)).version))
    client.set_registered_model_alias(name, "champion", versions[0])
    return versions


def test_two_promoters_at_once_leave_the_better_candidate_champion(mlflow_server):
    client = MlflowClient(mlflow_server.url)
    experiment = client.create_experiment("promote-race")
    procs = promoters(mlflow_server.url)
    try:
        overlapped, orders = 0, set()
        for trial in range(TRIALS):
            name = f"race-{trial}"
            champion, best, worse = registered(client, experiment, name, [5.0, 3.0, 4.0])
            # alternate which process gets which candidate
            candidates = (best, worse) if trial % 2 else (worse, best)
            start = time.time() + 0.3
            for proc, candidate in zip(procs, candidates):
                proc.stdin.write(f"{name} {candidate} {start}\n")
                proc.stdin.flush()
            runs = [json.loads(proc.stdout.readline()) for proc in procs]
            aliases = {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}
            history = champion_history(client, name)
            assert aliases["champion"] == best, (trial, aliases, history, runs)
            assert TAG_LEASE not in (client.get_registered_model(name).tags or {}), trial   # lock released
            assert history[0] == champion and history[-1] == best, (trial, history)
            orders.add(tuple(history))
            a, b = runs
            overlapped += a["began"] < b["ended"] and b["began"] < a["ended"]
        # they really ran at once (the one that waited for the lock overlaps the other), and both orders happened
        assert overlapped >= TRIALS * 0.8, overlapped
        assert orders == {(champion, best), (champion, worse, best)}, orders
        assert not [m.name for m in client.search_registered_models() if m.name.endswith(".promotion-lock")]
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(timeout=30)
