"""Object-store errors no retry can mend, against the real loopback S3 server (`s3_server`): a
build to a bucket that does not exist ends in one line naming it (exit 2: like a missing path,
it is a name the user gave that holds nothing); missing credentials and an invalid bucket name
fail at once, although the retry budget is 20 s (a wrong retry fails the test, it never hangs)."""
from __future__ import annotations

import time

import numpy as np
import pytest
import s3fs
from click.testing import CliRunner
from PIL import Image

from data_shards import shard_reader, storage
from data_shards.errors import EnvironmentProblem, UserError
from jobs.cli import main

pytestmark = pytest.mark.integration
BUDGET_S = 20   # longer than these tests may take: a wrong retry fails them in seconds, never hangs


def test_a_build_to_a_bucket_that_does_not_exist_is_one_line_naming_it(s3_server, tmp_path, monkeypatch):
    source = tmp_path / "src"
    source.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(source / f"{i}.png")
    monkeypatch.setenv("ORBITGEN_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv(storage.RETRY_ENV, str(BUDGET_S))
    res = CliRunner().invoke(main, ["data", "build", str(source), "s3://no-such-bucket-eb/set", "--resolution", "8"])
    lines = [line for line in res.stderr.splitlines() if line.startswith(("error", "internal", "Traceback"))]
    assert res.exit_code == 2, res.output
    assert len(lines) == 1 and "'no-such-bucket-eb' does not exist" in lines[0], res.stderr
    assert not (tmp_path / "logs").exists()   # not a bug


@pytest.fixture
def no_cached_s3():
    """A process without credentials: not an S3 filesystem fsspec cached (connected) earlier in this
    one; and the one made here, without credentials, not left cached for the tests after."""
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def test_missing_credentials_fail_at_once_naming_the_object(s3_server, no_cached_s3, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    # No other source either: no files, no instance metadata (whose probe alone waits seconds).
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/credentials")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/config")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    url = "s3://orbitgen/eb/shard-000000.tar"
    before, start = storage.retries(), time.monotonic()
    with pytest.raises(EnvironmentProblem, match=r"s3://orbitgen/eb/shard-000000\.tar: no AWS credentials"):
        shard_reader.fetch(url, storage.Retries(f"reading {url}", BUDGET_S))
    assert time.monotonic() - start < 10 and storage.retries() == before


def test_an_invalid_bucket_name_fails_at_once(s3_server):
    url = "s3://not!a!bucket/shard-000000.tar"
    before, start = storage.retries(), time.monotonic()
    with pytest.raises(UserError, match="'not!a!bucket' is not a valid bucket name"):
        shard_reader.fetch(url, storage.Retries(f"reading {url}", BUDGET_S))
    assert time.monotonic() - start < 10 and storage.retries() == before


def test_a_shard_in_a_missing_bucket_fails_at_once(s3_server):
    url = "s3://no-such-bucket-eb/set/shard-000000.tar"
    before, start = storage.retries(), time.monotonic()
    with pytest.raises(shard_reader.ShardReadError, match="no-such-bucket-eb"):
        list(shard_reader.read_piece(url, budget_s=BUDGET_S))
    assert time.monotonic() - start < 10 and storage.retries() == before
