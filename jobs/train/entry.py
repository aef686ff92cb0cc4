"""The function Ray Train runs on every worker: a thin entry into `jobs.train.loop`.

Ray unpickles it in its train controller too, which never runs the loop. Kept apart from the loop
(torch's families, mlflow, torchmetrics, the data plane), it costs the controller only this
module and `jobs.train.config`.
"""
from __future__ import annotations

from typing import Any

from jobs.train.config import WorkerConfig


def train_loop_per_worker(config: dict[str, Any]) -> None:
    from jobs.train.loop import run_worker

    run_worker(WorkerConfig.from_loop_config(config))
