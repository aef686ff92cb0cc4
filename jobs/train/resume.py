"""What continuing a stopped run needs beyond Ray's own state.

Ray Train resumes a run by itself when a TorchTrainer starts again with the same storage path and
run name: the workers get the latest checkpoint from `ray.train.get_checkpoint()`. What Ray does
not know is the MLflow run to keep logging into; the driver writes it into `orbitgen-run.json`
in the run's folder when the run starts, and reads it back on `--resume`: a file cut short by a
crash, or without the run's id, is `DamagedRunInfo`, naming the run and what to do.

Nor does Ray check that the checkpoint it hands out is whole: the workers resume from
`checkpoint_to_resume(ray.train.get_checkpoint())`, which passes over a checkpoint whose files
are not all there as written (jobs/train/checkpoints.py `verify`) for the latest complete one beside it.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from data_shards.card import write_whole
from data_shards.errors import UserError
from data_shards.storage import filesystem, join
from jobs.runtime.redact import redact_json
from jobs.train.checkpoints import IncompleteCheckpoint, verify

RUN_INFO = "orbitgen-run.json"
log = logging.getLogger(__name__)


class ResumeError(UserError):
    """A run that cannot be resumed; the message says why and what exists."""


def write_run_info(storage: str, run_name: str, info: dict[str, Any]) -> None:
    fs, path = filesystem(join(storage, run_name, RUN_INFO))
    # Redacted: the run's storage is shared and kept; a tracking URI may carry a password.
    # Whole or not at all (a temporary name renamed into place): a crash never leaves half a file
    # for --resume to read.
    write_whole(fs, path, json.dumps(redact_json(info), indent=1).encode())


def read_run_info(storage: str, run_name: str) -> dict[str, Any]:
    fs, path = filesystem(join(storage, run_name, RUN_INFO))
    if not fs.exists(path):
        root_fs, root = filesystem(storage)
        runs = sorted(p.split("/")[-2] for p in root_fs.glob(join(root, "*", RUN_INFO)))
        raise ResumeError(f"no orbitgen run {run_name!r} under {storage} "
                          f"(runs there: {', '.join(runs) or 'none'})")
    try:
        with fs.open(path, "rb") as f:
            info = json.loads(f.read().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedRunInfo(_damaged(storage, run_name, f"not valid JSON ({e})")) from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(info, dict) or not isinstance(info.get(k), str)]
    if missing:
        raise DamagedRunInfo(_damaged(storage, run_name, f"it lacks {', '.join(missing)}"))
    return info


REQUIRED_KEYS = ("mlflow_run_id", "tracking_uri")   # what `--resume` needs to log into the same MLflow run


class DamagedRunInfo(ResumeError):
    """The run's `orbitgen-run.json` is there but cut short (a crash while it was written) or edited."""


def _damaged(storage: str, run_name: str, why: str) -> str:
    return (f"cannot resume run {run_name!r}: its {join(storage, run_name, RUN_INFO)} is damaged ({why}; a crash "
            "while it was written?); restore that file, or start a new run without --resume (its checkpoints "
            "stay where they are)")


def checkpoint_to_resume(latest):
    """`latest` (a `ray.train.Checkpoint`, or None) when it is complete; else the complete
    checkpoint with the most steps in the same run folder, or None (start over) when there is none.
    Each checkpoint passed over is logged with what is wrong with it."""
    if latest is None:
        return None
    import pyarrow.fs
    import ray.train

    fs, path = latest.filesystem, latest.path.rstrip("/")
    run_dir = path.rsplit("/", 1)[0]
    others = sorted((i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(run_dir))
                     if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_")
                     and i.path.rstrip("/") != path), reverse=True)   # names end in a timestamp: newest first
    best: tuple[int, str] | None = None
    for candidate in [path, *others]:
        try:
            step = verify(candidate, fs)
        except IncompleteCheckpoint as e:
            log.warning("not resuming from an incomplete checkpoint: %s", e)
            continue
        if candidate == path:
            return latest
        if best is None or step > best[0]:
            best = (step, candidate)
    if best is None:
        log.warning("no complete checkpoint under %s: starting from step 0", run_dir)
        return None
    log.warning("resuming from %s (step %d) instead of the incomplete latest checkpoint", best[1], best[0])
    return ray.train.Checkpoint(best[1], filesystem=fs)
