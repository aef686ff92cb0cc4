"""jobs/submit.py and `orbitgen jobs` without a cluster: entrypoint, runtime_env, metadata, the
address order, what travels with a job (no secret unasked), the working dir, listing, following
and waiting, connection errors."""
from __future__ import annotations

import asyncio
import json
import shlex
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from data_shards.errors import UserError
from jobs import submit as S
from jobs.cli import main
from jobs.runtime.env import FORWARDED_ENV_VARS, job_env
from jobs.spec import SPECS_DIR, decode_inline

REPO = Path(__file__).resolve().parents[3]
QS = str(SPECS_DIR / "quickstart.yaml")
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
    # Ray Train workers (inside the cluster) still get them all; a submitted job only the non-secret ones.
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"} <= set(FORWARDED_ENV_VARS)
    environ = {k: f"value-of-{k}" for k in FORWARDED_ENV_VARS}
    sent, held = job_env(environ)
    assert set(held) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
    assert set(sent) == set(FORWARDED_ENV_VARS) - set(held)


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
    def __init__(self, statuses, streams=()):
        self.statuses, self.streams, self.i = list(statuses), list(streams), -1

    def get_job_status(self, job_id):
        self.i = min(self.i + 1, len(self.statuses) - 1)
        return self.statuses[self.i]

    async def tail_job_logs(self, job_id):
        for item in self.streams.pop(0):
            if isinstance(item, Exception):
                raise item
            if item == "hang":
                await asyncio.sleep(30)
            yield item

    def get_job_logs(self, job_id):
        raise AssertionError("follow and wait stream the log; they never download it whole")


def test_wait_streams_the_log_until_terminal(monkeypatch):
    fake = FakeClient(["RUNNING", "SUCCEEDED"], [["a\n", "b\n", "c\n"]])
    monkeypatch.setattr(S, "_client", lambda address: fake)
    chunks = []
    assert S.wait("j1", address="http://x:8265", timeout_s=10, poll_s=0.01, on_log=chunks.append) == "SUCCEEDED"
    assert chunks == ["a\n", "b\n", "c\n"]


def test_follow_reopens_a_cut_stream_without_repeating_lines(monkeypatch):
    # The server replays the log from its start on a new stream: what was delivered is skipped.
    fake = FakeClient(["RUNNING", "RUNNING", "FAILED"],
                      [["a\n", "b", RuntimeError("WebSocket connection closed unexpectedly")], ["a\nb", "c\n"]])
    monkeypatch.setattr(S, "_client", lambda address: fake)
    monkeypatch.setattr(S.time, "sleep", lambda s: None)
    chunks = []
    assert S.follow("j1", address=None, on_log=chunks.append) == "FAILED"
    assert "".join(chunks) == "a\nbc\n"


def test_follow_times_out_naming_the_job(monkeypatch):
    monkeypatch.setattr(S, "_client", lambda address: FakeClient(["RUNNING"], [["x\n", "hang"]]))
    with pytest.raises(TimeoutError, match="raysubmit_abc"):
        S.follow("raysubmit_abc", address=None, on_log=lambda t: None, timeout_s=0.3)


def test_logs_follow_prints_the_stream_and_the_end_status(monkeypatch):
    monkeypatch.setattr(S, "_client", lambda address: FakeClient(["RUNNING", "SUCCEEDED"], [["step 1\n", "done\n"]]))
    res = CliRunner().invoke(main, ["jobs", "logs", "raysubmit_1", "--follow"])
    assert res.exit_code == 0, res.output
    assert res.stdout == "step 1\ndone\n" and "SUCCEEDED" in res.stderr


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


# --- the address: --address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS, else the local head

class AddressRecorder:
    """Stands in for Ray's JobSubmissionClient: records the address it got and the address
    variables it could see (Ray lets those override its argument)."""

    seen: list = []

    def __init__(self, address):
        import os

        AddressRecorder.seen.append((address, os.environ.get("RAY_API_SERVER_ADDRESS"), os.environ.get("RAY_ADDRESS")))

    def get_job_status(self, job_id):
        return "RUNNING"


