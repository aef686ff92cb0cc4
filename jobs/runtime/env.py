"""Settings that travel with a job: the standard variables of S3 and MLflow clients."""
from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping
from urllib.parse import urlsplit

from jobs.runtime.redact import SECRET_ENV_VARS

REPO = Path(__file__).resolve().parents[1]
GIT_SHA_ENV = "ORBITGEN_GIT_SHA"

FORWARDED_ENV_VARS = (
    "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "ORBITGEN_GIT_SHA",
    "ORBITGEN_TRACKING_RETRY_S",   # how long a job's driver waits for a tracking server gone away
    "ORBITGEN_DATA_RETRY_S",       # how long a shard read retries an object store gone away
    "ORBITGEN_STORAGE",            # the storage root (jobs/spec.py STORAGE_ROOT_ENV)
    "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME",
)


def forwarded_env() -> dict[str, str]:
    """The variables set here that the job's workers must see too, credentials left out: Ray shows
    what a training's workers are handed (the Train state API, the dashboard), so a worker takes its
    credentials from its node's own environment (an instance profile, IRSA, a Secret as env; the Ray
    this process starts inherits this process's)."""
    return job_env()[0]


def is_secret(name: str, value: str) -> bool:
    """A credential: a secret variable by name, or a URL with userinfo (`http://user:pass@host`)."""
    if name in SECRET_ENV_VARS:
        return True
    try:
        return "@" in urlsplit(value).netloc
    except ValueError:   # not a URL (urlsplit refuses a stray "[")
        return False


def job_env(environ: Mapping[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """What `jobs submit` sends with a job unasked: the FORWARDED_ENV_VARS set here that are no
    credential, and the names of those held back. A runtime_env is readable by anyone who can list
    the cluster's jobs, so secrets reach a job only from the nodes' own environment or `--env NAME`."""
    environ = os.environ if environ is None else environ
    sent, held = {}, []
    for k in FORWARDED_ENV_VARS:
        if environ.get(k):
            if is_secret(k, environ[k]):
                held.append(k)
            else:
                sent[k] = environ[k]
    return sent, held


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
