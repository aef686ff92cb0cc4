"""sat2ground stage 2 under DDP: the frozen stage-1 generator is not re-broadcast at every forward
(each rank loads it from the same file), and the stage-2 snapshot still carries it."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from models.registry import make_family
from models.snapshot import load_snapshot, save_snapshot
from family_checks import smooth_batch

NZ = 8


def sat2ground(**cfg):
    return make_family("sat2ground", {"ngf": 8, "ndf": 8, "nz": NZ, **cfg}, resolution=16, channels=3, lr=1e-3)


@pytest.fixture
def stage2_net(tmp_path):
    one = sat2ground()
    torch.manual_seed(1)
    save_snapshot(tmp_path / "stage1.pt", one, one.build()["G"])
    family = sat2ground(stage=2, generator_from=str(tmp_path / "stage1.pt"))
    return family, family.build()["E"]


@pytest.fixture
def broadcasts(monkeypatch):
    """Every tensor DDP sends with `_broadcast_coalesced` (its buffer and construction syncs)."""
    sent: list[torch.Tensor] = []
    real = dist._broadcast_coalesced

    def spy(group, tensors, *args, **kwargs):
        sent.extend(tensors)
        return real(group, tensors, *args, **kwargs)

    monkeypatch.setattr(dist, "_broadcast_coalesced", spy)
    return sent


def test_ddp_does_not_broadcast_the_frozen_generator(process_group, stage2_net, broadcasts):
    _, net = stage2_net
    generator = {t.data_ptr() for t in net.generator.buffers()} | {net.generator_loaded.data_ptr()}
    encoder_buffers = [b for b in net.encoder.buffers()]
    assert encoder_buffers, "the encoder's BatchNorm statistics: what DDP must still keep in sync"
    ddp = DistributedDataParallel(net)
    broadcasts.clear()   # construction sent the parameters once; from here on, what every forward sends
    ddp(smooth_batch(2, 3, 16, seed=0)).mean().backward()
    sent = {t.data_ptr() for t in broadcasts}
    assert sent, "DDP sent no buffers at all: the spy no longer sees its broadcasts"
    assert not sent & generator, "DDP re-broadcast the frozen generator's buffers at a forward"
    assert sent == {b.data_ptr() for b in encoder_buffers}
    generator_bytes = sum(b.numel() * b.element_size() for b in net.generator.buffers())
    sent_bytes = sum(t.numel() * t.element_size() for t in broadcasts)
    assert sent_bytes < generator_bytes / 10


def test_the_snapshot_still_carries_the_generator(stage2_net, tmp_path):
    family, net = stage2_net
    sat = smooth_batch(2, 3, 16, seed=1)
    expected = family.sample(net, 2, cond=sat)
    save_snapshot(tmp_path / "stage2.pt", family, net)
    (tmp_path / "stage1.pt").unlink()   # served elsewhere: only the stage-2 snapshot is there
    loaded_family, sampler, _ = load_snapshot(tmp_path / "stage2.pt")
    assert bool(sampler.generator_loaded)
    assert torch.equal(loaded_family.sample(sampler, 2, cond=sat), expected)
