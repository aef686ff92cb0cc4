"""The Ray Jobs API side of orbitgen: submit a training job to a Ray cluster, follow it, list, stop.

A job's entrypoint is ``python -m jobs.cli train --spec-b64 <spec> [--set k=v ...]``: the spec
travels inline (base64 of the YAML text), so a spec file outside the repository works, and the
project folder (found from the spec's path, see :func:`working_dir_for`) is shipped as the job's
``working_dir``.

No credential travels with a job unasked: a job's entrypoint, runtime_env and metadata can be read
by anyone who can list the cluster's jobs. The submitter's non-secret MLflow / S3 settings
(endpoints, region, a tracking URI without userinfo) go as ``runtime_env.env_vars``; keys, tokens,
passwords and URIs with ``user:pass@`` come from the cluster nodes' own environment (instance
profile, IRSA, a Kubernetes Secret) or from an explicit ``--env NAME``. Passwords in URIs of the
spec and the overrides are masked before they are encoded.

Addresses: the dashboard URL of the head node, e.g. ``http://127.0.0.1:8265`` (``ray start
--head`` locally; ``ray dashboard ray_cluster.yaml`` tunnels it for a launcher cluster; the
``<cluster>-head-svc:8265`` service on KubeRay). Which one: the explicit address, else
``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``, else ``http://127.0.0.1:8265``
(:func:`resolve_address`). ``host:8265`` without a scheme is taken as that URL; other
scheme-less addresses (``auto``, ``host:6379``) and ``ray://`` go through Ray's own resolution
via the GCS.

Everything that talks to the cluster imports Ray lazily: importing this module is cheap.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import threading
import time
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from data_shards.errors import UserError
from jobs.runtime.env import GIT_SHA_ENV, git_sha, is_secret, job_env
from jobs.runtime.redact import MASK, redact, redact_urls
from jobs.spec import encode_inline

#: Never uploaded with the working dir (Ray also honours .gitignore). mlruns/mlartifacts: local
#: MLflow stores, which can be large and mean nothing on the cluster.
WORKING_DIR_EXCLUDES = [".venv", "orbitgen-work", ".git", "*.egg-info", "__pycache__",
                        "mlruns", "mlartifacts"]
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
DEFAULT_DASHBOARD_PORT = 8265
DEFAULT_ADDRESS = f"http://127.0.0.1:{DEFAULT_DASHBOARD_PORT}"
AGENT_WAIT_S = 60
TAIL_RECONNECTS = 5   # a log stream cut before the job ended is reopened this many times in a row

_ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
_INSTALL_DIRS = frozenset({"site-packages", "dist-packages"})
_PACKAGE_PARENT = Path(__file__).resolve().parents[1]   # this checkout, or site-packages when installed
_env_lock = threading.Lock()


# ---------------------------------------------------------------------------------------------
# Building a submission (pure functions; unit-tested without a cluster)

COMMANDS = {"train": ("train",), "search": ("search", "mineaug")}   # what a job can run


def build_entrypoint(spec_yaml_text: str, overrides: Iterable[str] = (), resume: str | None = None,
                     command: str = "train") -> str:
    """The shell command the job runs: ``python -m jobs.cli train --spec-b64 ... [--set k=v] [--resume RUN]``
    (``search mineaug`` instead of ``train`` for a MineAug search).

    ``python`` is the interpreter on the PATH of the cluster's ``ray start`` (where orbitgen is
    installed); every argument is shell-quoted. URI passwords in the spec and overrides are masked:
    the entrypoint is shown to whoever lists jobs. Nothing else is: the job runs this text.
    """
    if command not in COMMANDS:
        raise ValueError(f"command {command!r}: allowed {', '.join(COMMANDS)}")
    args = ["python", "-m", "jobs.cli", *COMMANDS[command], "--spec-b64", encode_inline(redact_urls(spec_yaml_text))]
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        args += ["--set", redact_urls(item)]
    if resume:
        args += ["--resume", resume]
    return shlex.join(args)


def env_from_shell(names: Iterable[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The values of ``--env NAME``: the only way a credential from this shell reaches a job."""
    environ = os.environ if environ is None else environ
    out = {}
    for name in names:
        if not name or "=" in name:
            raise UserError(f"--env {name!r}: give a variable's NAME; its value is taken from this shell "
                            "(a value on the command line would show in the shell's history and `ps`)")
        if name not in environ:
            raise UserError(f"--env {name}: {name} is not set in this shell")
        out[name] = environ[name]
    return out


