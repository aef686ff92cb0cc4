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
