"""Asynchronous successive halving (ASHA's rule) that records every decision it takes.

Stage 2 runs it over the Optuna proposals only: the controls run in a Tune run of their own
without a scheduler, so their values never set a rung's cutoff and they are never stopped.
Rungs sit at grace, grace·rf, grace·rf², ... below the budget; the grace period is at least a
quarter of the budget (`grace_steps`), because short proxies favour plain data and an augmented
subset judged too early is judged on the wrong thing. A trial reaching a rung is stopped when
its value is worse than the cutoff, the (1/rf)-quantile of the values recorded at that rung so
far (for rf=2 the median; as Ray's ASHAScheduler, written out here so that each cutoff can be
recorded). The first trial at a rung is never stopped there.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from ray.tune.schedulers import FIFOScheduler, TrialScheduler


def grace_steps(budget_steps: int) -> int:
    """The first rung: a quarter of the budget, rounded up (never earlier)."""
    return max(1, math.ceil(budget_steps / 4))


def rung_steps(budget_steps: int, reduction_factor: float = 2.0) -> list[int]:
    """The rungs, ascending: grace·rf^i strictly below the budget (a trial at the budget is done)."""
    rungs, step = [], float(grace_steps(budget_steps))
    while step < budget_steps:
        rungs.append(int(math.ceil(step)))
        step *= reduction_factor
    return rungs


@dataclass
class RungDecision:
    rung: int               # the rung's step
    step: int               # the step the trial reported when it reached the rung
    trial: str              # the subset key (Tune's trial id when the result names none)
    value: float
    cutoff: float | None    # None: first at this rung, nothing to compare against
    stopped: bool


class RecordedHalving(FIFOScheduler):
    """ASHA for minimised metrics (`time_attr` grows, `metric` is minimised), with a record."""

    def __init__(self, *, time_attr: str, metric: str, budget_steps: int, reduction_factor: float = 2.0,
                 label: str = "subset"):
        super().__init__()
        # FIFOScheduler's `metric`/`mode` properties read these.
        self._metric, self._mode = metric, "min"
        self.time_attr, self.rf, self.label = time_attr, reduction_factor, label
        self.rungs = rung_steps(budget_steps, reduction_factor)
        self.recorded: dict[int, dict[str, float]] = {r: {} for r in self.rungs}
        self.decisions: list[RungDecision] = []

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True   # metric and mode are fixed at construction (min)

    def cutoff(self, rung: int) -> float | None:
        values = list(self.recorded[rung].values())
        return float(np.nanpercentile(values, 100.0 / self.rf)) if values else None

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if self.time_attr not in result or result.get(self._metric) is None:
            return TrialScheduler.CONTINUE
        step, value = result[self.time_attr], float(result[self._metric])
        # The highest rung reached that this trial has not been judged at yet (as ASHA: one per result).
        for rung in reversed(self.rungs):
            if step >= rung and trial.trial_id not in self.recorded[rung]:
                cutoff = self.cutoff(rung)
                stop = cutoff is not None and value > cutoff
                self.recorded[rung][trial.trial_id] = value
                self.decisions.append(RungDecision(rung, int(step), str(result.get(self.label) or trial.trial_id),
                                                   value, cutoff, stop))
                return TrialScheduler.STOP if stop else TrialScheduler.CONTINUE
            if step >= rung:
                break
        return TrialScheduler.CONTINUE

    def summary(self) -> list[dict]:
        """Per rung: how many trials reached it, how many it stopped, its last cutoff."""
        out = []
        for rung in self.rungs:
            ds = [d for d in self.decisions if d.rung == rung]
            out.append({"rung": rung, "judged": len(ds), "stopped": sum(d.stopped for d in ds),
                        "last_cutoff": next((d.cutoff for d in reversed(ds) if d.cutoff is not None), None)})
        return out

    def record(self) -> list[dict]:
        return [asdict(d) for d in self.decisions]
