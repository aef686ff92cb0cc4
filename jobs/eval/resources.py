"""What each Ray worker of an evaluation or a generation asks for, and how it uses what it gets.

`orbitgen eval` and `orbitgen models generate` start W actors. Each asks for an equal share of
the cluster's CPUs (whole CPUs where W of them fit on the nodes, so a worker can run torch on
several threads; an equal fraction below one CPU, so that W workers always fit) and for
`--gpus-per-worker` GPUs. A GPU ask on a cluster that can never hold it (no GPUs and no
autoscaler to add them) is refused in one line before any actor starts, as training's is
(jobs/capacity.py); Ray would otherwise wait for it without a word.

Inside a worker, `worker_device` is the GPU Ray assigned it (Ray sets CUDA_VISIBLE_DEVICES to
the actor's GPUs, so it is `cuda`), else the CPU; `use_cpu_share` sets torch's thread count to
the worker's whole CPUs.
"""
from __future__ import annotations

import math
from typing import Mapping

from data_shards.errors import UserError
from jobs.capacity import Demand, placeable, unfitting
from jobs.runtime.cluster import Cluster


def cpu_share(nodes: list[Mapping[str, float]], workers: int) -> float:
    """Each worker's CPUs: the most whole CPUs at which `workers` workers fit on the (empty) nodes,
    else an equal fraction of the cluster's CPUs (below one); 0 on a cluster that reports none."""
    total = sum(node.get("CPU", 0.0) for node in nodes)
    if not total:
        return 0.0
    for cpus in range(int(total // workers), 0, -1):   # at most the cluster's CPU count of tries
        if placeable(Demand("workers", workers, {"CPU": float(cpus)}), nodes) >= workers:
            return float(cpus)
    return total / workers


def auto_gpu_share(nodes: list[Mapping[str, float]], workers: int) -> float:
    """Each worker's share of the cluster's GPUs, at most one (0 without GPUs)."""
    total = sum(node.get("GPU", 0.0) for node in nodes)
    return min(1.0, total / workers) if total else 0.0


def refuse_gpu_ask(gpus_per_worker: float, workers: int, cluster: Cluster, what: str) -> None:
    """UserError in one line when `workers` workers of `gpus_per_worker` GPUs never fit on `cluster`."""
    if gpus_per_worker < 0:
        raise UserError(f"--gpus-per-worker must be 0 or more, not {gpus_per_worker:g}")
    if not gpus_per_worker:
        return
    demand = Demand(what, workers, {"GPU": float(gpus_per_worker)}, keys="--gpus-per-worker")
    why = unfitting(demand, cluster)
    if why is None:
        return
    biggest = max((node.get("GPU", 0.0) for node in cluster.nodes), default=0.0)
    fix = ("the cluster has no GPU: leave --gpus-per-worker out (0, the CPU), or run on a GPU cluster" if not biggest
           else f"ask for at most {biggest:g} GPUs a worker, or fewer --workers")
    raise UserError(f"--gpus-per-worker {gpus_per_worker:g}: {why[0].removeprefix('--gpus-per-worker: ')}; {fix}")


def worker_device():
    """In a Ray actor: `cuda` when Ray assigned it a GPU and torch sees one, else the CPU."""
    import ray
    import torch

    return torch.device("cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu")


def use_cpu_share() -> int:
    """In a Ray actor: torch runs on as many threads as the actor has whole CPUs (at least one)."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    threads = max(1, math.floor(cpus + 1e-9))
    torch.set_num_threads(threads)
    return threads