@pytest.mark.parametrize("option, api_server, ray_address, used", [
    (None, None, None, "http://127.0.0.1:8265"),
    (None, None, "http://ra:8265", "http://ra:8265"),
    (None, "http://api:8265", None, "http://api:8265"),
    (None, "http://api:8265", "head:6379", "http://api:8265"),     # the Jobs API variable wins over RAY_ADDRESS
    ("http://cli:8265", "http://api:8265", "http://ra:8265", "http://cli:8265"),
    (None, "", "ra:8265", "http://ra:8265"),                       # empty is unset; the dashboard port means HTTP
    (None, None, "head:6379", "head:6379"),                        # a GCS address: Ray resolves it
    (None, None, "auto", "auto"),
])
def test_address_order(monkeypatch, option, api_server, ray_address, used):
    import ray.job_submission

    for name, value in (("RAY_API_SERVER_ADDRESS", api_server), ("RAY_ADDRESS", ray_address)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", AddressRecorder)
    AddressRecorder.seen = []
    res = CliRunner().invoke(main, ["jobs", "status", "raysubmit_1", *(["--address", option] if option else [])])
    assert res.exit_code == 0, res.output
    assert res.stdout == "RUNNING\n"
    assert AddressRecorder.seen == [(used, None, None)]   # and Ray cannot override the choice
    import os
    assert (os.environ.get("RAY_API_SERVER_ADDRESS"), os.environ.get("RAY_ADDRESS")) == (api_server, ray_address)


def test_address_order_is_in_the_help():
    for command in ("submit", "status", "logs", "stop", "list"):
        text = " ".join(CliRunner().invoke(main, ["jobs", command, "--help"]).output.split())
        assert "$RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else http://127.0.0.1:8265" in text, command


# --- what travels with a job

SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAFAKEORBITGEN1234", "AWS_SECRET_ACCESS_KEY": "fake-s3-secret-0b1c2d3e",
           "AWS_SESSION_TOKEN": "fake-session-token-9z8y", "MLFLOW_TRACKING_PASSWORD": "fake-mlflow-pass-77",
           "MLFLOW_TRACKING_TOKEN": "fake-mlflow-token-66"}
URI_PASSWORD = "fake-uri-password-5a"
SETTINGS = {"AWS_ENDPOINT_URL": "http://s3.internal:9000", "AWS_DEFAULT_REGION": "eu-west-3",
            "MLFLOW_S3_ENDPOINT_URL": "http://s3.internal:9000"}


class SubmitRecorder:
    def __init__(self):
        self.calls = []

    def submit_job(self, **kwargs):
        self.calls.append(kwargs)
        return "raysubmit_recorded"


def _everything_sent(call: dict) -> str:
    """The submission as text, the inline spec decoded: wherever a secret could hide."""
    argv = shlex.split(call["entrypoint"])
    spec = decode_inline(argv[argv.index("--spec-b64") + 1])
    return json.dumps(call, default=str) + spec


def test_no_secret_travels_with_a_job_by_default(monkeypatch, tmp_path):
    for k, v in {**SECRETS, **SETTINGS}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://trainer:{URI_PASSWORD}@mlflow.internal:5000")
    rec = SubmitRecorder()
    monkeypatch.setattr(S, "_client", lambda address: rec)
    spec = tmp_path / "spec.yaml"
    spec.write_text(Path(QS).read_text() + f"tracking: {{uri: 'http://trainer:{URI_PASSWORD}@mlflow.internal:5000'}}\n")
    res = CliRunner().invoke(main, ["jobs", "submit", str(spec), "--working-dir", str(tmp_path),
                                    "--set", f"checkpoint.storage=s3://u:{URI_PASSWORD}@b/runs"])
    assert res.exit_code == 0, res.output
    (call,) = rec.calls
    sent = _everything_sent(call)
    for value in (*SECRETS.values(), URI_PASSWORD):
        assert value not in sent and value not in res.output
    assert {k: call["runtime_env"]["env_vars"][k] for k in SETTINGS} == SETTINGS   # the settings still go
    assert "MLFLOW_TRACKING_URI" not in call["runtime_env"]["env_vars"]   # a URI with a password is a secret
    assert "trainer:***@mlflow.internal:5000" in sent and "s3://u:***@b/runs" in sent
    # The user hears which were held back (names only) and where they come from instead.
    for name in (*SECRETS, "MLFLOW_TRACKING_URI"):
        if name not in ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):   # not of the forwarded kind
            assert name in res.stderr
    assert "cluster nodes' own environment" in res.stderr and "--env NAME" in res.stderr