def parse_runtime_env_json(text: str | None) -> dict:
    """``--runtime-env-json``: a JSON object, merged into the job's runtime_env (see :func:`build_runtime_env`)."""
    if not text:
        return {}
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--runtime-env-json is not valid JSON: {e}") from None
    if not isinstance(extra, dict):
        raise UserError(f"--runtime-env-json must be a JSON object ({{\"pip\": [...], \"env_vars\": {{...}}}}), "
                        f"got {type(extra).__name__}")
    if "working_dir" in extra:
        raise UserError("--runtime-env-json: give the working dir with --working-dir, not in the JSON")
    if "env_vars" in extra and not (isinstance(extra["env_vars"], dict)
                                    and all(isinstance(v, str) for v in extra["env_vars"].values())):
        raise UserError("--runtime-env-json: env_vars must be an object of strings")
    if "excludes" in extra and not (isinstance(extra["excludes"], list)
                                    and all(isinstance(v, str) for v in extra["excludes"])):
        raise UserError("--runtime-env-json: excludes must be a list of strings")
    return extra


def build_runtime_env(working_dir: str | os.PathLike, env: Mapping[str, str] | None = None, *,
                      environ: Mapping[str, str] | None = None,
                      sha: str | None = None, extra: Mapping[str, Any] | None = None) -> dict:
    """runtime_env for a job: the working dir (with excludes) and the forwarded variables.

    Precedence of ``env_vars``: the submitter's non-secret settings (:func:`jobs.runtime.env.job_env`)
    < ``ORBITGEN_GIT_SHA`` (the repository's HEAD: the uploaded copy has no .git) < ``extra``'s
    ``env_vars`` < ``env``. Other keys of ``extra`` (``--runtime-env-json``) are added as given;
    its ``excludes`` add to :data:`WORKING_DIR_EXCLUDES` (replacing them would upload .venv).
    """
    wd = Path(working_dir).expanduser().resolve()
    if not wd.is_dir():
        raise ValueError(f"working_dir {str(wd)!r} is not a directory")
    environ = os.environ if environ is None else environ
    extra = dict(extra or {})
    env_vars, _ = job_env(environ)
    sha = sha if sha is not None else (environ.get(GIT_SHA_ENV) or git_sha(wd))
    if sha:
        env_vars[GIT_SHA_ENV] = sha
    env_vars.update(extra.pop("env_vars", {}))
    for k, v in (env or {}).items():
        env_vars[str(k)] = str(v)
    excludes = list(WORKING_DIR_EXCLUDES) + [e for e in extra.pop("excludes", []) if e not in WORKING_DIR_EXCLUDES]
    return {**extra, "working_dir": str(wd), "excludes": excludes, "env_vars": env_vars}


def build_metadata(spec_yaml_text: str, sha: str | None = None) -> dict[str, str]:
    """Job metadata shown by ``ray job list``: the spec's name (and git sha) when available."""
    meta: dict[str, str] = {}
    try:
        import yaml

        doc = yaml.safe_load(spec_yaml_text)
    except Exception:  # the CLI validates the spec; metadata is best effort
        doc = None
    if isinstance(doc, dict) and doc.get("name"):
        meta["orbitgen.spec_name"] = redact(str(doc["name"]))
    if sha:
        meta["orbitgen.git_sha"] = sha
    return meta


@dataclass(frozen=True)
class Submission:
    """What goes to ``submit_job``, and what the user should hear about it (names, never values)."""

    entrypoint: str
    runtime_env: dict
    metadata: dict[str, str]
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    notes: tuple[str, ...] = ()
    secrets: tuple[str, ...] = field(default=(), repr=False)   # values to mask in errors


