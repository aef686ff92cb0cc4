"""Is the MLflow tracking store a user named there, before a client touches it?

MLflow's HTTP client retries a server nobody answers for minutes, and opening a `sqlite:` URI
creates an empty store: a command that only reads (models show, search show, a `runs:/`
reference) would leave a new mlflow.db behind and then report "not found".
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from data_shards.endpoint import unanswered
from data_shards.errors import UserError
from jobs.runtime.redact import redact


def check_answers(uri: str, what: str) -> None:
    """An http(s) tracking server must accept a connection; `what` names the input (--tracking-uri, tracking.uri)."""
    if urlsplit(uri).scheme in ("http", "https"):
        why = unanswered(uri)
        if why:
            raise UserError(f"{what} {redact(uri)}: nobody answers ({why}); start the MLflow server "
                            "or give the address of one that runs")


def local_store_path(uri: str) -> Path | None:
    """The file (sqlite) or folder (file: / a plain path) of a local store; None for a server."""
    if uri.startswith("sqlite:"):
        path = uri.split(":///", 1)[1] if ":///" in uri else ""
        return Path(path) if path and path != ":memory:" else None
    if uri.startswith("file:"):
        return Path(urlsplit(uri).path)
    return Path(uri) if "://" not in uri else None


def require_store(uri: str, what: str) -> None:
    """For commands that only read: the store must exist (and answer)."""
    check_answers(uri, what)
    path = local_store_path(uri)
    if path is not None and not path.exists():
        raise UserError(f"{what} {redact(uri)}: no MLflow store there (nothing tracked yet); give the store "
                        "a training used (--tracking-uri, MLFLOW_TRACKING_URI or the spec's tracking.uri)")
