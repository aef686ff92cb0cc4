"""What the family tests share: fixed tensors, a step context, and a plain single-process
training loop (one Adam per phase, as the engines do) for the short overfitting checks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.family import Family, StepContext

CPU = torch.device("cpu")


def smooth_batch(n: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """n distinct smooth images in [-1, 1] (bilinear upsampling of a coarse random field)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, channels, 4, 4, generator=g) * 2 - 1
    return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)


def paired_batch(family: Family, n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed batch with the family's keys; the target is a fixed function of the input (a
    learnable mapping), the mask marks where they differ."""
    r, c = family.resolution, family.channels
    cond = smooth_batch(n, c, r, seed)
    image = torch.flip(cond, dims=[3]) * 0.8
    mask = ((image - cond).abs().mean(dim=1, keepdim=True) > 0.3).float() * 2 - 1
    batch = {"cond": cond, "mask": mask, "image": image}
    return {k: batch[k] for k in family.data_keys}


def ctx_for(nets, phase: str, trained=None, generator=None) -> StepContext:
    return StepContext(networks=nets, trained=trained or nets, phase=phase, step=0, device=CPU, generator=generator)


class Recording(nn.Module):
    """Stands in for an engine-wrapped module: records (batch, channels) of every call."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x):
        self.calls.append(tuple(x.shape[:2]))
        return self.inner(x)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def has_grads(module: nn.Module) -> list[bool]:
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters()]


def check_gradient_isolation(family: Family, batch: dict[str, torch.Tensor]) -> None:
    """A GAN's phases, run in the family's order, touch only their own network: phase D even with
    G left trainable (its fake carries no graph: made without one, or the G phase's, detached),
    phase G with D frozen (gradients pass through D)."""
    nets = family.build()
    for phase in [ph.name for ph in family.phases()]:
        for net in nets.values():
            for p in net.parameters():
                p.grad = None
        nets["G"].requires_grad_(True)
        nets["D"].requires_grad_(phase == "D")
        loss, _ = family.loss(batch, ctx_for(nets, phase))
        loss.backward()
        other = "G" if phase == "D" else "D"
        assert all(has_grads(nets[phase])), f"phase {phase}: not every parameter of {phase} got a gradient"
        assert not any(has_grads(nets[other])), f"phase {phase}: {other} got a gradient"


def train(family: Family, nets: dict[str, nn.Module], batch: dict[str, torch.Tensor], steps: int,
          seed: int = 0) -> list[dict[str, float]]:
    """`steps` steps of every phase on the same batch; the logged values of each step."""
    torch.manual_seed(seed)
    phases = family.phases()
    opts = {p.name: torch.optim.Adam(nets[p.name].parameters(), lr=p.lr, betas=p.betas) for p in phases}
    noise = torch.Generator().manual_seed(seed)
    history = []
    for step in range(steps):
        logs: dict[str, float] = {}
        for phase in phases:
            for role, net in nets.items():
                net.requires_grad_(role == phase.name)
            ctx = StepContext(networks=nets, trained=nets, phase=phase.name, step=step, device=CPU, generator=noise)
            loss, values = family.loss(batch, ctx)
            opts[phase.name].zero_grad(set_to_none=True)
            loss.backward()
            opts[phase.name].step()
            logs.update({k: float(v) for k, v in values.items()})
        history.append(logs)
    return history


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
