"""The EMA update (one foreach lerp over all parameters) equals the per-tensor formula
ema ← keep·ema + (1 − keep)·source, with buffers copied."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models.family import update_ema


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8, 2))


def test_update_ema_equals_the_formula_per_tensor():
    torch.manual_seed(0)
    source = net()
    ema = copy.deepcopy(source)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
        source[1].running_mean.normal_()
        source[1].num_batches_tracked.fill_(7)
    expected = {k: v.clone() for k, v in ema.state_dict().items()}
    keep = 0.9
    for (name, p_ema), p in zip(ema.named_parameters(), source.parameters()):
        expected[name] = keep * p_ema.detach() + (1 - keep) * p.detach()
    for (name, _), b in zip(ema.named_buffers(), source.buffers()):
        expected[name] = b.clone()
    update_ema(ema, source, keep)
    for k, v in ema.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-6, atol=1e-7, msg=lambda m: f"{k}: {m}")
    assert ema[1].num_batches_tracked.item() == 7


def test_update_ema_refuses_networks_of_different_shapes():
    with pytest.raises(ValueError, match="parameters"):
        update_ema(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.5)
