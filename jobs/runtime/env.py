"""Settings that travel with a job: the standard variables of S3 and MLflow clients."""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
GIT_SHA_ENV = "ORBITGEN_GIT_SHA"

FORWARDED_ENV_VARS = (
    "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "ORBITGEN_GIT_SHA",
    "ORBITGEN_TRACKING_RETRY_S",   # how long a job's driver waits for a tracking server gone away
    "ORBITGEN_DATA_RETRY_S",       # how long a shard read retries an object store gone away
)


def forwarded_env() -> dict[str, str]:
    """The variables set here that training workers and submitted jobs must see too."""
    return {k: os.environ[k] for k in FORWARDED_ENV_VARS if os.environ.get(k)}


def git_sha(path: str | os.PathLike = REPO) -> str | None:
    """$ORBITGEN_GIT_SHA (set for submitted jobs: their uploaded copy has no .git), else HEAD."""
    if os.environ.get(GIT_SHA_ENV):
        return os.environ[GIT_SHA_ENV]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def git_dirty(path: str | os.PathLike = REPO) -> str:
    """"true" when the work tree differs from HEAD (changed or untracked files: the sha alone does
    not give back its code), "false" when clean, "unknown" without git or for a submitted job
    (its uploaded copy has no .git; $ORBITGEN_GIT_SHA names the commit)."""
    if os.environ.get(GIT_SHA_ENV):
        return "unknown"
    try:
        out = subprocess.run(["git", "status", "--porcelain"], cwd=path, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return "true" if out.stdout.strip() else "false"


@contextmanager
def tracking_uri_restored() -> Iterator[None]:
    """Leave MLFLOW_TRACKING_URI as it was: mlflow.set_tracking_uri() writes it into the
    environment, so a later spec in this process without tracking.uri would track into this one's store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
