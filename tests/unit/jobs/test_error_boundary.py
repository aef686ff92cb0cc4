"""The CLI's one error boundary (jobs/cli/common.py `BadInputExits2`): bad input exits 2, the
environment (permissions, disk space, read-only disks, credentials, endpoints) exits 1, a bug
prints one `internal error:` line, exits 70 and leaves its traceback in a log file only."""
from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import botocore.exceptions
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import data_shards.adopt
import data_shards.build
import data_shards.preview
from data_shards.errors import EnvironmentProblem, environment_problem
from jobs.cli import main
from jobs.cli.common import EXIT_INTERNAL

REPO = Path(__file__).resolve().parents[3]


def run(args: list[str], monkeypatch, log_dir: Path):
    monkeypatch.setenv("ORBITGEN_LOG_DIR", str(log_dir))
    monkeypatch.delenv("ORBITGEN_TRACEBACK", raising=False)
    return CliRunner().invoke(main, args)


def raises(exc: BaseException):
    def broken(*args, **kwargs):
        raise exc
    return broken


def test_a_bug_is_one_line_exit_70_and_its_traceback_is_in_the_log_only(tmp_path, monkeypatch):
    monkeypatch.setattr(data_shards.preview, "describe", raises(RuntimeError("injected bug\nsecond line")))
    res = run(["data", "inspect", str(tmp_path)], monkeypatch, tmp_path / "logs")

    assert res.exit_code == EXIT_INTERNAL == 70, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output, res.stderr
    logs = list((tmp_path / "logs").iterdir())
    assert len(logs) == 1
    assert lines[0] == (f"internal error: RuntimeError: injected bug second line; the traceback is in {logs[0]}; "
                        "please report it")
    text = logs[0].read_text()
    assert "Traceback (most recent call last)" in text and "RuntimeError: injected bug" in text
    assert "in broken" in text   # the frame where the bug was raised


def test_a_bug_stays_visible_when_no_log_can_be_written(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")   # a log "folder" that is a file: nothing can be written there
    monkeypatch.setattr(data_shards.preview, "describe", raises(KeyError("k")))
    res = run(["data", "inspect", str(tmp_path)], monkeypatch, tmp_path / "file" / "logs")
    assert res.exit_code == 70
    assert "Traceback" in res.stderr and "internal error: KeyError" in res.stderr


@pytest.mark.parametrize("code, name", [(errno.ENOSPC, "no space left"), (errno.EACCES, "permission denied"),
                                        (errno.EROFS, "read-only file system"), (errno.EDQUOT, "disk quota exceeded")])
def test_a_disk_that_refuses_a_write_is_one_line_naming_the_file_exit_1(code, name, tmp_path, monkeypatch):
    shard = str(tmp_path / "out" / "shard-000003.tar")
    monkeypatch.setattr(data_shards.build, "build", raises(OSError(code, os.strerror(code), shard)))
    res = run(["data", "build", str(tmp_path), str(tmp_path / "out"), "--resolution", "8"], monkeypatch,
              tmp_path / "logs")
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {shard}: {name}"), res.stderr
    assert "choose" in lines[0] and not (tmp_path / "logs").exists()


@pytest.mark.parametrize("exc, names", [
    (botocore.exceptions.NoCredentialsError(), ["no AWS credentials", "AWS_ACCESS_KEY_ID"]),
    (botocore.exceptions.EndpointConnectionError(endpoint_url="http://127.0.0.1:1/b"),
     ["does not answer", "AWS_ENDPOINT_URL"]),
    (botocore.exceptions.ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied",
                                                "BucketName": "team-b"}}, "GetObject"),
     ["access denied", "AccessDenied"]),
])
def test_the_environment_raised_raw_by_a_library_is_one_line_exit_1(exc, names, tmp_path, monkeypatch):
    monkeypatch.setattr(data_shards.adopt, "resolve", raises(exc))   # inspect's first read of the store
    res = run(["data", "inspect", "s3://team-b/set"], monkeypatch, tmp_path / "logs")
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


