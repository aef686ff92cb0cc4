"""Training-time evaluation spread over the ranks of the run, equal to rank 0 evaluating alone.

Every rank scores its share of one evaluation, the share `jobs.eval.distributed.plan` gives
worker r of W (the r-th contiguous range of the real batches and of the generated batches, cut at
multiples of the batch), into its own `MetricSuite`. The suites' states go to rank 0
(`gather`: torch.distributed's gather_object in the loop), which merges them in rank order, the
order of one process (`MetricSuite.merge`: sums add, KID's and precision/recall's features
concatenate), and computes the values. So a 50k-sample evaluation takes 1/W of the time on each
of W GPUs instead of all of it on one while the others wait.

Every rank must call `evaluate_spread` for the same evaluation (it ends in a collective); the
metrics themselves never synchronise (`models.metrics.suite.LOCAL`): the merge is explicit.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from jobs.eval.core import EvalSettings, eval_params, fp32_highest, real_positions, score_part
from jobs.eval.distributed import plan
from models.family import Family

# gather(obj) -> every rank's obj in rank order on rank 0, None on the others.
Gather = Callable[[Any], "list[Any] | None"]


def score_share(family: Family, sampler: nn.Module, settings: EvalSettings, *, data_url: str,
                device: torch.device, rank: int, world: int) -> dict:
    """The `MetricSuite.state()` of rank `rank`'s share of the evaluation."""
    s = settings
    suite = s.suite(family, device)
    positions = real_positions(family, data_url, s.num_samples, s.holdout, s.real_seed)
    for chunk in plan(positions, s, conditional=family.conditional, workers=world)[rank]:
        score_part(family, sampler, suite, data_url=data_url, positions=chunk.positions,
                   fake_starts=chunk.fake_starts, num_samples=s.num_samples, device=device, batch=s.batch,
                   seed_base=s.seed_base)
    return suite.state()


def merged_scores(family: Family, settings: EvalSettings, states: list[dict], device: torch.device
                  ) -> tuple[dict[str, float], dict[str, str]]:
    """(values, params) of the shares' states merged in rank order."""
    suite = settings.suite(family, device)
    for state in states:
        suite.merge(state)
    params = eval_params(suite, family, settings.holdout, settings.real_seed) | {"eval_ranks": str(len(states))}
    with fp32_highest():   # precision/recall's distances run in compute()
        return suite.compute(), params


def evaluate_spread(family: Family, sampler: nn.Module, settings: EvalSettings, *, data_url: str,
                    device: torch.device, rank: int, world: int, gather: Gather
                    ) -> tuple[dict[str, float], dict[str, str]] | None:
    """(values, params) on rank 0, None on the other ranks, which must all call it too."""
    state = score_share(family, sampler, settings, data_url=data_url, device=device, rank=rank, world=world)
    states = gather(state)
    if rank != 0:
        return None
    return merged_scores(family, settings, states, device)


def gather_to_rank0(world: int, rank: int) -> Gather:
    """`gather` over the default process group (one rank: no group needed)."""
    def gather(obj: Any) -> list[Any] | None:
        if world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * world if rank == 0 else None
        dist.gather_object(obj, out, dst=0)
        return out
    return gather
