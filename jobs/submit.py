"""The Ray Jobs API side of orbitgen: submit a training job to a Ray cluster, follow it, stop it.

A job's entrypoint is ``python -m jobs.cli train --spec-b64 <spec> [--set k=v ...]``: the spec
travels inline (base64 of the YAML text), so a spec file outside the repository works, and the
repository itself is shipped as the job's ``working_dir``. The submitter's MLflow / S3 settings
are forwarded as ``runtime_env.env_vars`` so driver and workers log to the same places.

Addresses: the dashboard URL of the head node, e.g. ``http://127.0.0.1:8265`` (``ray start
--head`` locally; ``ray dashboard ray_cluster.yaml`` tunnels it for a launcher cluster; the
``<cluster>-head-svc:8265`` service on KubeRay). ``host:8265`` without a scheme is taken as that
URL; other scheme-less addresses (``auto``, ``host:6379``) go through Ray's own resolution via
the GCS. An explicit address wins over ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS``; with
``address=None`` Ray's rules apply (those variables, then a local cluster).

Everything that talks to the cluster imports Ray lazily: importing this module is cheap.
"""
from __future__ import annotations

import os
import shlex
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from data_shards.errors import UserError
from jobs.runtime.env import FORWARDED_ENV_VARS, GIT_SHA_ENV, git_sha
from jobs.spec import encode_inline

#: Never uploaded with the working dir (Ray also honours .gitignore). mlruns/mlartifacts: local
#: MLflow stores, which can be large and mean nothing on the cluster.
WORKING_DIR_EXCLUDES = [".venv", "orbitgen-work", ".git", "*.egg-info", "__pycache__",
                        "mlruns", "mlartifacts"]
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
DEFAULT_DASHBOARD_PORT = 8265
AGENT_WAIT_S = 60

_ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
_env_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------
# Building a submission (pure functions; unit-tested without a cluster)

COMMANDS = {"train": ("train",), "search": ("search", "mineaug")}   # what a job can run


def build_entrypoint(spec_yaml_text: str, overrides: Iterable[str] = (), resume: str | None = None,
                     command: str = "train") -> str:
    """The shell command the job runs: ``python -m jobs.cli train --spec-b64 ... [--set k=v] [--resume RUN]``
    (``search mineaug`` instead of ``train`` for a MineAug search).

    ``python`` is the interpreter on the PATH of the cluster's ``ray start`` (where orbitgen is
    installed); every argument is shell-quoted.
    """
    if command not in COMMANDS:
        raise ValueError(f"command {command!r}: allowed {', '.join(COMMANDS)}")
    args = ["python", "-m", "jobs.cli", *COMMANDS[command], "--spec-b64", encode_inline(spec_yaml_text)]
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        args += ["--set", item]
    if resume:
        args += ["--resume", resume]
    return shlex.join(args)


def build_runtime_env(working_dir: str | os.PathLike, env: Mapping[str, str] | None = None, *,
                      environ: Mapping[str, str] | None = None,
                      sha: str | None = None) -> dict:
    """runtime_env for a job: the working dir (with excludes) and the forwarded variables.

    Precedence of ``env_vars``: forwarded submitter variables < ``ORBITGEN_GIT_SHA`` (the
    repository's HEAD: the uploaded copy has no .git) < ``env``.
    """
    wd = Path(working_dir).expanduser().resolve()
    if not wd.is_dir():
        raise ValueError(f"working_dir {str(wd)!r} is not a directory")
    environ = os.environ if environ is None else environ
    env_vars = {k: environ[k] for k in FORWARDED_ENV_VARS if environ.get(k)}
    sha = sha if sha is not None else (environ.get(GIT_SHA_ENV) or git_sha(wd))
    if sha:
        env_vars[GIT_SHA_ENV] = sha
    for k, v in (env or {}).items():
        env_vars[str(k)] = str(v)
    return {"working_dir": str(wd), "excludes": list(WORKING_DIR_EXCLUDES), "env_vars": env_vars}


def build_metadata(spec_yaml_text: str, sha: str | None = None) -> dict[str, str]:
    """Job metadata shown by ``ray job list``: the spec's name (and git sha) when available."""
    meta: dict[str, str] = {}
    try:
        import yaml

        doc = yaml.safe_load(spec_yaml_text)
    except Exception:  # the CLI validates the spec; metadata is best effort
        doc = None
    if isinstance(doc, dict) and doc.get("name"):
        meta["orbitgen.spec_name"] = str(doc["name"])
    if sha:
        meta["orbitgen.git_sha"] = sha
    return meta


# ---------------------------------------------------------------------------------------------
# Talking to the cluster

def _normalize_address(address: str | None) -> str | None:
    if address is None:
        return None
    address = address.strip().rstrip("/")
    if "://" not in address and address.rsplit(":", 1)[-1] == str(DEFAULT_DASHBOARD_PORT):
        return "http://" + address  # the dashboard port: an HTTP address, not a GCS one
    return address


