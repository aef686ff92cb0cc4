"""Joining Ray: the local one-machine default, a cluster, or the job's own under Ray Jobs; and the
Ray Train settings that suit a cluster of one node.

Ray's authentication is left as the cluster runs it: orbitgen never turns it off. A Ray this
process starts uses Ray's default for a new local cluster (token authentication: its servers
listen on every interface, so a token is what keeps other hosts out).
"""
from __future__ import annotations

import os

from data_shards.errors import UserError
from jobs.runtime import console
from jobs.runtime.cluster import Cluster, current

_started_here = False


def ensure_ray(num_cpus: int | None = None) -> Cluster:
    """Ray, joined or started, and what the cluster is."""
    import ray

    global _started_here
    if ray.is_initialized():
        return current(local=_started_here)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Quiet unless --verbose (jobs/runtime/console.py): the workers' lines stay in Ray's logs, the
    # driver's progress bar shows the run.
    loud = console.verbose()
    address = os.environ.get("RAY_ADDRESS")
    if address:
        if address.startswith(("http://", "https://")):
            raise UserError(f"RAY_ADDRESS={address} is a cluster's Jobs API: run the spec there with "
                            f"`orbitgen jobs submit SPEC --address {address}`, or set RAY_ADDRESS to the cluster's "
                            "GCS address (HEAD:6379) to drive it from this machine")
        ray.init(log_to_driver=loud, configure_logging=loud)   # a cluster, or the job's own under Ray Jobs
    else:
        # The dashboard stays on: Ray Train's placement-group cleaner queries the state API it serves.
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=300_000_000, log_to_driver=loud,
                 configure_logging=loud, dashboard_host="127.0.0.1")
        _started_here = True
    return current(local=_started_here)


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
