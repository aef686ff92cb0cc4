"""StyleGAN2's regularisers and style mixing (Karras et al. 2020; R1 from Mescheder et al. 2018).

All are plain differentiable functions of tensors: no distributed code. Each rank keeps its own
`pl_mean`; it is a slowly moving average, so ranks stay close without syncing it.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def style_mixing_ws(mapping: nn.Module, z: Tensor, prob: float, num_ws: int,
                    generator: torch.Generator | None = None, update_w_avg: bool = False) -> Tensor:
    """ws for z; with probability `prob` (one draw for the whole batch, as in StyleGAN2) the ws from
    a random cutoff in [1, num_ws) on come from a second latent. The second mapping always runs and
    the choice is made on the device: the same graph every step (DDP-friendly) and no host sync.
    Randomness comes from `generator` when given (it must live on z's device)."""
    ws = mapping(z, update_w_avg=update_w_avg)
    if prob <= 0 or num_ws < 2:
        return ws
    dev = z.device
    z2 = torch.randn(z.shape, device=dev, dtype=z.dtype, generator=generator)
    ws2 = mapping(z2)
    cutoff = torch.randint(1, num_ws, (), device=dev, generator=generator)
    mix = torch.rand((), device=dev, generator=generator) < prob
    cutoff = torch.where(mix, cutoff, torch.full_like(cutoff, num_ws))
    take2 = (torch.arange(num_ws, device=dev) >= cutoff)[None, :, None]
    return torch.where(take2, ws2.to(ws.dtype), ws)


def r1_penalty(real_logits: Tensor, real_images: Tensor) -> Tensor:
    """(N,) squared norm of dD(x)/dx at the reals (which must require grad). create_graph=True so
    the penalty itself trains D. Zero where D's output does not depend on its input."""
    (grad,) = torch.autograd.grad(real_logits.float().sum(), real_images, create_graph=True, allow_unused=True)
    if grad is None:
        return real_images.new_zeros(real_images.shape[0], dtype=torch.float32)
    return grad.float().square().flatten(1).sum(dim=1)


class PathLengthPenalty(nn.Module):
    """Path-length regularisation: the Jacobian of image w.r.t. w, applied to a random image-space
    direction, should have a constant length (the running mean `pl_mean`) for every w."""

    def __init__(self, decay: float = 0.01):
        super().__init__()
        self.decay = decay
        self.register_buffer("pl_mean", torch.zeros([]))

    def forward(self, fake_images: Tensor, ws: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """`ws` must be the tensor the images were synthesised from (in their graph)."""
        n, _, h, w = fake_images.shape
        # Scaling by 1/sqrt(H*W) makes the length independent of the resolution.
        y = torch.randn(fake_images.shape, device=fake_images.device, dtype=torch.float32,
                        generator=generator) / math.sqrt(h * w)
        (grad,) = torch.autograd.grad((fake_images.float() * y).sum(), ws, create_graph=True)
        # grad is (N, num_ws, w_dim): the squared length sums over w's dimensions and averages over
        # the style vectors (StyleGAN2's pl_lengths), not the other way round.
        lengths = grad.float().square().sum(dim=2).mean(dim=1).sqrt()           # (N,)
        if self.pl_mean.device != lengths.device:
            self.pl_mean = self.pl_mean.to(lengths.device)
        with torch.no_grad():
            self.pl_mean.lerp_(lengths.detach().mean(), self.decay)
        return (lengths - self.pl_mean).square().mean()
