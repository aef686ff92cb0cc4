"""The training loop's data with `data.holdout`: its stream and the reals a family's probe reads
(`StepEnd.reals`) leave the held-out samples out."""
from __future__ import annotations

import torch

from data_shards.builtin import ensure_builtin
from data_shards.split import holdout_split, shard_keys
from data_shards.stream import iterate_once
from jobs.spec import SPECS_DIR, load_spec
from jobs.train.loop import data_reals, open_stream
from models.images import to_float

CPU = torch.device("cpu")


def held_out(url: str, holdout) -> set[str]:
    keys = shard_keys(url)
    return {keys[s][i] for s, idx in enumerate(holdout_split(url, holdout).held_out) for i in idx}


def test_the_workers_stream_leaves_the_held_out_samples_out(tmp_path):
    url = ensure_builtin("builtin:craters?count=48&seed=0", str(tmp_path), 16, 1)
    spec = load_spec(SPECS_DIR / "quickstart.yaml", ["data.holdout=8", "train.batch=8", "data.loader_workers=0"])
    held = held_out(url, 8)
    seen = []
    for rank in range(2):
        it = open_stream(url, spec, ("image",), rank, 2, start_batch=0)
        seen += [k for _ in range(10) for k in next(it)["__key__"]]   # 2 epochs of 40 samples
    assert len(held) == 8 and not held & set(seen) and len(set(seen)) == 40


def test_the_probes_reals_leave_the_held_out_samples_out(tmp_path):
    url = ensure_builtin("builtin:craters?count=48&seed=0", str(tmp_path), 16, 1)
    every = [to_float(b["image"]) for b in iterate_once(url, batch_size=48)][0]
    keys = [k for shard in shard_keys(url) for k in shard]
    held = [i for i, k in enumerate(keys) if k in held_out(url, 8)]
    reals = torch.cat(list(data_reals(url, CPU, holdout=8)(100)))
    assert len(reals) == 40
    assert not any(torch.equal(every[i], r) for i in held for r in reals)
    assert len(torch.cat(list(data_reals(url, CPU)(100)))) == 48   # no holdout: every image
