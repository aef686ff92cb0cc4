"""Stage 2's Optuna searcher: Ray Tune's OptunaSearch, except that a proposal stopped at a halving
rung is PRUNED in the study, as Optuna's own pruners leave a trial, not COMPLETE at +inf.

Tune's OptunaSearch reads each result's objective, and stage 2 reports +inf as the objective until a
run ends (search/validate.py): a stopped run's last objective is that +inf, which Tune would tell
Optuna as a finished value. optuna-dashboard then lists stopped runs as finished ones, and Optuna's
plots warn once per such trial that they omit it. Here the +inf is not passed on, so the state is
PRUNED; a trial that raised still ends FAIL."""
from __future__ import annotations

import math

from ray.tune.search.optuna import OptunaSearch


class ProposalSearch(OptunaSearch):
    """OptunaSearch over stage 2's proposals; `objective` is the metric that is +inf until the end."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if result is not None and not math.isfinite(result.get(self.metric, math.nan)):
            result = {k: v for k, v in result.items() if k != self.metric}
        super().on_trial_complete(trial_id, result, error)
