"""Optuna's parameter importances of stage 2's proposal study, for the parent run (issue 23, item 5).

Computed over the proposals that finished with a finite objective: a proposal stopped by the
halving reports +inf (search.validate: UNFINISHED), which no importance evaluator takes. Too few
finished trials give no importances at all rather than the evaluator's equal shares. While the
proposals are one categorical (the subset, search.proposals), its importance is 1 by definition;
the file and the line are there for a study with more parameters, and say how many trials they
rest on.
"""
from __future__ import annotations

import math
import warnings

from search.tracking import write_csv

MIN_FINISHED = 4          # fewer finished proposals: no importances (the evaluators need a spread)
COLUMNS = ("param", "importance", "finished_trials")


def finished_trials(storage_url: str | None, study_name: str) -> list:
    """The stored study's COMPLETE trials with a finite value; [] without a stored study."""
    if storage_url is None:
        return []
    import optuna

    try:
        study = optuna.load_study(study_name=study_name, storage=storage_url)
    except KeyError:   # no such study
        return []
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE
            and t.value is not None and math.isfinite(t.value)]


def param_importances(storage_url: str | None, study_name: str, min_finished: int = MIN_FINISHED
                      ) -> tuple[dict[str, float], int] | None:
    """({parameter: importance}, finished trials) from optuna.importance.get_param_importances over
    the finished proposals; None with fewer than `min_finished` of them."""
    trials = finished_trials(storage_url, study_name)
    if len(trials) < min_finished:
        return None
    import optuna

    study = optuna.create_study(direction="minimize")   # in memory: the finite trials only
    study.add_trials(trials)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # Optuna's "experimental" and small-sample notices
        importances = optuna.importance.get_param_importances(study)
    return {name: float(v) for name, v in importances.items()}, len(trials)


def importances_csv(importances: dict[str, float], finished: int) -> str:
    return write_csv([{"param": p, "importance": v, "finished_trials": finished} for p, v in importances.items()],
                     COLUMNS)


def too_few_line(finished: int, min_finished: int = MIN_FINISHED) -> str:
    """The console line when there are no importances to report."""
    return (f"stage 2: no Optuna parameter importances: {finished} finished proposal(s), fewer than "
            f"{min_finished}")


def importances_line(importances: dict[str, float], finished: int) -> str:
    """One line for the console: the parameters by importance."""
    parts = ", ".join(f"{p} {v:.3f}" for p, v in sorted(importances.items(), key=lambda kv: -kv[1]))
    return f"stage 2: Optuna parameter importances over {finished} finished proposals: {parts}"
