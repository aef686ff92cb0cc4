"""The promotion lock against a real MLflow server, between processes: two holders never overlap;
a holder killed while holding it blocks the others only until its lease runs out (a live one
renews it and keeps it); no lock model is left in the registry, and the lease tag goes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from jobs.cli import main
from jobs.tracking import registry_lock
from jobs.tracking.protocol import EvalProtocol, version_tags

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
P = EvalProtocol(data_fingerprint="lock", split="all", real_seed=0, seed_base=1_000_000, num_samples=64,
                 extractors={"orbitgen-randconv64-v1": "00ff00ff00ff00ff"})
HOLDS, HOLD_S = 3, 0.2
SETTLE_S = "0.5"    # the settle wait (default 1 s) still far above a loopback request's milliseconds

# Says "ready", reads START (epoch seconds), then takes the lock HOLDS times, holding it HOLD_S
# each; prints the intervals it held it.
HOLDER = r"""
import json, sys, time
from mlflow.tracking import MlflowClient
from jobs.tracking.registry_lock import promotion_lock
uri, name, holds, hold_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
client = MlflowClient(uri)
print("ready", flush=True)
time.sleep(max(0.0, float(sys.stdin.readline()) - time.time()))
held = []
for _ in range(holds):
    with promotion_lock(client, name):
        began = time.time()
        time.sleep(hold_s)
        held.append((began, time.time()))
print(json.dumps(held), flush=True)
"""

# A promotion that stops for good inside the lock, just before it moves the alias.
STUCK = r"""
import sys, time
from mlflow.tracking import MlflowClient
from jobs.tracking import registry
def stuck(*args, **kwargs):
    print("holding", flush=True)
    time.sleep(3600)
registry._crown = stuck
registry.promote(sys.argv[2], metric="fid", mode="min", candidate=sys.argv[3], client=MlflowClient(sys.argv[1]))
"""


def python(code: str, *args: str, env: dict[str, str] | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, text=True, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, **kw)


def registered(client: MlflowClient, name: str, fids: list[float]) -> list[str]:
    client.create_registered_model(name)
    experiment = client.create_experiment(name)
    out = []
    for fid in fids:
        run = client.create_run(experiment).info.run_id
        out.append(str(client.create_model_version(name, f"runs:/{run}/generator", run,
                                                   tags=version_tags(P, {"fid": fid}, run)).version))
    return out


def only_the_model(client: MlflowClient, name: str) -> None:
    """No lock model beside it (nor an old-style one), and no lease left on it."""
    assert [m.name for m in client.search_registered_models(f"name LIKE '{name}%'")] == [name]
    assert registry_lock.TAG_LEASE not in (client.get_registered_model(name).tags or {})


def test_two_processes_holding_the_lock_never_overlap(mlflow_server):
    client = MlflowClient(mlflow_server.url)
    name = "lock-two-processes"
    registered(client, name, [5.0])
    procs = [python(HOLDER, mlflow_server.url, name, str(HOLDS), str(HOLD_S), stdin=subprocess.PIPE,
                    env={registry_lock.SETTLE_ENV: SETTLE_S}) for _ in range(2)]
    assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
    start = time.time() + 0.3
    held = sorted(i for p in procs for i in json.loads(p.communicate(f"{start}\n", timeout=120)[0]))
    assert all(p.returncode == 0 for p in procs) and len(held) == 2 * HOLDS
    for (_, ended), (began, _) in zip(held, held[1:]):
        assert ended <= began, held            # one holder at a time
    only_the_model(client, name)


def test_a_killed_holder_blocks_until_its_lease_runs_out_then_the_other_promotes(mlflow_server):
    client = MlflowClient(mlflow_server.url)
    name = "lock-killed-holder"
    champion, better = registered(client, name, [5.0, 3.0])
    client.set_registered_model_alias(name, "champion", champion)
    lease_s = 2.0
    holder = python(STUCK, mlflow_server.url, name, better, env={registry_lock.LEASE_ENV: str(lease_s)},
                    start_new_session=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        # alive, it renews its lease: a promoter waiting twice the lease still finds it held
        res = CliRunner().invoke(main, ["models", "promote", name, "--version", better, "--json",
                                        "--tracking-uri", mlflow_server.url],
                                 env={registry_lock.WAIT_ENV: str(2 * lease_s)})
        assert res.exit_code == 5, res.output
        busy = json.loads(res.stdout)
        assert (busy["promoted"], busy["outcome"]) == (False, "lock-busy")
        assert f"orbitgen models promote {name} --version {better}" in busy["reason"]
    finally:
        os.killpg(holder.pid, signal.SIGKILL)       # dies holding the lock
        holder.wait(timeout=30)
    killed = time.monotonic()
    res = CliRunner().invoke(main, ["models", "promote", name, "--version", better, "--json",
                                    "--tracking-uri", mlflow_server.url])
    waited = time.monotonic() - killed
    assert res.exit_code == 0, res.output
    done = json.loads(res.stdout)
    assert (done["promoted"], done["champion_before"], done["champion_after"]) == (True, champion, better)
    assert waited >= lease_s * 0.5, waited      # it did wait for the dead lease (some had passed already)
    assert str(client.get_registered_model(name).aliases["champion"]) == better
    only_the_model(client, name)
