"""Settings that travel with a job: the standard variables of S3 and MLflow clients."""
from __future__ import annotations

import os

FORWARDED_ENV_VARS = (
    "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "ORBITGEN_GIT_SHA",
)


def forwarded_env() -> dict[str, str]:
    """The variables set here that training workers and submitted jobs must see too."""
    return {k: os.environ[k] for k in FORWARDED_ENV_VARS if os.environ.get(k)}
