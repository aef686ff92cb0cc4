"""jobs/submit.py without a cluster: entrypoint, runtime_env, metadata, waiting, connection errors."""
from __future__ import annotations

import shlex
import socket
import subprocess
from pathlib import Path

import pytest

from jobs import submit as S
from jobs.spec import decode_inline

REPO = Path(__file__).resolve().parents[3]
SPEC = "name: sat-maps\nfamily: pix2pix\n# ünïcode and 'quotes' survive\ndata: {train: s3://b/x}\n"


def test_entrypoint_carries_spec_inline_and_quoted_overrides():
    ep = S.build_entrypoint(SPEC, ["train.steps=20", "name=a b; rm -rf /", "data.train=s3://b/it's"])
    argv = shlex.split(ep)
    assert argv[:5] == ["python", "-m", "jobs.cli", "train", "--spec-b64"]
    assert decode_inline(argv[5]) == SPEC  # what `jobs.cli train --spec-b64` reads
    assert argv[6:] == ["--set", "train.steps=20", "--set", "name=a b; rm -rf /",
                        "--set", "data.train=s3://b/it's"]
    assert S.build_entrypoint(SPEC) == shlex.join(argv[:6])


def test_a_search_job_runs_search_mineaug_on_the_same_spec(tmp_path):
    argv = shlex.split(S.build_entrypoint(SPEC, ["search.k=2"], resume="maps-search-1", command="search"))
    assert argv[:6] == ["python", "-m", "jobs.cli", "search", "mineaug", "--spec-b64"]
    assert decode_inline(argv[6]) == SPEC and argv[7:] == ["--set", "search.k=2", "--resume", "maps-search-1"]
    # The job's command line is one the CLI accepts.
    from click.testing import CliRunner

    from jobs.cli import main

    assert CliRunner().invoke(main, argv[3:5] + ["--help"]).exit_code == 0
    with pytest.raises(ValueError, match="command"):
        S.build_entrypoint(SPEC, command="eval")


def test_entrypoint_rejects_malformed_override():
    with pytest.raises(ValueError, match="train.steps"):
        S.build_entrypoint(SPEC, ["train.steps"])


def test_forwarded_variables_cover_mlflow_and_s3():
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(S.FORWARDED_ENV_VARS)


def test_runtime_env_forwards_only_set_variables(tmp_path):
    environ = {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "AWS_ENDPOINT_URL": "http://s3:9000",
               "AWS_ACCESS_KEY_ID": "", "HOME": "/root", "ORBITGEN_GIT_SHA": "abc123"}
    env = S.build_runtime_env(tmp_path, {"EXTRA": 1, "AWS_ENDPOINT_URL": "http://other:9000"},
                              environ=environ)
    assert env["working_dir"] == str(tmp_path.resolve())
    for pattern in (".venv", "orbitgen-work", ".git", "*.egg-info", "__pycache__"):
        assert pattern in env["excludes"]
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow:5000",
                               "AWS_ENDPOINT_URL": "http://other:9000",  # env wins
                               "ORBITGEN_GIT_SHA": "abc123", "EXTRA": "1"}


def test_runtime_env_records_git_head(tmp_path):
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    (tmp_path / "f.txt").write_text("x")
    subprocess.run(git + ["add", "f.txt"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "c"], check=True)
    head = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    env = S.build_runtime_env(tmp_path / ".", environ={})
    assert env["env_vars"] == {"ORBITGEN_GIT_SHA": head}
    assert S.build_metadata(SPEC, head) == {"orbitgen.spec_name": "sat-maps", "orbitgen.git_sha": head}


def test_runtime_env_without_git_or_missing_dir(tmp_path):
    assert S.build_runtime_env(tmp_path, environ={})["env_vars"] == {}
    with pytest.raises(ValueError, match="not a directory"):
        S.build_runtime_env(tmp_path / "nope", environ={})


def test_metadata_is_best_effort():
    assert S.build_metadata("::: not yaml [") == {}
    assert S.build_metadata("- a list\n") == {}


def test_address_normalization():
    assert S._normalize_address("127.0.0.1:8265") == "http://127.0.0.1:8265"
    assert S._normalize_address("http://head:8265/") == "http://head:8265"
    assert S._normalize_address("head:6379") == "head:6379"  # a GCS address: Ray resolves it
    assert S._normalize_address(None) is None


class FakeClient:
    def __init__(self, statuses, logs):
        self.statuses, self.log_steps, self.i = list(statuses), list(logs), -1

    def get_job_status(self, job_id):
        self.i = min(self.i + 1, len(self.statuses) - 1)
        return self.statuses[self.i]

    def get_job_logs(self, job_id):
        return self.log_steps[min(self.i, len(self.log_steps) - 1)]


def test_wait_streams_new_log_text_until_terminal(monkeypatch):
    fake = FakeClient(["PENDING", "RUNNING", "RUNNING", "SUCCEEDED"], ["", "a\n", "a\nb\n", "a\nb\nc\n"])
    monkeypatch.setattr(S, "_client", lambda address: fake)
    chunks = []
    assert S.wait("j1", address="http://x:8265", timeout_s=10, poll_s=0.01, on_log=chunks.append) == "SUCCEEDED"
    assert chunks == ["a\n", "b\n", "c\n"]


def test_wait_times_out_naming_the_job(monkeypatch):
    monkeypatch.setattr(S, "_client", lambda address: FakeClient(["RUNNING"], [""]))
    with pytest.raises(TimeoutError, match="raysubmit_abc"):
        S.wait("raysubmit_abc", address="http://x:8265", timeout_s=0.2, poll_s=0.05)


def test_unreachable_cluster_is_a_clear_connection_error(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:1")  # an explicit address wins over it
    address = f"http://127.0.0.1:{port}"
    with pytest.raises(ConnectionError) as err:
        S.status("raysubmit_x", address=address)
    msg = str(err.value)
    assert address in msg and "ray start --head" in msg and "RAY_ADDRESS" in msg
    import os
    assert os.environ["RAY_ADDRESS"] == "http://127.0.0.1:1"  # restored


def test_entrypoint_resumes_a_stopped_run():
    argv = shlex.split(S.build_entrypoint(SPEC, ["train.steps=20"], resume="sat-maps-1a2b3c4d"))
    assert argv[6:] == ["--set", "train.steps=20", "--resume", "sat-maps-1a2b3c4d"]
    from click.testing import CliRunner

    from jobs.cli import main

    # Both ends of the job know the option: `jobs submit` takes it, the `train` it runs accepts it.
    help_text = CliRunner().invoke(main, ["jobs", "submit", "--help"]).output
    assert "--resume RUN" in help_text
    assert "--resume" in CliRunner().invoke(main, ["train", "--help"]).output
