"""MineAug in the train loop: the data set is expanded to N·(1+K). Over K+1 epochs of a real
stream, every image is seen once as it is and once with each chosen augmentation; a resumed
stream draws the same tags."""
from __future__ import annotations

import torch

from data_shards.builtin import ensure_builtin
from data_shards.stream import batches_per_epoch, image_stream
from jobs.train.loop import MineAugBatches
from models.images import to_float

N, BATCH = 12, 4


def stream(url: str, start: int = 0):
    return image_stream(url, rank=0, world_size=1, batch_size=BATCH, seed=0, num_workers=0, start_batch=start)


def as_device_batches(batches):
    for b in batches:   # what DevicePrefetcher hands on: floats in [-1, 1], keys kept
        yield {"__key__": b["__key__"], "image": to_float(b["image"])}


def test_two_epochs_show_every_image_plain_and_flipped(tmp_path):
    url = ensure_builtin(f"builtin:craters?count={N}&seed=0", str(tmp_path), 16, 1)
    per_epoch = batches_per_epoch(url, 1, BATCH)
    assert per_epoch == N // BATCH
    originals = {}
    for b in as_device_batches(stream(url)):
        originals.update(zip(b["__key__"], b["image"]))
        if len(originals) == N:
            break
    seen: dict[str, list[str]] = {k: [] for k in originals}
    batches = MineAugBatches(as_device_batches(stream(url)), ["HorizontalFlip"], 1, per_epoch, start_batch=0)
    plain_per_batch = []
    for _ in range(2 * per_epoch):
        b = next(batches)
        plain = 0
        for key, img in zip(b["__key__"], b["image"]):
            if torch.equal(img, originals[key]):
                seen[key].append("plain")
                plain += 1
            else:
                assert torch.allclose(img, originals[key].flip(-1), atol=1e-6)
                seen[key].append("flip")
        plain_per_batch.append(plain)
    assert all(sorted(v) == ["flip", "plain"] for v in seen.values()), seen
    assert sum(plain_per_batch) == N   # half of all images shown are originals (K = 1)


def test_resumed_stream_draws_the_same_tags(tmp_path):
    url = ensure_builtin(f"builtin:craters?count={N}&seed=0", str(tmp_path), 16, 1)
    per_epoch = batches_per_epoch(url, 1, BATCH)
    full = MineAugBatches(as_device_batches(stream(url)), ["VerticalFlip"], 1, per_epoch, start_batch=0)
    expected = [next(full)["image"] for _ in range(5)]
    resumed = MineAugBatches(as_device_batches(stream(url, start=3)), ["VerticalFlip"], 1, per_epoch, start_batch=3)
    assert all(torch.equal(next(resumed)["image"], e) for e in expected[3:])
