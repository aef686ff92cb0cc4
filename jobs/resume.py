"""What continuing a stopped run needs beyond Ray's own state.

Ray Train resumes a run by itself when a TorchTrainer starts again with the same storage path and
run name: the workers get the latest checkpoint from `ray.train.get_checkpoint()`. What Ray does
not know is the MLflow run to keep logging into; the driver writes it into `orbitgen-run.json`
in the run's folder when the run starts, and reads it back on `--resume`.
"""
from __future__ import annotations

import json
from typing import Any

from data_shards.errors import UserError
from data_shards.storage import filesystem, join

RUN_INFO = "orbitgen-run.json"


class ResumeError(UserError):
    """A run that cannot be resumed; the message says why and what exists."""


def write_run_info(storage: str, run_name: str, info: dict[str, Any]) -> None:
    fs, path = filesystem(join(storage, run_name, RUN_INFO))
    with fs.open(path, "w") as f:
        json.dump(info, f, indent=1)


def read_run_info(storage: str, run_name: str) -> dict[str, Any]:
    fs, path = filesystem(join(storage, run_name, RUN_INFO))
    if not fs.exists(path):
        root_fs, root = filesystem(storage)
        runs = sorted(p.split("/")[-2] for p in root_fs.glob(join(root, "*", RUN_INFO)))
        raise ResumeError(f"no orbitgen run {run_name!r} under {storage} "
                          f"(runs there: {', '.join(runs) or 'none'})")
    with fs.open(path, "r") as f:
        return json.load(f)