def test_a_missing_bucket_raised_through_s3fs_names_the_bucket_exit_2(tmp_path, monkeypatch):
    """s3fs turns NoSuchBucket into a FileNotFoundError caused by botocore's ClientError: the
    bucket is a name the user gave that holds nothing (as a missing path: exit 2)."""
    cause = botocore.exceptions.ClientError({"Error": {"Code": "NoSuchBucket", "BucketName": "nobucket",
                                                       "Message": "The specified bucket does not exist"}}, "PutObject")
    err = FileNotFoundError(errno.ENOENT, "The specified bucket does not exist")
    err.__cause__ = cause
    monkeypatch.setattr(data_shards.build, "build", raises(err))
    res = run(["data", "build", str(tmp_path), "s3://nobucket/x", "--resolution", "8"], monkeypatch, tmp_path / "logs")
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "'nobucket' does not exist" in lines[0], res.stderr


def test_environment_problem_keeps_a_writers_own_message_and_ignores_other_errors():
    said = PermissionError(errno.EACCES, "cannot write the shard set file:///x (/x): Permission denied")
    assert str(environment_problem(said)).startswith("cannot write the shard set file:///x")
    assert environment_problem(FileNotFoundError(errno.ENOENT, "gone", "/x")) is None
    assert environment_problem(ValueError("x")) is None
    assert isinstance(EnvironmentProblem("m"), OSError) and str(EnvironmentProblem("m")) == "m"


def _pngs(folder: Path, count: int = 3) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare (as on CI)")
def test_a_destination_on_a_read_only_disk_is_one_line_exit_1(tmp_path):
    """A real read-only file system (a tmpfs mounted `-o ro` in a private mount namespace): root
    cannot write there either, unlike a chmod-ed folder."""
    _pngs(tmp_path / "src")
    ro = tmp_path / "ro"
    ro.mkdir()
    command = [sys.executable, "-m", "jobs.cli", "data", "build", str(tmp_path / "src"), str(ro / "out"),
               "--resolution", "8"]
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           f'mount -t tmpfs -o ro tmpfs "{ro}" && exec "$@"', "sh", *command],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "ORBITGEN_LOG_DIR": str(tmp_path / "logs")})
    lines = [line for line in proc.stderr.splitlines() if line.startswith(("error", "internal", "Traceback"))]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and str(ro / "out") in lines[0] and "ead-only file system" in lines[0], proc.stderr
    assert "writable" in lines[0] and not (tmp_path / "logs").exists()


def test_a_bug_quoting_a_password_keeps_it_out_of_the_line_and_the_log(tmp_path, monkeypatch):
    secret = "http://ana:hunter22@mlflow.lab:5000"
    monkeypatch.setattr(data_shards.preview, "describe", raises(RuntimeError(f"lost {secret}")))
    res = run(["data", "inspect", str(tmp_path)], monkeypatch, tmp_path / "logs")
    assert res.exit_code == 70 and "hunter22" not in res.stderr and "ana:***@mlflow.lab" in res.stderr
    [log] = (tmp_path / "logs").iterdir()
    assert "hunter22" not in log.read_text() and "RuntimeError" in log.read_text()


def test_a_connection_refused_raised_raw_is_the_environment_exit_1(tmp_path, monkeypatch):
    monkeypatch.setattr(data_shards.preview, "describe",
                        raises(ConnectionRefusedError(111, "Connection refused")))
    res = run(["data", "inspect", str(tmp_path)], monkeypatch, tmp_path / "logs")
    assert res.exit_code == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "Connection refused" in res.stderr and "check the network" in res.stderr


def test_a_bug_raised_while_handling_an_environment_error_is_still_a_bug(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        try:
            raise botocore.exceptions.NoCredentialsError()
        except botocore.exceptions.NoCredentialsError:
            raise AttributeError("the handler itself is wrong")   # not "from": a bug in the handler

    monkeypatch.setattr(data_shards.preview, "describe", broken)
    res = run(["data", "inspect", str(tmp_path)], monkeypatch, tmp_path / "logs")
    assert res.exit_code == 70 and "internal error: AttributeError" in res.stderr
