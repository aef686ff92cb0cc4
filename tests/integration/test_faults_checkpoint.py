"""A checkpoint whose copy to storage was cut short is never resumed from.

Ray Train registers a checkpoint only once every rank's copy has returned, so a worker killed
mid-copy leaves an unregistered folder that Ray itself does not hand out; what resume must not
trust is a folder that looks registered and whole but is not (a node lost before its writes
reached the disk, a copy tool that gave up part-way, the unregistered leftovers when resume looks
beside Ray's pick). A real kill cannot be aimed into the copy of a tiny checkpoint (it takes
milliseconds), so the test leaves the latest checkpoint of a real run as such a copy would:
a file cut to half its bytes. `--resume` then continues from the checkpoint before it and ends
exactly where the uninterrupted run ended. The markers themselves are checked on written folders.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from test_resume import BATCH, EVERY, STEPS, assert_same_weights, checkpoint_weights, latest_checkpoint, tiny_spec

from jobs.train import checkpoints
from jobs.train.checkpoints import IncompleteCheckpoint, verify
from jobs.train.driver import run_job
from jobs.train.loop import build_training

pytestmark = pytest.mark.integration


def test_resume_passes_over_a_half_copied_checkpoint_and_ends_exactly(ray_local, tmp_path):
    storage = tmp_path / "runs"
    first = run_job(tiny_spec(tmp_path, "ddp", f"checkpoint.storage={storage}"), say=print)
    run_dir = storage / first.run_name
    last = latest_checkpoint(run_dir)
    assert verify(last) == STEPS
    weights = checkpoint_weights(last)

    engine_file = last / checkpoints.ENGINES / "D.pt"
    data = engine_file.read_bytes()
    engine_file.write_bytes(data[:len(data) // 2])
    with pytest.raises(IncompleteCheckpoint, match=f"D.pt has {len(data) // 2} of its {len(data)} bytes"):
        verify(last)

    again = run_job(tiny_spec(tmp_path, "ddp", f"checkpoint.storage={storage}"), say=print, resume=first.run_name)
    assert again.run_id == first.run_id
    client = MlflowClient(again.tracking_uri)
    assert [m.value for m in client.get_metric_history(again.run_id, "resumed_from_step")] == [STEPS - EVERY]
    assert client.get_run(again.run_id).info.status == "FINISHED"
    resumed = Path(again.checkpoint)
    assert resumed != last and verify(resumed) == STEPS
    assert checkpoints.progress(resumed)["images_seen"] == STEPS * BATCH
    assert_same_weights(checkpoint_weights(resumed), weights)


@pytest.mark.parametrize("damage", ["no marker", "file missing", "file cut", "byte changed"])
def test_a_checkpoint_is_complete_only_as_written(damage, tmp_path):
    spec = tiny_spec(tmp_path, "ddp", "scaling.num_workers=1")
    family, networks, _, engines = build_training(spec, torch.device("cpu"), 1)
    d = tmp_path / "ckpt"
    checkpoints.write(d, rank=0, engines=engines, networks=networks, family=family, step=7, images_seen=56)
    assert verify(d) == 7
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)
    snapshot = copy / checkpoints.SNAPSHOT
    if damage == "no marker":
        (copy / checkpoints.COMPLETE.format(0)).unlink()
    elif damage == "file missing":
        snapshot.unlink()
    elif damage == "file cut":
        snapshot.write_bytes(snapshot.read_bytes()[:-1])
    else:
        data = bytearray(snapshot.read_bytes())
        data[len(data) // 2] ^= 1
        snapshot.write_bytes(bytes(data))
    with pytest.raises(IncompleteCheckpoint, match={"no marker": "no complete-rank0.json", "file missing": "missing",
                                                   "file cut": "bytes", "byte changed": "sha256"}[damage]):
        verify(copy)
