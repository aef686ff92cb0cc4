"""Engines: one per trained network. An engine owns wrapping for data parallelism, backward,
the optimizer and LR schedule, gradient accumulation and clipping, mixed precision, and the
network's training state on disk.

The train loop sees one interface (`Engine`), whatever the strategy:

    engine.set_trainable(flag)     gradients on for the phase's network, off for the others
    with engine.micro_batch(), engine.autocast():
        loss = ...                 the family's forward through `engine.wrapped` / `.module`
    engine.step(loss)              backward; optimizer step at the accumulation boundary
    engine.save(dir, rank) / engine.load(dir)    every rank calls both
    engine.restart_state(params)   fresh optimizer state for one parameter group

`DDPEngine` (jobs/train/engines/ddp.py) wraps torch DDP over Ray Train's process group;
`DeepSpeedEngine` (jobs/train/engines/deepspeed.py) runs one `deepspeed.initialize` per network.
This module holds what both share: the interface, optimizer and LR schedule.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from jobs.spec import JobSpec, SchedulerSpec, TrainSpec
from models.family import Phase


def make_optimizer(groups: list[list[nn.Parameter]], phase: Phase, train: TrainSpec,
                   fused: bool = False) -> torch.optim.Optimizer:
    # torch's own Adam under both strategies: DeepSpeed's fused/CPU Adam would need a JIT compile.
    # fused: torch's single-kernel CUDA Adam (the same update; DDP on GPUs only).
    cls = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    extra = {"fused": True} if fused else {}
    return cls([{"params": g} for g in groups], lr=phase.lr, betas=phase.betas, weight_decay=phase.weight_decay,
               **extra)


def param_groups(module: nn.Module, phase: Phase) -> list[list[nn.Parameter]]:
    """The phase's optimizer groups of the module's trainable parameters; each exactly once."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    if phase.param_groups is None:
        return [trainable]
    groups = [[p for p in g if p.requires_grad] for g in phase.param_groups(module)]
    ids = [id(p) for g in groups for p in g]
    if len(ids) != len(set(ids)) or set(ids) != {id(p) for p in trainable}:
        raise ValueError(f"phase {phase.name!r}: param_groups must hold every trainable parameter of the "
                         f"network exactly once ({len(set(ids))} distinct of {len(trainable)}, {len(ids)} listed)")
    return [g for g in groups if g]


def zero_state_(state: dict) -> None:
    """Adam's per-tensor state back to its initial values in place (moments and step count 0):
    the same as state never created, and it survives checkpoints that expect every key."""
    for value in state.values():
        if torch.is_tensor(value):
            value.zero_()


def lr_factor(phase: Phase, schedule: SchedulerSpec, total_steps: int) -> Callable[[int], float]:
    """Factor on `phase.lr` after `n` optimizer steps: the family's schedule times the spec's."""
    def factor(n: int) -> float:
        f = phase.lr_at(n) / phase.lr
        if schedule.warmup_steps:
            f *= min(1.0, (n + 1) / schedule.warmup_steps)
        if schedule.kind == "cosine":
            f *= 0.5 * (1.0 + math.cos(math.pi * min(n, total_steps) / total_steps))
        return f
    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, phase: Phase, spec: JobSpec) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(phase, spec.train.scheduler, spec.total_steps))


def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


class Engine:
    """The strategy-independent part: placement, precision, trainability."""

    module: nn.Module    # the bare network (what other phases call, what snapshots save)
    wrapped: nn.Module   # what the network's own phase calls

    def __init__(self, module: nn.Module, phase: Phase, device: torch.device, spec: JobSpec):
        if spec.train.precision == "fp16" and device.type != "cuda":
            raise ValueError("train.precision fp16 needs a GPU; use bf16 or fp32 on CPU")
        self.name = phase.name
        self.device = device
        self.precision = spec.train.precision
        if device.type == "cuda":
            # Fixed shapes every step: let cuDNN time its convolution algorithms once and keep the fastest.
            torch.backends.cudnn.benchmark = spec.train.cudnn_benchmark
        memory_format = torch.channels_last if spec.train.channels_last else torch.preserve_format
        self.module = module.to(device, memory_format=memory_format)
        # Only what is trainable now is ever trained: a frozen part of the module (ControlNet's
        # base UNet) stays frozen through set_trainable and stays out of the optimizer.
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"network {phase.name!r} has no trainable parameters")
        self.groups = param_groups(self.module, phase)

    def autocast(self) -> contextlib.AbstractContextManager:
        dtype = autocast_dtype(self.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    def set_trainable(self, flag: bool) -> None:
        for p in self.params:
            p.requires_grad_(flag)

    def micro_batch(self) -> contextlib.AbstractContextManager:
        """Wraps the forward and backward of one micro-batch."""
        return contextlib.nullcontext()

    def step(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def group_index(self, params: list[nn.Parameter]) -> int:
        """The index of the optimizer group that holds exactly `params`."""
        ids = {id(p) for p in params}
        for i, group in enumerate(self.groups):
            if {id(p) for p in group} == ids:
                return i
        raise ValueError(f"network {self.name!r}: the {len(params)} parameters given are not one optimizer group; "
                         f"declare them a group of their own in Phase.param_groups")

    def restart_state(self, params: list[nn.Parameter]) -> None:
        """Fresh optimizer state for the group holding exactly `params` (see StepEnd.restart_optimizer)."""
        raise NotImplementedError

    def save(self, directory: Path, rank: int) -> None:
        raise NotImplementedError

    def load(self, directory: Path) -> None:
        raise NotImplementedError
