"""A training worker killed with SIGKILL mid-run (a real kill, not an exception): Ray Train restarts
the worker group from the last checkpoint, at most one checkpoint interval of work is lost, and the
run ends exactly where an uninterrupted run with the same seed ends, under DDP and DeepSpeed
ZeRO-2 on 2 CPU workers. The runs keep their checkpoints by FID (`checkpoint.best_metric`): the
restart still takes the latest one, and the run hands the best one to the registry. With tests/test_resume.py (ZeRO-1, stopped and resumed by name) this is
the exact-resume test of each strategy; the restart path (`ray.train.get_checkpoint()`) is the same."""
from __future__ import annotations

import pytest

from mlflow.tracking import MlflowClient

from jobs.train import checkpoints
from test_resume import (BATCH, STEPS, assert_resumed_once_losing_at_most_one_interval, assert_same_weights,
                         checkpoint_weights, latest_checkpoint, reference, run_killed, tiny_spec)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("strategy", ["ddp", "zero2"])
def test_killed_worker_restarts_from_last_checkpoint_exactly(strategy, ray_local, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"kill-{strategy}")
    weights, images = reference(strategy, workdir)

    storage = workdir / "killed"
    killer, result = run_killed(tiny_spec(workdir, strategy, "checkpoint.max_failures=1", f"checkpoint.storage={storage}",
                                          "checkpoint.best_metric=fid"))
    assert not isinstance(result, Exception), f"the run did not survive the kill: {result!r}"
    assert_resumed_once_losing_at_most_one_interval(result.tracking_uri, result.run_id, killer)

    # Completed (on a new worker group), exactly where the uninterrupted run ends.
    last = latest_checkpoint(storage / result.run_name)
    assert checkpoints.progress(last)["steps_per_rank"] == [STEPS, STEPS]
    assert checkpoints.progress(last)["images_seen"] == images == STEPS * BATCH
    assert_same_weights(checkpoint_weights(last), weights)

    # Every checkpoint was evaluated, and the run returned the kept one with the lowest FID.
    fid = {int(m.step): m.value for m in MlflowClient(result.tracking_uri).get_metric_history(result.run_id, "fid")}
    kept = {checkpoints.progress(p.parent)["step"] for p in (storage / result.run_name).glob("*/progress.json")}
    assert kept <= set(fid) and len(kept) in (2, 3)   # the 2 best, and the latest
    assert checkpoints.progress(result.checkpoint)["step"] == min(kept, key=fid.get)
