"""`SearchContext`: what one search's steps share once its parent run is open and its originals are read.

`search.run` builds it; the driver's steps (`search.run`) and stage 2 (`search.validate`) read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:   # types only: stage-2 workers import this through search.validate and need no MLflow
    from search.config import SearchConfig
    from search.originals import Originals
    from search.store import SearchStore
    from search.tracking import SearchTracker

# (augmentations, budget_steps, report(step, fid), trial_dir) -> {"fid": ..., ...}; see search.validate.
TrainFn = Callable[[list, int, Callable[[int, float], None], str], dict]


def _quiet(line: str) -> None:
    pass


@dataclass(frozen=True)
class SearchContext:
    config: SearchConfig
    candidates: Sequence[str]          # resolved from the config for the data's channels
    channels: int                      # as the caller gave it (logged, part of the resume check)
    originals: Originals               # read and featurised once
    extractor: str                     # the extractor's spec name, as trials build it again
    extractor_weights: str | None
    store: SearchStore
    tracker: SearchTracker
    parent_run_id: str
    name: str
    train_fn: TrainFn | None = None    # stage 2's proxy training
    say: Callable[[str], None] = _quiet
    validate_resources: dict[str, float] | None = None

    @property
    def stage2_resources(self) -> dict[str, float]:
        return self.validate_resources or self.config.resources_per_trial
