"""Joining Ray: the local one-machine default, a cluster, or the job's own under Ray Jobs; and the
Ray Train settings that suit a cluster of one node."""
from __future__ import annotations

import os

from jobs.runtime import console


def ensure_ray(num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Quiet unless --verbose (jobs/runtime/console.py): the workers' lines stay in Ray's logs, the
    # driver's progress bar shows the run.
    loud = console.verbose()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=loud, configure_logging=loud)   # a cluster, or the job's own under Ray Jobs
    else:
        # The dashboard stays on: Ray Train's placement-group cleaner queries the state API it serves.
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=300_000_000, log_to_driver=loud,
                 configure_logging=loud)


PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def one_node_settings() -> dict[str, str]:
    """Ray Train settings for a cluster of one node (the local one, or a lone head): its preemption
    watcher, one more actor started beside the workers on the way into training, watches for
    nodes going away, which there would take the controller with them."""
    import ray

    if PREEMPTION_WATCHER in os.environ:   # the user's choice
        return {}
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return {PREEMPTION_WATCHER: "0"} if len(alive) == 1 else {}