def test_env_sends_a_named_variable_and_refuses_an_unset_one(monkeypatch, tmp_path):
    environ = {**SECRETS, "MY_FLAG": "on"}
    sub = S.prepare(SPEC, working_dir=tmp_path, forward=["AWS_SECRET_ACCESS_KEY", "MY_FLAG"], environ=environ)
    env_vars = sub.runtime_env["env_vars"]
    assert env_vars["AWS_SECRET_ACCESS_KEY"] == SECRETS["AWS_SECRET_ACCESS_KEY"] and env_vars["MY_FLAG"] == "on"
    assert "AWS_ACCESS_KEY_ID" not in env_vars
    assert "AWS_SECRET_ACCESS_KEY" not in " ".join(sub.notes)   # asked for: not reported as held back
    assert "AWS_ACCESS_KEY_ID" in " ".join(sub.notes)
    with pytest.raises(UserError, match="--env ORBITGEN_NOT_SET_ANYWHERE: .* not set"):
        S.prepare(SPEC, working_dir=tmp_path, forward=["ORBITGEN_NOT_SET_ANYWHERE"], environ=environ)
    with pytest.raises(UserError, match="--env 'A=B': give a variable's NAME"):
        S.env_from_shell(["A=B"], environ)
    monkeypatch.delenv("ORBITGEN_NOT_SET_ANYWHERE", raising=False)
    res = CliRunner().invoke(main, ["jobs", "submit", QS, "--env", "ORBITGEN_NOT_SET_ANYWHERE", "--address", "http://127.0.0.1:1"])
    assert res.exit_code == 2 and "error: --env ORBITGEN_NOT_SET_ANYWHERE" in res.output


def test_an_explicit_secret_is_masked_in_a_submit_error(monkeypatch, tmp_path):
    class Refusing:
        def submit_job(self, **kwargs):
            raise RuntimeError(f"Request failed with status code 400: bad runtime_env {kwargs['runtime_env']}")

    monkeypatch.setattr(S, "_client", lambda address: Refusing())
    sub = S.prepare(SPEC, working_dir=tmp_path, forward=["AWS_SECRET_ACCESS_KEY"], environ=SECRETS)
    with pytest.raises(RuntimeError) as err:
        S.send(sub, address=None)
    assert SECRETS["AWS_SECRET_ACCESS_KEY"] not in str(err.value) and "***" in str(err.value)


def test_runtime_env_json_is_merged(tmp_path):
    extra = {"pip": ["rich"], "env_vars": {"AWS_REGION": "eu-west-3", "A": "1"}, "excludes": ["data/", ".venv"]}
    sub = S.prepare(SPEC, working_dir=tmp_path, runtime_env_json=json.dumps(extra), environ={"AWS_REGION": "us-east-1"},
                    env={"A": "2"})
    env = sub.runtime_env
    assert env["pip"] == ["rich"] and env["working_dir"] == str(tmp_path.resolve())
    assert env["env_vars"]["AWS_REGION"] == "eu-west-3" and env["env_vars"]["A"] == "2"   # json < env
    assert env["excludes"] == S.WORKING_DIR_EXCLUDES + ["data/"]   # added to, never replaced


@pytest.mark.parametrize("text, says", [
    ("{not json", "not valid JSON"), ("[1, 2]", "must be a JSON object"), ('"x"', "must be a JSON object"),
    ('{"env_vars": {"A": 1}}', "env_vars must be an object of strings"),
    ('{"working_dir": "/x"}', "--working-dir"), ('{"excludes": "x"}', "excludes must be a list"),
])
def test_runtime_env_json_refused(text, says):
    with pytest.raises(UserError, match="--runtime-env-json") as err:
        S.parse_runtime_env_json(text)
    assert says in str(err.value)


def test_runtime_env_json_refused_on_the_command_line():
    res = CliRunner().invoke(main, ["jobs", "submit", QS, "--runtime-env-json", "[1]", "--address", "http://127.0.0.1:1"])
    assert res.exit_code == 2 and "error: --runtime-env-json must be a JSON object" in res.output


def test_entrypoint_resources_and_spec_credentials_reach_submit_job(monkeypatch, tmp_path):
    rec = SubmitRecorder()
    monkeypatch.setattr(S, "_client", lambda address: rec)
    spec = f"name: x\ntracking: {{uri: 'http://me:{URI_PASSWORD}@mlflow:5000'}}\n"
    sub = S.prepare(spec, working_dir=tmp_path, entrypoint_num_gpus=1, entrypoint_num_cpus=0.5, environ={})
    assert S.send(sub, address=None, job_id="mine") == "raysubmit_recorded"
    (call,) = rec.calls
    assert (call["entrypoint_num_gpus"], call["entrypoint_num_cpus"], call["submission_id"]) == (1, 0.5, "mine")
    sent = _everything_sent(call)
    assert URI_PASSWORD not in sent and "http://me:***@mlflow:5000" in sent
    assert any("masked" in n for n in sub.notes)


# --- the working dir

