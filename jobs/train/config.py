"""What the driver hands every training worker. Torch-free: Ray unpickles it in its train
controller too, which never runs the loop, and that start-up is on the critical path of every run."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping


@dataclass(frozen=True)
class WorkerConfig:
    """What the driver (`jobs.train.driver`) hands every worker; Ray pickles it as `train_loop_config["worker"]`."""

    spec: dict[str, Any]                 # the validated spec, as JSON-able data
    run_id: str                          # the MLflow run rank 0 logs into
    tracking_uri: str
    data_url: str                        # the training shards (built-in sets already materialised)
    env: dict[str, str] = field(default_factory=dict)           # forwarded variables (S3 endpoint; no credential)
    model_files: dict[str, Any] = field(default_factory=dict)   # files `model.*_from` names, shipped by the driver
    progress_board: str | None = None    # the driver's progress board (jobs/train/progress.py); rank 0 posts to it

    def __repr__(self) -> str:
        # Ray's Train state (dashboard, state API) shows the loop config as this text: the run, not
        # the spec's URLs, which may carry a password.
        return f"WorkerConfig(run_id={self.run_id!r}, family={self.spec.get('family')!r}, env={sorted(self.env)})"

    def as_loop_config(self) -> dict[str, Any]:
        return {"worker": self}

    @classmethod
    def from_loop_config(cls, config: Mapping[str, Any]) -> "WorkerConfig":
        return config["worker"]
