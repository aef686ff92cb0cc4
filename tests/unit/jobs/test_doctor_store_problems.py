"""`orbitgen doctor` when the object store, not the data, is what stops a job: without AWS
credentials the data and storage checks name the missing credentials and how to set them, never
"build it with orbitgen data build". No server: botocore refuses to sign before it connects."""
from __future__ import annotations

import pytest
import s3fs
from click.testing import CliRunner

from jobs.cli import main


@pytest.fixture
def no_credentials(monkeypatch):
    """No AWS credentials from any source (variables, files, instance metadata, whose probe alone
    waits seconds), and no S3 filesystem cached with credentials before or left cached after."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def test_missing_credentials_are_named_with_their_fix(no_credentials, tmp_path):
    result = CliRunner().invoke(main, ["doctor", "--set", f"workdir={tmp_path}", "--set", "scaling.num_workers=1",
                                       "--set", "data.train=s3://orbitgen-doctor/sets/a",
                                       "--set", "checkpoint.storage=s3://orbitgen-doctor/runs"],
                                env={"RAY_ADDRESS": ""}, catch_exceptions=False)
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    for name, url in (("data", "s3://orbitgen-doctor/sets/a"), ("storage", "s3://orbitgen-doctor/runs")):
        at = next(i for i, line in enumerate(lines) if line.split()[:2] == ["FAIL", name])
        assert f"{url}: no AWS credentials found" in lines[at], result.output
        assert "fix: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE" in lines[at + 1]
    assert "data build" not in result.output
