"""What a training command shows: orbitgen's own lines and one progress bar (jobs/train/progress.py).

Unless `--verbose`: Ray's and MLflow's internal lines, and Python warnings a user cannot act on
(deprecations inside the libraries), go to a log file under the work dir; the workers' console
output stays in Ray's session logs (their folder is linked from the same place). With
`--verbose` everything reaches the console as before. The choice travels in the environment,
so the local Ray that the command starts, and a job it submits, follow it.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import time
from pathlib import Path
from typing import Iterator

VERBOSE_ENV = "ORBITGEN_VERBOSE"
LIBRARY_LOGGERS = ("ray", "mlflow", "alembic", "DeepSpeed", "deepspeed", "botocore", "s3fs", "urllib3", "py.warnings")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def set_verbose(flag: bool) -> None:
    os.environ[VERBOSE_ENV] = "1" if flag else "0"


class _FolderMadeOnFirstLine(logging.FileHandler):
    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


def library_lines_to_file(logs: Path) -> Path | None:
    """Unless verbose: the libraries' log lines and warnings into `logs/orbitgen-<time>.log`
    (returned); their console handlers removed."""
    if verbose():
        return None
    for library in ("mlflow", "ray"):   # importing them installs their console handlers: first, then replace
        importlib.import_module(library)

    path = logs / f"orbitgen-{time.strftime('%Y%m%d-%H%M%S')}.log"
    handler = _FolderMadeOnFirstLine(path, delay=True)   # bad input leaves no folder behind
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO)
    return path


def link_ray_logs(logs: Path) -> Path | None:
    """`logs/ray` → the running local Ray session's log folder (the workers' console output)."""
    import ray

    # Private, but the only way to the session folder; None when this process joined a remote cluster.
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return None
    session = Path(node.get_session_dir_path())
    link = logs / "ray"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(session / "logs", target_is_directory=True)
    return link


@contextlib.contextmanager
def prints_to_log(logger: str) -> Iterator[None]:
    """What a library prints to stderr inside (MLflow's "Successfully registered model") goes to
    its logger, so to the log file, unless verbose."""
    if verbose():
        yield
        return
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            yield
    finally:
        for line in printed.getvalue().splitlines():
            logging.getLogger(logger).info(line)
