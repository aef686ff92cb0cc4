"""Engines: one per trained network. An engine owns wrapping for data parallelism, backward,
the optimizer and LR schedule, gradient accumulation and clipping, mixed precision, and the
network's training state on disk.

The train loop sees one interface (`Engine`), whatever the strategy:

    engine.set_trainable(flag)     gradients on for the phase's network, off for the others
    with engine.micro_batch(), engine.autocast():
        loss = ...                 the family's forward through `engine.wrapped` / `.module`
    engine.step(loss)              backward; optimizer step at the accumulation boundary
    engine.save(dir, rank) / engine.load(dir)    every rank calls both

`DDPEngine` (here) wraps torch DDP over Ray Train's process group; `DeepSpeedEngine`
(jobs/deepspeed_engine.py) runs one `deepspeed.initialize` per network.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from jobs.spec import JobSpec, SchedulerSpec, TrainSpec
from models.family import Phase


def make_optimizer(params: Iterable[nn.Parameter], phase: Phase, train: TrainSpec) -> torch.optim.Optimizer:
    # torch's own Adam under both strategies: DeepSpeed's fused/CPU Adam would need a JIT compile.
    cls = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=phase.lr, betas=phase.betas, weight_decay=phase.weight_decay)


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
        memory_format = torch.channels_last if spec.train.channels_last else torch.preserve_format
        self.module = module.to(device, memory_format=memory_format)
        # Only what is trainable now is ever trained: a frozen part of the module (ControlNet's
        # base UNet) stays frozen through set_trainable and stays out of the optimizer.
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"network {phase.name!r} has no trainable parameters")

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

    def save(self, directory: Path, rank: int) -> None:
        raise NotImplementedError

    def load(self, directory: Path) -> None:
        raise NotImplementedError


class DDPEngine(Engine):
    """torch DDP over the process group Ray Train set up (gloo on CPU, NCCL on GPU)."""

    def __init__(self, module: nn.Module, phase: Phase, device: torch.device, spec: JobSpec, world_size: int):
        super().__init__(module, phase, device, spec)
        self.grad_accum, self.grad_clip = spec.train.grad_accum, spec.train.grad_clip
        self._micro = 0   # micro-batches stepped so far; a multiple of grad_accum after every train step
        # DDP broadcasts rank 0's weights at construction, so every rank starts identical.
        self.ddp = (DistributedDataParallel(self.module, device_ids=[device.index] if device.type == "cuda" else None)
                    if world_size > 1 else None)
        wrapped = self.ddp or self.module
        self.wrapped = torch.compile(wrapped) if spec.train.compile else wrapped
        self.optimizer = make_optimizer(self.params, phase, spec.train)
        self.scheduler = make_scheduler(self.optimizer, phase, spec)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" else None

    def at_boundary(self) -> bool:
        """Whether the next micro-batch completes the accumulation (its gradients are synced)."""
        return (self._micro + 1) % self.grad_accum == 0

    def micro_batch(self) -> contextlib.AbstractContextManager:
        # DDP decides in the forward whether the backward all-reduces: only the last micro-batch does.
        return self.ddp.no_sync() if self.ddp is not None and not self.at_boundary() else contextlib.nullcontext()

    def step(self, loss: torch.Tensor) -> None:
        if self._micro % self.grad_accum == 0:
            # Cleared just before the first backward, as a hand-written loop does: freeing them
            # right after the optimizer step measured ~4% slower on CPU (the allocator then
            # hands the backward fresh memory).
            self.optimizer.zero_grad(set_to_none=True)
        boundary = self.at_boundary()
        self._micro += 1
        if self.grad_accum > 1:
            loss = loss / self.grad_accum   # the accumulated gradient is the mean over micro-batches
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        if not boundary:
            return
        if self.grad_clip:
            if self.scaler:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()

    def _file(self, directory: Path) -> Path:
        return directory / f"{self.name}.pt"

    def save(self, directory: Path, rank: int) -> None:
        if rank != 0:   # every rank holds the same state
            return
        directory.mkdir(parents=True, exist_ok=True)
        torch.save({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler else None}, self._file(directory))

    def load(self, directory: Path) -> None:
        state = torch.load(self._file(directory), map_location=self.device, weights_only=False)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])


def make_engine(spec: JobSpec, module: nn.Module, phase: Phase, device: torch.device, world_size: int) -> Engine:
    if spec.strategy.kind == "deepspeed":
        from jobs.deepspeed_engine import DeepSpeedEngine   # imports deepspeed: only when asked for

        return DeepSpeedEngine(module, phase, device, spec, world_size)
    return DDPEngine(module, phase, device, spec, world_size)
