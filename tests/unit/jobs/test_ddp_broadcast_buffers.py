"""The DDP engine hands each family's `broadcast_buffers` to DistributedDataParallel (issue 24's
cheap win): a fake DDP class records what the engine passes, so no process group is needed."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from jobs.spec import parse_spec
from jobs.train.engines import ddp
from models.family import Phase
from models.registry import available_families, get_family_cls

CPU = torch.device("cpu")
SPEC = parse_spec("name: t\nfamily: dcgan\ndata: {train: 'builtin:craters', resolution: 16}\n"
                  "model: {nz: 8, ngf: 8, ndf: 8}\ntrain: {batch: 8, steps: 10}\n", [])


class RecordingDDP:
    """Stands in for DistributedDataParallel: keeps the module and the keywords it was given."""

    made: list[dict] = []

    def __init__(self, module: nn.Module, **kwargs):
        self.module = module
        RecordingDDP.made.append(kwargs)


class NetWithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.register_buffer("running", torch.zeros(3))


def engine_for(family: str, monkeypatch, spec_flag: bool | None = None, **patches) -> tuple[ddp.DDPEngine, dict]:
    RecordingDDP.made = []
    monkeypatch.setattr(ddp, "DistributedDataParallel", RecordingDDP)
    for name, value in patches.items():
        monkeypatch.setattr(ddp, name, value)
    # The engine reads only `spec.family` for the flag; the rest of the dcgan spec is the run's.
    spec = SPEC.model_copy(update={"family": family,
                                   "train": SPEC.train.model_copy(update={"broadcast_buffers": spec_flag})})
    engine = ddp.DDPEngine(NetWithBuffer(), Phase("net", 0.1), CPU, spec, world_size=2)
    assert len(RecordingDDP.made) == 1
    return engine, RecordingDDP.made[0]


@pytest.mark.parametrize("family", available_families())
def test_engine_passes_the_familys_flag(family, monkeypatch):
    engine, kwargs = engine_for(family, monkeypatch)
    expected = get_family_cls(family).broadcast_buffers
    assert engine.broadcast_buffers is expected
    assert kwargs[next(iter(ddp.buffer_sync_kwargs(True)))] is expected


@pytest.mark.parametrize("flag", [True, False])
def test_the_spec_overrides_the_familys_flag(flag, monkeypatch):
    for family in ("stylegan2", "dcgan"):
        engine, kwargs = engine_for(family, monkeypatch, spec_flag=flag)
        assert engine.broadcast_buffers is flag
        assert kwargs[next(iter(ddp.buffer_sync_kwargs(True)))] is flag


def test_the_flag_per_family_follows_its_buffers():
    # BatchNorm running statistics keep torch's default; constants and rank-0-only running values do not.
    assert {n: get_family_cls(n).broadcast_buffers for n in ("dcgan", "pix2pix", "cgan_unet", "sat2ground",
                                                             "stylegan2", "diffusion")} == {
        "dcgan": True, "pix2pix": True, "cgan_unet": True, "sat2ground": True, "stylegan2": False, "diffusion": False}


def test_keyword_is_the_one_this_torch_knows():
    import inspect

    known = inspect.signature(torch.nn.parallel.DistributedDataParallel.__init__).parameters
    (name, value), = ddp.buffer_sync_kwargs(False).items()
    assert name in known and value is False
    # torch >= 2.13 deprecates broadcast_buffers (its False also skipped the copy at construction).
    assert name == ("forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers")


def test_older_torch_still_copies_rank0_buffers_once(monkeypatch):
    sent = []
    fake_dist = type("D", (), {"broadcast": staticmethod(lambda t, src: sent.append((tuple(t.shape), src)))})
    _, kwargs = engine_for("stylegan2", monkeypatch, dist=fake_dist,
                           buffer_sync_kwargs=lambda sync: {"broadcast_buffers": sync})
    assert kwargs == {"device_ids": None, "broadcast_buffers": False}
    assert sent == [((3,), 0)]   # the one buffer, from rank 0, before DDP wraps the module

    sent.clear()
    _, kwargs = engine_for("dcgan", monkeypatch, dist=fake_dist,
                           buffer_sync_kwargs=lambda sync: {"broadcast_buffers": sync})
    assert kwargs["broadcast_buffers"] is True and sent == []   # DDP itself copies them then


def test_one_process_has_no_ddp(monkeypatch):
    RecordingDDP.made = []
    monkeypatch.setattr(ddp, "DistributedDataParallel", RecordingDDP)
    engine = ddp.DDPEngine(NetWithBuffer(), Phase("net", 0.1), CPU, SPEC, world_size=1)
    assert engine.ddp is None and RecordingDDP.made == []
