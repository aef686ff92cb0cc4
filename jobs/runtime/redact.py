"""Secrets stay out of what orbitgen writes down: MLflow params, tags and artifacts, and the console.

Credentials reach orbitgen two ways: the standard variables of S3 and MLflow clients (forwarded
to the workers, never logged), and passwords written into URLs (`http://user:pass@host`, a
tracking URI). Both are replaced by `***` in every text that leaves the process as a record:
the spec's params and spec.yaml, the data card, and the lines that print a URI. The live values
stay untouched: the clients still authenticate with them.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

MASK = "***"
SECRET_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
                   "MLFLOW_TRACKING_TOKEN", "DATABRICKS_TOKEN")
MIN_SECRET_LENGTH = 6   # shorter values (test dummies like "x") would mask ordinary words
# A scheme starts where no scheme character stands before it and is at most 32 long: without these
# bounds, a long run of letters (100 KB of a value) costs quadratic time to find no URL in.
_URL_PASSWORD = re.compile(r"(?P<head>(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]{0,31}://[^:/@\s]*)"
                           r":(?P<password>[^@/\s]+)@")


def redact_urls(text: str) -> str:
    """`text` with the passwords of the URLs in it masked, and nothing else changed: for a text
    that is still to run (a job's spec), where masking a secret's value wherever it appears
    could change ordinary words that happen to equal it."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@", text)


def redact(text: str) -> str:
    """`text` with URL passwords and the values of the secret variables set here masked."""
    text = redact_urls(text)
    for name in SECRET_ENV_VARS:
        value = os.environ.get(name, "")
        if len(value) >= MIN_SECRET_LENGTH:
            text = text.replace(value, MASK)
    return text


def redact_values(values: Mapping[str, Any]) -> dict[str, Any]:
    """A flat mapping (MLflow params) with every string value redacted."""
    return {k: redact(v) if isinstance(v, str) else v for k, v in values.items()}


def redact_json(obj: Any) -> Any:
    """A JSON-able structure (a data card) with every string in it redacted."""
    return json.loads(redact(json.dumps(obj)))
