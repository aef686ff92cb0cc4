"""What the connected Ray cluster is, for the two questions a job asks before it starts: do its
nodes share a disk (one machine) or not, and does what the spec asks for fit (now, or once an
autoscaler has added nodes)?

Read from Ray's view of its nodes and, where an autoscaler runs, the limits it publishes (the
cluster config that KubeRay's and the v2 autoscaler write; the v1 launcher autoscaler only says
that it runs). Ray must be initialised.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

# Ray's own bookkeeping resources: never what a spec asks for.
_BOOKKEEPING = ("node:", "accelerator_type:", "object_store_memory", "memory")


@dataclass(frozen=True)
class Cluster:
    nodes: tuple[Mapping[str, float], ...]          # each alive node's total resources
    can_grow: bool = False                          # an autoscaler may add nodes
    max_resources: Mapping[str, float] | None = None   # what it may grow to, where it says
    local: bool = False                             # the Ray this process started on this machine

    @property
    def spans_machines(self) -> bool:
        """Nodes that may not share this machine's disk: more than one (two nodes on one host may
        still see different folders: containers, pods), or nodes yet to come."""
        return self.can_grow or len(self.nodes) > 1

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for node in self.nodes:
            for key, value in node.items():
                out[key] = out.get(key, 0.0) + value
        return out

    def describe(self) -> str:
        """`2 nodes: {CPU: 16, GPU: 2}`, the autoscaler named when there is one."""
        totals = ", ".join(f"{k}: {v:g}" for k, v in sorted(self.totals().items()) if k in ("CPU", "GPU"))
        where = "this machine's Ray" if self.local else f"{len(self.nodes)} node{'s' * (len(self.nodes) != 1)}"
        return f"{where}: {{{totals or 'nothing'}}}" + (" (an autoscaler may add nodes)" if self.can_grow else "")


def _wanted(resources: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in resources.items() if not k.startswith(_BOOKKEEPING) and v}


def _autoscaler() -> tuple[bool, dict[str, float] | None]:
    """(an autoscaler runs, the most it may grow each resource to where it says)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    limits = None
    try:   # private API: what Ray Train itself reads for the same question
        from ray._private.state import state

        if state.get_cluster_config() is not None:
            limits = {k: float(v) for k, v in (state.get_max_resources_from_cluster_config() or {}).items()}
    except Exception:
        limits = None
    if limits is not None:
        return any(v > 0 for v in limits.values()), limits
    # The v1 autoscaler (the launcher's, KubeRay's sidecar): every head runs a monitor, but one
    # without an autoscaling config is read-only and names each node's type after the node itself;
    # a real one maps nodes to the node types of its config (ray.worker.gpu, a worker group).
    try:
        status = json.loads(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS) or b"{}")
    except Exception:
        status = {}
    return grows(status), None


def grows(status: dict) -> bool:
    """Whether the monitor's status (Ray's `__autoscaling_status`) is a real autoscaler's."""
    from ray.autoscaler._private.util import format_readonly_node_type

    mapping = (status.get("autoscaler_report") or {}).get("node_type_mapping") or {}
    return any(kind != format_readonly_node_type(node) for node, kind in mapping.items())


def current(local: bool = False) -> Cluster:
    """The connected cluster as it is now; `local`: this process started it."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    can_grow, limits = (False, None) if local else _autoscaler()
    return Cluster(nodes=tuple(_wanted(n.get("Resources", {})) for n in alive), can_grow=can_grow,
                   max_resources=limits, local=local)