def _project(root: Path, name: str = "orbitgen") -> Path:
    (root / "specs").mkdir(parents=True)
    (root / "pyproject.toml").write_text(f'[project]\nname = "{name}"\n')
    (root / "specs" / "s.yaml").write_text(SPEC)
    return root / "specs" / "s.yaml"


def test_working_dir_is_the_project_above_the_spec(tmp_path):
    spec = _project(tmp_path / "proj")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert S.working_dir_for(spec, cwd=elsewhere, package_parent=elsewhere) == (tmp_path / "proj").resolve()
    # Another project's pyproject.toml is no root; a .git is.
    other = _project(tmp_path / "other", name="someone-else")
    assert S.working_dir_for(other, cwd=tmp_path / "proj", package_parent=elsewhere) == (tmp_path / "proj").resolve()
    (tmp_path / "other" / ".git").mkdir()
    assert S.working_dir_for(other, cwd=elsewhere, package_parent=elsewhere) == (tmp_path / "other").resolve()
    # --working-dir wins; it must be a folder.
    assert S.working_dir_for(spec, elsewhere) == elsewhere.resolve()
    with pytest.raises(UserError, match="--working-dir .* is not a folder"):
        S.working_dir_for(spec, tmp_path / "nope")
    with pytest.raises(UserError, match="pass --working-dir"):
        S.working_dir_for(elsewhere / "s.yaml", cwd=elsewhere, package_parent=elsewhere)


def test_working_dir_is_never_site_packages(tmp_path):
    site = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    spec = _project(site / "jobs")          # an installed copy: pyproject.toml and spec inside site-packages
    (tmp_path / "venv" / ".git").mkdir()    # and a repository above the virtualenv: never walked to
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(UserError, match="site-packages.*pass --working-dir"):
        S.working_dir_for(spec, cwd=elsewhere, package_parent=site)
    with pytest.raises(UserError, match="pass --working-dir"):
        S.working_dir_for(elsewhere / "s.yaml", cwd=elsewhere, package_parent=site)
    with pytest.raises(UserError, match="site-packages.*pass --working-dir"):
        S.working_dir_for(spec, site)


def test_submit_ships_this_checkout_for_a_ready_spec(monkeypatch, tmp_path):
    rec = SubmitRecorder()
    monkeypatch.setattr(S, "_client", lambda address: rec)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["jobs", "submit", QS, "--set", "train.steps=3"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == "raysubmit_recorded"
    assert rec.calls[0]["runtime_env"]["working_dir"] == str(REPO)


# --- jobs list

def test_jobs_list_newest_first_one_line_each(monkeypatch):
    ep = S.build_entrypoint(SPEC, ["train.steps=20"])
    jobs = [SimpleNamespace(submission_id="raysubmit_old", job_id="01000000", status="SUCCEEDED",
                            start_time=1_700_000_000_000, entrypoint=ep),
            SimpleNamespace(submission_id=None, job_id="03000000", status=SimpleNamespace(value="RUNNING"),
                            start_time=None, entrypoint="python x.py --uri http://a:pw1234567@h"),
            SimpleNamespace(submission_id="raysubmit_new", job_id="02000000", status="PENDING",
                            start_time=1_700_000_100_000, entrypoint=ep + " --set " + "x" * 200)]
    monkeypatch.setattr(S, "_client", lambda address: SimpleNamespace(list_jobs=lambda: jobs))
    res = CliRunner().invoke(main, ["jobs", "list"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert [line.split()[:2] for line in lines] == [["raysubmit_new", "PENDING"], ["raysubmit_old", "SUCCEEDED"],
                                                    ["03000000", "RUNNING"]]
    assert "python -m jobs.cli train --spec-b64 <spec> --set train.steps=20" in lines[1]
    assert S.encode_inline(SPEC) not in res.stdout and "pw1234567" not in res.stdout
    assert all(len(line) < 140 for line in lines) and lines[0].endswith("…")


def test_the_jobs_spec_is_the_spec_even_when_a_secret_equals_one_of_its_words(monkeypatch):
    """Only URL passwords are masked in the spec a job runs: a key id that happens to be a word of
    the spec ("orbitgen", as in `workdir: orbitgen-work`) must not turn it into `***-work`."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "orbitgen")
    text = (SPECS_DIR / "quickstart.yaml").read_text()
    argv = shlex.split(S.build_entrypoint(text, ["workdir=orbitgen-work"]))
    assert decode_inline(argv[argv.index("--spec-b64") + 1]) == text
    assert argv[-2:] == ["--set", "workdir=orbitgen-work"]