class JobsApiUnreachable(UserError, ConnectionError):
    """Nobody answers at the Ray Jobs API address the user gave (still a ConnectionError)."""


def _connection_error(address: str | None, err: BaseException) -> ConnectionError:
    where = repr(address) if address else "(none given; RAY_ADDRESS / a local cluster)"
    return JobsApiUnreachable(
        f"Cannot reach the Ray Jobs API at {where}: {err}\n"
        "Start a local cluster with `ray start --head` (Jobs API on http://127.0.0.1:8265), or "
        "pass the head node's dashboard address (--address / RAY_ADDRESS, e.g. "
        "http://<head>:8265; `ray dashboard ray_cluster.yaml` tunnels a launcher cluster's).")


@contextmanager
def _address_env_cleared(active: bool) -> Iterator[None]:
    """Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override an explicit address; undo that."""
    if not active:
        yield
        return
    with _env_lock:
        saved = {k: os.environ.pop(k) for k in _ADDRESS_ENV_VARS if k in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    addr = _normalize_address(address)
    try:
        with _address_env_cleared(addr is not None):
            return JobSubmissionClient(addr)
    except ConnectionError as e:
        raise _connection_error(address, e) from e
    except Exception as e:  # requests' ConnectionError is not the builtin one
        if _is_connection_problem(e):
            raise _connection_error(address, e) from e
        raise


def _is_connection_problem(e: BaseException) -> bool:
    try:
        import requests

        if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
            return True
    except ImportError:
        pass
    return isinstance(e, ConnectionError)


def _call(address: str | None, fn: Callable):
    try:
        return fn()
    except Exception as e:
        if _is_connection_problem(e):
            raise _connection_error(address, e) from e
        raise


def submit(spec_yaml_text: str, *, address: str | None, working_dir: str,
           overrides: Iterable[str] = (), env: dict[str, str] | None = None,
           job_id: str | None = None, resume: str | None = None, command: str = "train") -> str:
    """Submit a training job (or, with ``command="search"``, a MineAug search) for ``spec_yaml_text``;
    returns the job (submission) id.

    ``working_dir`` (normally the repository root) is zipped and uploaded, without
    :data:`WORKING_DIR_EXCLUDES` and what .gitignore lists. ``env`` adds or overrides job
    environment variables. ``job_id`` picks the submission id (it must be unused on the cluster).
    ``resume`` continues that stopped run (see ``orbitgen train --resume``).
    """
    entrypoint = build_entrypoint(spec_yaml_text, overrides, resume, command)
    runtime_env = build_runtime_env(working_dir, env)
    metadata = build_metadata(spec_yaml_text, runtime_env["env_vars"].get(GIT_SHA_ENV))
    client = _client(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return _call(address, lambda: client.submit_job(
                entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata, submission_id=job_id))
        except RuntimeError as e:
            # A head that has just started answers before its job agent is up: wait for it.
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def status(job_id: str, *, address: str | None) -> str:
    """The job's status: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    client = _client(address)
    st = _call(address, lambda: client.get_job_status(job_id))
    return getattr(st, "value", str(st))


def logs(job_id: str, *, address: str | None) -> str:
    """Everything the job's driver has printed so far."""
    client = _client(address)
    return _call(address, lambda: client.get_job_logs(job_id))


def stop(job_id: str, *, address: str | None) -> bool:
    """Ask the job to stop; True if it was running (stopping is asynchronous: see :func:`wait`)."""
    client = _client(address)
    return bool(_call(address, lambda: client.stop_job(job_id)))


def wait(job_id: str, *, address: str | None, timeout_s: float, poll_s: float = 2,
         on_log: Callable[[str], None] | None = None) -> str:
    """Follow a job until it reaches a terminal status and return that status.

    ``on_log`` receives each new piece of the job's log text as it appears (the rest is
    delivered after the terminal status, so nothing is cut off). Raises ``TimeoutError`` naming
    the job when ``timeout_s`` passes first; the job keeps running then.
    """
    client = _client(address)
    deadline = time.monotonic() + timeout_s
    seen = 0
    while True:
        st = _call(address, lambda: client.get_job_status(job_id))
        st = getattr(st, "value", str(st))
        if on_log is not None:
            text = _call(address, lambda: client.get_job_logs(job_id)) or ""
            if len(text) < seen:  # log rotated or replaced: start over
                seen = 0
            if len(text) > seen:
                on_log(text[seen:])
                seen = len(text)
        if st in TERMINAL_STATUSES:
            return st
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"Ray job {job_id} is still {st} after {timeout_s:g} s "
                               f"(it keeps running; stop it with stop({job_id!r}))")
        time.sleep(max(0.05, min(poll_s, remaining)))
