"""Does anyone answer at a server's address? One quick TCP connect, before a client library
that retries a dead address for seconds (s3fs/botocore) or minutes (MLflow's HTTP client)."""
from __future__ import annotations

import socket
from urllib.parse import urlsplit

PROBE_TIMEOUT_S = 5.0
_DEFAULT_PORTS = {"http": 80, "https": 443}


def unanswered(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why nobody answers at `url`'s host and port (e.g. "connection refused"), or None when
    something accepts the connection or the URL names no host to probe."""
    parts = urlsplit(url)
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return f"{url!r} is not a valid address"
    if not parts.hostname or port is None:
        return None
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            return None
    except socket.timeout:
        return f"no answer within {timeout_s:g} s"
    except OSError as e:
        return e.strerror or str(e)
