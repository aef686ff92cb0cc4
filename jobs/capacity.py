"""What a job asks of the cluster, whether it can ever fit, and what it waits for meanwhile.

Ray's scheduler waits without a word for resources no node has. So before anything starts:
on a cluster that cannot grow (no autoscaler, or the Ray this process started), a demand that no
arrangement of its nodes holds is refused in one line (what was asked, what the cluster has, the
`--set` that fits). On one that can grow, the driver says every so often what is pending until
the workers start (`Pending`).
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from typing import Callable, Mapping

from jobs.runtime.cluster import Cluster
from jobs.spec import JobSpec, SpecError

WAIT_REPORT_S = float(os.environ.get("ORBITGEN_WAIT_REPORT_S", "30"))   # between two "waiting for" lines


@dataclass(frozen=True)
class Demand:
    what: str                     # "training workers", "search trials", ... (plural; one drops the s)
    count: int
    bundle: Mapping[str, float]   # each one's resources
    one_per_node: bool = False    # STRICT_SPREAD
    keys: str = "scaling"         # the spec section whose keys change it

    def __str__(self) -> str:
        what = self.what[:-1] if self.count == 1 and self.what.endswith("s") else self.what
        return f"{self.count} {what} × {_fmt(self.bundle)}"


def _fmt(resources: Mapping[str, float]) -> str:
    order = {"GPU": 0, "CPU": 1}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(resources.items(), key=lambda kv: (order.get(kv[0], 2), kv[0]))
                           if v) + "}"


def training_demand(spec: JobSpec) -> Demand:
    s = spec.scaling
    return Demand("training workers", s.num_workers, {"CPU": s.cpus_per_worker, **({"GPU": 1.0} if s.use_gpu else {})},
                  one_per_node=s.placement_strategy == "STRICT_SPREAD")


def _holds(node: Mapping[str, float], bundle: Mapping[str, float], one_per_node: bool) -> int:
    """How many bundles one node holds when empty."""
    n = min((math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v), default=0)
    return min(n, 1) if one_per_node else n


def placeable(demand: Demand, nodes: list[Mapping[str, float]]) -> int:
    """How many of the demand's bundles the nodes hold, all of them empty."""
    return sum(_holds(node, demand.bundle, demand.one_per_node) for node in nodes)


def fits_ever(demand: Demand, cluster: Cluster) -> bool:
    if placeable(demand, list(cluster.nodes)) >= demand.count:
        return True
    if not cluster.can_grow:
        return False
    if cluster.max_resources is None:   # an autoscaler that does not say its limits: it may
        return True
    return all(cluster.max_resources.get(k, 0.0) >= v * demand.count for k, v in demand.bundle.items() if v)


def unfitting(demand: Demand, cluster: Cluster) -> tuple[str, str] | None:
    """(what cannot be placed, the --set that fits) when `demand` never fits on `cluster`, else None."""
    if fits_ever(demand, cluster):
        return None
    return f"{demand.keys}: {demand} never fit on {cluster.describe()}", _fitting(demand, cluster)


def refuse_unfitting(demand: Demand, cluster: Cluster) -> None:
    """SpecError in one line when `demand` can never be placed on `cluster`."""
    if why := unfitting(demand, cluster):
        raise SpecError("; ".join(why))


def _fitting(demand: Demand, cluster: Cluster) -> str:
    """The --set that makes the demand fit, as the refusal offers it."""
    k = demand.keys
    biggest = {key: max((n.get(key, 0.0) for n in cluster.nodes), default=0.0) for key in demand.bundle}
    scaling = k == "scaling"   # else a resources mapping such as search.resources_per_trial
    if demand.bundle.get("GPU") and not biggest["GPU"]:
        return f"the cluster has no GPU: --set {k}.{'use_gpu=false' if scaling else 'GPU=0'}, or run on a GPU cluster"
    if demand.bundle.get("CPU", 0) > biggest.get("CPU", 0):
        return (f"no node has {demand.bundle['CPU']:g} CPUs: --set {k}.{'cpus_per_worker' if scaling else 'CPU'}="
                f"{max(biggest.get('CPU', 1), 1):g}")
    most = placeable(demand, list(cluster.nodes))
    if most and demand.one_per_node:
        return f"one per node on {most} node(s): --set {k}.num_workers={most}, or {k}.placement_strategy=PACK"
    return f"--set {k}.num_workers={max(most, 1)} (with train.batch divisible by it)"


class Pending:
    """The line that says what a job waits for, while it waits."""

    def __init__(self, demand: Demand):
        self.demand = demand

    def _placed(self) -> bool:
        """A placement group of this job (the driver's Ray job: Ray Train's controller makes it) of
        the demand's size holds its resources: the workers are starting. Another job's group of the
        same size is not ours, however alike: a cluster shared with other work has them."""
        import ray
        from ray.util.state import list_placement_groups

        groups = list_placement_groups(filters=[("creator_job_id", "=", ray.get_runtime_context().get_job_id()),
                                                ("state", "=", "CREATED")], detail=True, raise_on_missing_output=False)
        return any(len(pg.bundles or ()) == self.demand.count for pg in groups)

    def line(self) -> str:
        if self._placed():
            return f"{self.demand} placed, starting (loading libraries, joining the process group)"
        return self.unplaced()

    def unplaced(self) -> str:
        """What the demand waits for: nodes yet to come, or resources other work holds."""
        import ray

        free = {k: float(v) for k, v in ray.available_resources().items()}
        total = {k: float(v) for k, v in ray.cluster_resources().items()}
        wanted = {k: v * self.demand.count for k, v in self.demand.bundle.items() if v}
        lacking = {k: total.get(k, 0.0) for k, v in wanted.items() if total.get(k, 0.0) < v}
        if lacking:
            has = ", ".join(f"{have:g} {k}{'s' * (have != 1)}" for k, have in lacking.items())
            return f"waiting for {self.demand}: cluster has {has}; the autoscaler is adding nodes"
        busy = ", ".join(f"{free.get(k, 0.0):g} of {total[k]:g} {k}s free" for k in wanted)
        if all(free.get(k, 0.0) >= v for k, v in wanted.items()):   # the other work just let go
            return f"waiting for {self.demand}: {busy}, Ray is placing them"
        return f"waiting for {self.demand}: {busy} (other work holds the rest)"


class PendingTrials:
    """For a job of many small placements (a search's trials): while it runs, every `every_s`, a
    line says what its placements still pending wait for. Read from Ray's state API; a state API
    that does not answer only costs the line."""

    def __init__(self, what: str, say: Callable[[str], None], every_s: float = WAIT_REPORT_S):
        self.what, self.say, self.every_s = what, say, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="orbitgen-pending", daemon=True)

    def _pending(self) -> list[Mapping[str, float]]:
        import ray
        from ray.util.state import list_placement_groups

        groups = list_placement_groups(filters=[("creator_job_id", "=", ray.get_runtime_context().get_job_id()),
                                                ("state", "=", "PENDING")], detail=True, raise_on_missing_output=False)
        return [dict(b.get("unit_resources") or {}) for pg in groups for b in (pg.bundles or ())[:1]]

    def _watch(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                pending = self._pending()
            except Exception:   # noqa: BLE001 - the line is a courtesy; the search goes on without it
                continue
            if pending:
                bundle = {k: float(v) for k, v in pending[0].items() if k in ("CPU", "GPU")}
                self.say(Pending(Demand(self.what, len(pending), bundle)).unplaced())

    def __enter__(self) -> "PendingTrials":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