def prepare(spec_yaml_text: str, *, working_dir: str | os.PathLike, overrides: Iterable[str] = (),
            env: Mapping[str, str] | None = None, forward: Iterable[str] = (),
            runtime_env_json: str | None = None, resume: str | None = None, command: str = "train",
            entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None,
            environ: Mapping[str, str] | None = None) -> Submission:
    """The submission of ``spec_yaml_text``, checked; nothing is sent. ``forward`` names the
    variables of this shell to send (``--env``); ``env`` sets job variables directly."""
    environ = os.environ if environ is None else environ
    overrides = list(overrides)
    sent = env_from_shell(forward, environ)
    extra = parse_runtime_env_json(runtime_env_json)
    runtime_env = build_runtime_env(working_dir, {**sent, **(env or {})}, environ=environ, extra=extra)
    entrypoint = build_entrypoint(spec_yaml_text, overrides, resume, command)
    notes = []
    _, held = job_env(environ)
    held = [k for k in held if k not in runtime_env["env_vars"]]
    if held:
        notes.append(f"not sent with the job (credentials): {', '.join(held)}; the job reads them from the "
                     "cluster nodes' own environment, or send one with --env NAME")
    if any(redact_urls(t) != t for t in (spec_yaml_text, *overrides)):
        notes.append(f"credentials in the spec (URI passwords) are masked ({MASK}) in the job's copy: the job needs "
                     "them from the nodes' environment (e.g. MLFLOW_TRACKING_USERNAME/PASSWORD) or --env NAME")
    secrets = tuple(v for k, v in runtime_env["env_vars"].items() if v and is_secret(k, v))
    return Submission(entrypoint, runtime_env, build_metadata(spec_yaml_text, runtime_env["env_vars"].get(GIT_SHA_ENV)),
                      entrypoint_num_cpus, entrypoint_num_gpus, tuple(notes), secrets)


def _is_project_root(folder: Path) -> bool:
    if (folder / ".git").exists():
        return True
    try:
        return tomllib.loads((folder / "pyproject.toml").read_text()).get("project", {}).get("name") == "orbitgen"
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False


def project_root(start: str | os.PathLike) -> Path | None:
    """The nearest folder at or above ``start`` holding orbitgen's pyproject.toml or a .git. The
    walk stops at site-packages: above an installed package lies a virtualenv or a home folder."""
    start = Path(start).expanduser().resolve()
    for folder in (start, *start.parents):
        if folder.name in _INSTALL_DIRS:
            return None
        if _is_project_root(folder):
            return folder
    return None


def working_dir_for(spec_path: str | os.PathLike, explicit: str | os.PathLike | None = None, *,
                    cwd: str | os.PathLike | None = None, package_parent: Path = _PACKAGE_PARENT) -> Path:
    """The folder shipped as the job's working_dir: ``explicit`` (``--working-dir``), else the
    project found from the spec's folder, else from ``cwd``, else this orbitgen checkout. Never a
    folder inside site-packages: it would upload every installed package."""
    if explicit is not None:
        wd = Path(explicit).expanduser().resolve()
        if not wd.is_dir():
            raise UserError(f"--working-dir {str(explicit)!r} is not a folder")
    else:
        wd = (project_root(Path(spec_path).expanduser().resolve().parent) or project_root(cwd or Path.cwd())
              or project_root(package_parent))
        if wd is None:
            raise UserError(f"no project folder (with orbitgen's pyproject.toml or a .git) above {str(spec_path)!r} "
                            "or the current directory: pass --working-dir PATH, the folder to ship as the job's "
                            "working_dir")
    if _INSTALL_DIRS & set(wd.parts):
        raise UserError(f"the job's working_dir {str(wd)!r} is inside an installed package folder (site-packages): "
                        "it would upload every installed package; pass --working-dir PATH (your project folder)")
    return wd


