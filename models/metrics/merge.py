"""Merging the states of metrics that saw disjoint parts of one evaluation.

A distributed evaluation (`jobs.eval.distributed`) runs one `MetricSuite` per Ray worker, each on
its own seeds or inputs, and merges their states on the driver. torchmetrics' own `merge_state`
does not serve: it puts the incoming list states *before* the local ones (KID's random subsets
index into the concatenated features, so order changes the value) and it averages `mean`
states by update count (PSNR's constant `data_range` would come out as nan). Here: sums add,
lists append in merge order, any other state must be equal (a constant of the configuration).
"""
from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_sum

MetricState = tuple[dict[str, Any], int]   # (state tensors on the CPU, number of updates)


def metric_state(metric: Metric) -> MetricState:
    """A CPU copy of the metric's state, to send to another process."""
    def cpu(v: Any) -> Any:
        return [t.detach().cpu() for t in v] if isinstance(v, list) else v.detach().cpu()
    return {name: cpu(v) for name, v in metric.metric_state.items()}, metric.update_count


def merge_state(metric: Metric, state: MetricState) -> None:
    """Adds `state` (from `metric_state` of a metric of the same configuration) to `metric`, as
    if that metric's updates had come after this one's."""
    values, updates = state
    for name, incoming in values.items():
        mine = getattr(metric, name)
        if isinstance(mine, list):
            setattr(metric, name, mine + [t.to(metric.device) for t in incoming])
        elif metric._reductions[name] is dim_zero_sum:
            setattr(metric, name, mine + incoming.to(mine.device))
        elif not torch.equal(mine, incoming.to(mine.device)):
            raise ValueError(f"{type(metric).__name__}.{name}: states of different configurations do not merge")
    # compute() warns when update() was never called; merged updates count as updates.
    metric._update_count += updates
