"""A checkpoint's completion marker cut short by a crash is read as an incomplete checkpoint, with
the file named, never as a traceback; a marker that reads whole vouches for the checkpoint."""
from __future__ import annotations

import hashlib
import json

import pytest

from jobs.train import checkpoints
from jobs.train.checkpoints import COMPLETE, IncompleteCheckpoint


def checkpoint(tmp_path, marker_text: str | None = None):
    d = tmp_path / "checkpoint_000001"
    d.mkdir()
    data = b"weights"
    (d / "generator.pt").write_bytes(data)
    marker = {"files": {"generator.pt": [len(data), hashlib.sha256(data).hexdigest()]}, "writers": [0], "step": 7}
    (d / COMPLETE.format(0)).write_text(json.dumps(marker) if marker_text is None else marker_text)
    return d


def test_a_whole_marker_vouches_for_the_checkpoint(tmp_path):
    assert checkpoints.verify(str(checkpoint(tmp_path))) == 7


@pytest.mark.parametrize("text", ['{"files": {"generator.pt": [7, "ab', '', '{"files": {}}', "[]"])
def test_a_marker_cut_short_is_an_incomplete_checkpoint(tmp_path, text):
    with pytest.raises(IncompleteCheckpoint, match=f"{COMPLETE.format(0)} does not read whole"):
        checkpoints.verify(str(checkpoint(tmp_path, text)))