def resolve_address(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(address, where it came from): ``explicit``, else $RAY_API_SERVER_ADDRESS (Ray's name for
    the Jobs API; RAY_ADDRESS often holds a GCS address for ray.init), else $RAY_ADDRESS, else the
    local head's dashboard."""
    environ = os.environ if environ is None else environ
    if explicit and explicit.strip():
        return explicit.strip(), "--address"
    for name in _ADDRESS_ENV_VARS:
        if environ.get(name, "").strip():
            return environ[name].strip(), f"${name}"
    return DEFAULT_ADDRESS, "the default"


def job_line(job, width: int = 72) -> str:
    """One line of ``jobs list``: id, status, start time (local), the entrypoint shortened (the
    inline spec left out; URI passwords masked, for jobs that other tools submitted)."""
    job_id = job.submission_id or job.job_id or "-"
    started = datetime.fromtimestamp(job.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") if job.start_time else "-"
    try:
        argv = shlex.split(job.entrypoint or "")
        argv = [("<spec>" if i and argv[i - 1] == "--spec-b64" else a) for i, a in enumerate(argv)]
        entry = shlex.join(argv).replace("'<spec>'", "<spec>")
    except ValueError:   # not shell syntax: shown as it is
        entry = job.entrypoint or ""
    entry = redact(entry)
    if len(entry) > width:
        entry = entry[:width - 1] + "…"
    st = getattr(job.status, "value", str(job.status))
    return f"{job_id:<28} {st:<9} {started:<19} {entry}"


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


class JobNotFound(UserError, LookupError):
    """The cluster has no job of that id."""


def _connection_error(address: str | None, err: BaseException) -> ConnectionError:
    addr, source = resolve_address(address)
    return JobsApiUnreachable(
        f"Cannot reach the Ray Jobs API at {addr!r} (from {source}): {err}\n"
        "Start a local cluster with `ray start --head` (Jobs API on http://127.0.0.1:8265), or "
        "pass the head node's dashboard address (--address, RAY_API_SERVER_ADDRESS or RAY_ADDRESS, e.g. "
        "http://<head>:8265; `ray dashboard ray_cluster.yaml` tunnels a launcher cluster's).")


@contextmanager
def _address_env_cleared() -> Iterator[None]:
    """Ray lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override an explicit address; undo that."""
    with _env_lock:
        saved = {k: os.environ.pop(k) for k in _ADDRESS_ENV_VARS if k in os.environ}
        try:
            yield
        finally:
            os.environ.update(saved)


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    addr = _normalize_address(resolve_address(address)[0])
    try:
        with _address_env_cleared():   # the order of resolve_address, not Ray's
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
    try:
        import aiohttp   # the log stream's transport

        if isinstance(e, aiohttp.ClientConnectionError):
            return True
    except ImportError:
        pass
    return isinstance(e, ConnectionError)


def _call(address: str | None, fn: Callable, job_id: str | None = None):
    try:
        return fn()
    except Exception as e:
        if _is_connection_problem(e):
            raise _connection_error(address, e) from e
        if job_id and isinstance(e, RuntimeError) and "does not exist" in str(e):
            raise JobNotFound(f"no job {job_id!r} on the cluster at {resolve_address(address)[0]!r} "
                              "(`orbitgen jobs list` shows its jobs)") from None
        raise


def send(submission: Submission, *, address: str | None, job_id: str | None = None) -> str:
    """Submit a prepared :class:`Submission`; returns the job (submission) id. ``job_id`` picks
    the id (it must be unused on the cluster)."""
    client = _client(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return _call(address, lambda: client.submit_job(
                entrypoint=submission.entrypoint, runtime_env=submission.runtime_env, metadata=submission.metadata,
                submission_id=job_id, entrypoint_num_cpus=submission.entrypoint_num_cpus,
                entrypoint_num_gpus=submission.entrypoint_num_gpus))
        except RuntimeError as e:
            # A head that has just started answers before its job agent is up: wait for it.
            if "No available agent" in str(e) and time.monotonic() <= deadline:
                time.sleep(2)
                continue
            text = str(e)
            if not any(s in text for s in submission.secrets):
                raise
            for value in submission.secrets:   # the server may quote the runtime_env back
                text = text.replace(value, MASK)
            raise RuntimeError(text) from None


def submit(spec_yaml_text: str, *, address: str | None, working_dir: str | os.PathLike,
           job_id: str | None = None, **options) -> str:
    """Submit a training job (or, with ``command="search"``, a MineAug search) for ``spec_yaml_text``;
    returns the job (submission) id.

    ``working_dir`` (normally the project root) is zipped and uploaded, without
    :data:`WORKING_DIR_EXCLUDES` and what .gitignore lists. ``options`` are those of
    :func:`prepare` (overrides, env, forward, runtime_env_json, resume, command, entrypoint_num_cpus/gpus).
    """
    return send(prepare(spec_yaml_text, working_dir=working_dir, **options), address=address, job_id=job_id)


def _status(client, address: str | None, job_id: str) -> str:
    st = _call(address, lambda: client.get_job_status(job_id), job_id)
    return getattr(st, "value", str(st))


def status(job_id: str, *, address: str | None) -> str:
    """The job's status: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    return _status(_client(address), address, job_id)


def logs(job_id: str, *, address: str | None) -> str:
    """Everything the job's driver has printed so far."""
    client = _client(address)
    return _call(address, lambda: client.get_job_logs(job_id), job_id)


def list_jobs(*, address: str | None) -> list:
    """The cluster's jobs (Ray's ``JobDetails``), newest first."""
    client = _client(address)
    return sorted(_call(address, client.list_jobs), key=lambda j: j.start_time or 0, reverse=True)


def stop(job_id: str, *, address: str | None) -> bool:
    """Ask the job to stop; True if it was running (stopping is asynchronous: see :func:`wait`)."""
    client = _client(address)
    return bool(_call(address, lambda: client.stop_job(job_id), job_id))


def _timed_out(job_id: str, st: str, timeout_s: float) -> TimeoutError:
    return TimeoutError(f"Ray job {job_id} is still {st} after {timeout_s:g} s "
                        f"(it keeps running; stop it with stop({job_id!r}))")


def follow(job_id: str, *, address: str | None, on_log: Callable[[str], None],
           timeout_s: float | None = None) -> str:
    """Stream the job's log into ``on_log`` with the SDK's ``tail_job_logs`` (the server pushes new
    lines and closes the stream once the job has ended and its log is read out); return the
    terminal status. A stream cut early is reopened; the server then starts from the log's
    beginning, so what was delivered is skipped. Raises ``TimeoutError`` naming the job when
    ``timeout_s`` passes first; the job keeps running then."""
    client = _client(address)
    _status(client, address, job_id)   # a missing job: JobNotFound, before any stream opens
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    delivered = 0

    async def tail() -> None:
        nonlocal delivered
        skip = delivered
        async for chunk in client.tail_job_logs(job_id):
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            if chunk:
                on_log(chunk)
                delivered += len(chunk)

    failures = 0
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise _timed_out(job_id, _status(client, address, job_id), timeout_s)
        before, broken = delivered, None
        try:
            asyncio.run(asyncio.wait_for(tail(), remaining))
        except TimeoutError:
            raise _timed_out(job_id, _status(client, address, job_id), timeout_s) from None
        except Exception as e:   # the stream broke (head restarting, network): reopened below
            broken = e
        st = _status(client, address, job_id)
        if broken is None and st in TERMINAL_STATUSES:
            return st
        failures = 0 if delivered > before else failures + 1
        if failures > TAIL_RECONNECTS:
            if broken is not None and _is_connection_problem(broken):
                raise _connection_error(address, broken) from broken
            raise RuntimeError(f"the log stream of Ray job {job_id} keeps closing while the job is {st}") from broken
        time.sleep(1)


def wait(job_id: str, *, address: str | None, timeout_s: float, poll_s: float = 2,
         on_log: Callable[[str], None] | None = None) -> str:
    """Follow a job until it reaches a terminal status and return that status.

    With ``on_log``, the job's log is streamed into it (:func:`follow`); without, the status is
    polled every ``poll_s``. Raises ``TimeoutError`` naming the job when ``timeout_s`` passes
    first; the job keeps running then.
    """
    if on_log is not None:
        return follow(job_id, address=address, on_log=on_log, timeout_s=timeout_s)
    client = _client(address)
    deadline = time.monotonic() + timeout_s
    while True:
        st = _status(client, address, job_id)
        if st in TERMINAL_STATUSES:
            return st
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timed_out(job_id, st, timeout_s)
        time.sleep(max(0.05, min(poll_s, remaining)))
