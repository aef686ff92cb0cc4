"""The family contract: what a trained system must provide to the family-agnostic train loop.

A family builds its networks from the spec, names its training *phases* (one trained network
each: "D", then "G" for a GAN), computes the loss of one phase on one batch, samples images,
and says which metrics judge it. Optionally it works between steps (`after_step`: EMA, ADA's p,
training stages, with collectives handed in), keeps state outside its networks
(`state_dict`, saved in every checkpoint) and names local files it needs (`required_files`).
It never touches Ray, MLflow or distributed code: engines (`jobs/train/engines/`) own backward, the
optimizer step, precision and gradient sync.

This file is the contract only. Families live in `models/families/` (one file per reproduced
system) and are found there by `models.registry`, which is also the one way to construct one.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Mapping

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class FamilyConfig(BaseModel):
    """Base of a family's `model:` section. Families subclass it with published defaults."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class Phase:
    """One trained network per phase; its optimizer settings come from the family."""

    name: str                      # also the key of the network in `networks`
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    # StepLR: the learning rate is multiplied by `lr_gamma` every `lr_step_every` optimizer steps
    # (None: constant). Engines apply it; `lr_at(step)` is the schedule in one formula.
    lr_step_every: int | None = None
    lr_gamma: float = 1.0
    # Splits the network's parameters into optimizer groups (None: one group). A group is what
    # `StepEnd.restart_optimizer` can give fresh optimizer state on its own: parameters that start
    # training late (SCB-GAN's vision-aided heads) need a group of their own.
    param_groups: Callable[[nn.Module], list[list[nn.Parameter]]] | None = None

    def lr_at(self, step: int) -> float:
        """The learning rate for optimizer step `step` (0-based)."""
        if not self.lr_step_every:
            return self.lr
        return self.lr * self.lr_gamma ** (step // self.lr_step_every)


@dataclass
class StepContext:
    """What a family's loss sees besides the batch.

    `net(role)` returns the module to call for that role in this phase: the engine-wrapped
    module (DDP / DeepSpeed) for the network being trained, the bare module for the others,
    whose gradients are switched off (calling a wrapped module that receives no gradient
    hangs DDP and breaks DeepSpeed ZeRO >= 2).
    """

    networks: Mapping[str, nn.Module]
    trained: Mapping[str, nn.Module]
    phase: str
    step: int
    device: torch.device
    generator: torch.Generator | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def net(self, role: str) -> nn.Module:
        return self.trained[role] if role == self.phase else self.networks[role]


@dataclass
class StepEnd:
    """What `Family.after_step` sees on every rank once every phase of a step has run.

    The two callables are collectives (every rank calls them, in the same order): a family that
    keeps state across steps (ADA's p, EMA weights, a training stage) stays identical on every
    rank without touching distributed code.
    """

    networks: Mapping[str, nn.Module]   # bare modules, weights already updated by this step
    rank: int
    step: int                           # steps completed, this one included
    batch: int                          # images per step over all ranks
    device: torch.device
    mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    from_rank0: Callable[[Any], Any] = lambda obj: obj
    # on_rank0(work): runs `work()` on rank 0 alone and returns its result on every rank, for work
    # that takes minutes (SCB-GAN's linear probe): the other ranks wait under a timeout long enough
    # for it, where `from_rank0` after such work would outlast the collective timeout. A collective.
    on_rank0: Callable[[Callable[[], Any]], Any] = lambda work: work()
    # Up to n training images as the data set holds them (float NCHW in [-1, 1] on the device, in
    # batches), read from the shards, not from the steps' batches, which MineAug and ADA change:
    # for what must see the real distribution (SCB-GAN's linear probe). Not a collective.
    reals: Callable[[int], Iterator[torch.Tensor]] = lambda n: iter(())
    # restart_optimizer(role, params): fresh optimizer state (Adam's moments and step count at
    # zero) for one group of `Phase.param_groups` of network `role`, as if its parameters had
    # just been added to the optimizer. Every rank calls it alike; no communication.
    restart_optimizer: Callable[[str, list[nn.Parameter]], None] = lambda role, params: None

    @property
    def images_seen(self) -> int:
        return self.step * self.batch


class Family(ABC):
    """The contract; see module docstring. Its abstract methods (`build`, `phases`, `loss`,
    `sample`) are what every family must define: one that leaves any out is refused by
    `models.registry` with their names. A subclass with a `name` in a module of `models/families/`
    is found by `models.registry`; construct it with `make_family`.

    `conditional`, `data_keys`, `metrics` and `sampler_role` are class attributes, or read-only
    properties where the config decides them (a diffusion model's conditioning, sat2ground's stage).
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[FamilyConfig]] = FamilyConfig
    # The settings model of `augment.ada` for families with adaptive discriminator augmentation
    # (their __init__ takes `ada=`, the validated settings or None); None: a spec setting it is refused.
    ada_config: ClassVar[type[BaseModel] | None] = None
    conditional: ClassVar[bool] = False
    data_keys: ClassVar[tuple[str, ...]] = ("image",)   # sample keys a batch carries (image, cond, mask, cls)
    metrics: ClassVar[tuple[str, ...]] = ("fid",)
    sampler_role: ClassVar[str] = "G"   # the network that the registered model wraps
    # The smallest model of this family, as spec overrides (`--set` keys: data.resolution and
    # model.* widths, e.g. {"data.resolution": 16, "model.ngf": 8}) that train it on a CPU in
    # seconds with any of its ready specs; the run's size (steps, batch, samples, data) is the
    # caller's. tests/families/test_family_contract.py trains every family × ready spec with it
    # and fails a family that leaves it empty.
    tiny: ClassVar[dict[str, Any]] = {}
    # The `train.precision` values the family trains correctly in; engines refuse the others.
    precisions: ClassVar[tuple[str, ...]] = ("fp32", "bf16", "fp16")
    # Whether DDP copies rank 0's buffers into every rank before each forward of a trained network
    # (torch's default, one broadcast per forward). False is safe only when no rank reads a buffer
    # that differs from rank 0's in a way that matters: constants (identical from the seeded build,
    # and the DDP engine still copies rank 0's once at construction), or running values whose rank-0
    # copy alone reaches checkpoints and samples (rank 0 never receives another rank's buffers, so
    # its copy is the same either way). BatchNorm running statistics stay True: eval-mode forwards
    # on any rank read them. Each family states its reason beside its value.
    broadcast_buffers: ClassVar[bool] = True

    def __init__(self, config: FamilyConfig, *, resolution: int, channels: int, lr: float):
        self.config = config
        self.resolution = resolution
        self.channels = channels
        self.lr = lr

    @abstractmethod
    def build(self) -> dict[str, nn.Module]:
        """The networks by role ("G", "D", EMA copies, frozen networks), freshly initialised."""

    @abstractmethod
    def phases(self) -> list[Phase]:
        """The trained networks in the order a step trains them, one phase each."""

    @abstractmethod
    def loss(self, batch: Mapping[str, torch.Tensor], ctx: StepContext) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """Loss of `ctx.phase` on one batch and named values to log.

        The batch holds `data_keys`: image-like keys (image, cond, mask) as float NCHW in [-1, 1]
        on the device, `cls` as int64.
        """

    def needs_double_backward(self) -> bool:
        """Whether a phase's loss differentiates a gradient (R1, path length: autograd.grad with
        create_graph=True) with this config. torch.compile'd code cannot run such a backward:
        engines refuse `train.compile` where it would compile the network the penalty runs through."""
        return False

    def required_files(self) -> dict[str, str | None]:
        """Local files the training needs, by spec key (e.g. pretrained backbone weights): the
        driver checks them before anything starts. None: a file the spec should name but doesn't."""
        return {}

    def after_step(self, end: StepEnd) -> dict[str, float | torch.Tensor]:
        """Work between steps (EMA update, ADA's p, stage changes); returns named values to log."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State outside the networks (ADA's p, the current stage): saved in every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    @abstractmethod
    def sample(self, sampler: nn.Module, n: int, *, seed: int = 0, cond: torch.Tensor | None = None,
               mask: torch.Tensor | None = None) -> torch.Tensor:
        """n images in [-1, 1], NCHW, deterministic in `seed`; conditional families take `cond`
        (and `mask`), float NCHW in [-1, 1], one per image. Families decorate theirs with
        `torch.no_grad()`."""

    def sample_seeds(self, sampler: nn.Module, seeds: list[int], *, cond: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
        """One image per seed, NCHW in [-1, 1]: image i is the image `sample(sampler, 1, seed=seeds[i],
        cond=cond[i:i+1], mask=mask[i:i+1])` draws alone (`cond`, `mask`: one row per seed, or None).

        `sample(n, seed)` draws a whole batch's noise from one seed, so its images change with n;
        here each image's noise comes from its own seed, so a set drawn in batches of any size holds
        the same images (`models generate`, the registered model). This default draws one image a
        sampler call; families override it to draw the batch in one forward, equal to this within
        float tolerance (their sampler runs in eval mode: an image does not depend on its batch-mates).
        """
        seeds = [int(s) for s in seeds]
        if not seeds:
            raise ValueError(f"{self.name}: sample_seeds() needs at least one seed")
        for key, rows in (("cond", cond), ("mask", mask)):
            if rows is not None and rows.shape[0] != len(seeds):
                raise ValueError(f"{self.name}: {len(seeds)} seeds but {rows.shape[0]} {key} images")

        def row(rows: torch.Tensor | None, i: int) -> torch.Tensor | None:
            return rows[i:i + 1] if rows is not None else None

        return torch.cat([self.sample(sampler, 1, seed=s, cond=row(cond, i), mask=row(mask, i))
                          for i, s in enumerate(seeds)])


def run_in_eval(net: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """`net(*inputs)` in eval mode (BatchNorm running statistics, no dropout: deterministic),
    inputs moved to the network's device and dtype; the mode is restored; float32 result."""
    param = next(net.parameters())
    was_training = net.training
    net.eval()
    try:
        out = net(*(x.to(device=param.device, dtype=param.dtype) for x in inputs))
    finally:
        net.train(was_training)
    return out.float()


@torch.no_grad()
def update_ema(ema: nn.Module, source: nn.Module, keep: float) -> None:
    """ema ← keep·ema + (1 − keep)·source for the parameters; buffers (BatchNorm statistics,
    StyleGAN2's w_avg) are copied. Foreach kernels: a few launches per step on a GPU, where one
    lerp per tensor would be hundreds."""
    ema_params = list(ema.parameters())
    params = [p.detach() for p in source.parameters()]
    if len(ema_params) != len(params):
        raise ValueError(f"EMA copy has {len(ema_params)} parameters, its source {len(params)}")
    if ema_params:
        torch._foreach_lerp_(ema_params, params, 1.0 - keep)
    ema_buffers, buffers = list(ema.buffers()), list(source.buffers())
    if ema_buffers:
        torch._foreach_copy_(ema_buffers, buffers)
