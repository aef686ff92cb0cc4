"""`orbitgen jobs submit` against a real `ray start --head` on loopback: submit, follow, read logs,
list; and what the Jobs API holds of a job submitted from a shell with AWS keys (none of them)."""
from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "infra"))
from local_stack import free_port  # noqa: E402

from jobs.spec import decode_inline  # noqa: E402

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAJOBSSUBMITTEST01", "AWS_SECRET_ACCESS_KEY": "jobs-submit-secret-4e5f6a7b",
           "AWS_SESSION_TOKEN": "jobs-submit-session-8c9d"}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    port, dash = free_port(), free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)   # jobs inherit the head's environment: no store of an earlier test
    temp = tmp_path_factory.mktemp("rayhead")
    # --block keeps `ray start` in the foreground so that ending its process group stops this
    # cluster only (`ray stop` would stop every Ray on the machine, the tests' own included).
    # Every agent port free too: the tests' own local Ray may hold the default ones, and a head
    # whose job agent cannot bind never accepts a job ("No available agent").
    agent_ports = [arg for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                    "--metrics-export-port", "--runtime-env-agent-port", "--ray-client-server-port")
                   for arg in (flag, str(free_port()))]
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--num-cpus", "2",
         "--temp-dir", str(temp), "--include-dashboard", "true", *agent_ports],
        env=env, stdout=(temp / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    from ray.job_submission import JobSubmissionClient

    deadline = time.monotonic() + 90
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray head did not come up: {(temp / 'head.log').read_text()[-3000:]}")
            time.sleep(1)
    yield address
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def quickstart_job(ray_head, tmp_path_factory):
    """The quickstart spec submitted (not waited for) from a shell that holds AWS keys; the tests
    below follow it, list it and read what the Jobs API keeps of it."""
    workdir = tmp_path_factory.mktemp("quickstart-job")
    overrides = ["--set", "train.steps=4", "--set", "train.log_every=2", "--set", "data.resolution=16",
                 "--set", "data.train=builtin:craters?count=64&seed=1", "--set", "eval.num_samples=32",
                 "--set", f"workdir={workdir}", "--set", "tracking.registry_model=null"]
    env = {**os.environ, **SECRETS, "AWS_DEFAULT_REGION": "eu-west-3"}
    env.pop("MLFLOW_TRACKING_URI", None)
    sub = subprocess.run([str(BIN / "orbitgen"), "jobs", "submit", "jobs/specs/quickstart.yaml", "--address", ray_head,
                          *overrides], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert sub.returncode == 0, sub.stderr
    return SimpleNamespace(id=sub.stdout.strip().splitlines()[-1], workdir=workdir, output=sub.stdout + sub.stderr)


def test_logs_follow_streams_until_the_job_ends(ray_head, quickstart_job):
    """`jobs logs --follow`: the job's lines as they come, and it returns when the job has ended."""
    cli = [str(BIN / "orbitgen"), "jobs"]
    followed = subprocess.run([*cli, "logs", quickstart_job.id, "--follow", "--address", ray_head],
                              capture_output=True, text=True, timeout=400)
    assert followed.returncode == 0, followed.stderr[-3000:]
    status = subprocess.run([*cli, "status", quickstart_job.id, "--address", ray_head],
                            capture_output=True, text=True, timeout=60).stdout.strip()
    assert status == "SUCCEEDED", followed.stdout[-4000:]   # it returned because the job ended
    assert re.search(r"\b4/4 \[", followed.stdout) and "done in" in followed.stdout   # up to the job's last lines
    assert f"job {quickstart_job.id}: SUCCEEDED" in followed.stderr


def test_submit_quickstart_spec_and_follow(ray_head, quickstart_job):
    cli = [str(BIN / "orbitgen"), "jobs"]
    job_id, tmp_path = quickstart_job.id, quickstart_job.workdir

    deadline, status = time.monotonic() + 400, ""
    while time.monotonic() < deadline:
        status = subprocess.run([*cli, "status", job_id, "--address", ray_head],
                                capture_output=True, text=True, timeout=60).stdout.strip()
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(3)
    logs = subprocess.run([*cli, "logs", job_id, "--address", ray_head], capture_output=True, text=True, timeout=60).stdout
    assert status == "SUCCEEDED", logs[-4000:]
    assert re.search(r"\b4/4 \[", logs) and "done in" in logs   # the job's progress bar at its end
    assert (tmp_path / "mlflow.db").exists()   # the job tracked where the spec said


def test_jobs_list_shows_the_job(ray_head, quickstart_job):
    """`jobs list` reaches the cluster through RAY_API_SERVER_ADDRESS, which wins over RAY_ADDRESS."""
    env = {**os.environ, "RAY_API_SERVER_ADDRESS": ray_head, "RAY_ADDRESS": "http://127.0.0.1:1"}
    listed = subprocess.run([str(BIN / "orbitgen"), "jobs", "list"], capture_output=True, text=True, timeout=60, env=env)
    assert listed.returncode == 0, listed.stderr
    (line,) = [line for line in listed.stdout.splitlines() if line.startswith(quickstart_job.id)]
    assert "python -m jobs.cli train --spec-b64 <spec>" in line and re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d", line)


def test_no_secret_of_the_submitter_reaches_the_jobs_api(ray_head, quickstart_job):
    """AWS keys set in the submitting shell: nothing of them in the job's entrypoint (the inline spec
    decoded), runtime_env or metadata as the Jobs API gives them out, nor in what submit printed."""
    from ray.job_submission import JobSubmissionClient

    info = JobSubmissionClient(ray_head).get_job_info(quickstart_job.id)
    argv = shlex.split(info.entrypoint)
    held = {"entrypoint": info.entrypoint, "spec": decode_inline(argv[argv.index("--spec-b64") + 1]),
            "runtime_env": json.dumps(info.runtime_env), "metadata": json.dumps(info.metadata),
            "submit's output": quickstart_job.output}
    for name, value in SECRETS.items():
        leaks = [where for where, text in held.items() if value in text]
        assert not leaks, f"{name} in {leaks}"
        assert name not in info.runtime_env["env_vars"]
    assert info.runtime_env["env_vars"]["AWS_DEFAULT_REGION"] == "eu-west-3"   # settings still travel
    assert "AWS_SECRET_ACCESS_KEY" in quickstart_job.output   # named (not shown) as held back


def test_submit_a_mineaug_search(ray_head, tmp_path):
    """`jobs submit --search`: the spec's MineAug search runs as the job, its trials on the cluster."""
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    sets = ["data.resolution=16", "data.train=builtin:craters?count=48&seed=1", f"workdir={tmp_path}",
            "search.candidates=[HorizontalFlip,VerticalFlip,Translation_x]", "search.k=2", "search.repeats=2"]
    done = subprocess.run([str(BIN / "orbitgen"), "jobs", "submit", "jobs/specs/quickstart.yaml", "--search",
                           "--wait", "--address", ray_head, *[a for s in sets for a in ("--set", s)]],
                          capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0 and done.stdout.strip().endswith("SUCCEEDED"), done.stderr[-4000:]
    assert "orbitgen train" in done.stderr and "HorizontalFlip" in done.stderr   # the job's log, followed
    (written,) = (tmp_path / "search").glob("*/spec.yaml")
    assert "search_run:" in written.read_text()
