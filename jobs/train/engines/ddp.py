"""The DDP engine: torch DistributedDataParallel over the process group Ray Train set up."""
from __future__ import annotations

import contextlib
import inspect
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from jobs.train.engines.base import Engine, make_optimizer, make_scheduler, zero_state_
from jobs.spec import JobSpec
from models.family import Phase
from models.registry import get_family_cls
from models.safe_load import load_weights_only


# DistributedDataParallel's keyword for syncing buffers before each forward: torch >= 2.13 names it
# `forward_sync_buffers` (and deprecates `broadcast_buffers`, whose False also skipped the copy at
# construction); older versions only know `broadcast_buffers`.
_SYNC_KEYWORD = ("forward_sync_buffers" if "forward_sync_buffers" in
                 inspect.signature(DistributedDataParallel.__init__).parameters else "broadcast_buffers")


def buffer_sync_kwargs(sync: bool) -> dict[str, bool]:
    """The keyword argument that makes this torch's DDP sync buffers before each forward, or not."""
    return {_SYNC_KEYWORD: sync}


def copy_rank0_buffers(module: nn.Module) -> None:
    """Rank 0's buffers into every rank once, as DDP's construction does when it syncs buffers: what
    an older torch skips under `broadcast_buffers=False`."""
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


class DDPEngine(Engine):
    """torch DDP over the process group Ray Train set up (gloo on CPU, NCCL on GPU)."""

    def __init__(self, module: nn.Module, phase: Phase, device: torch.device, spec: JobSpec, world_size: int):
        super().__init__(module, phase, device, spec)
        self.grad_accum, self.grad_clip = spec.train.grad_accum, spec.train.grad_clip
        self._micro = 0   # micro-batches stepped so far; a multiple of grad_accum after every train step
        # DDP broadcasts rank 0's weights at construction, so every rank starts identical. Whether it
        # also copies rank 0's buffers before every forward is the family's call (Family.broadcast_buffers),
        # unless the spec sets train.broadcast_buffers (so that the GPU check can measure both).
        chosen = spec.train.broadcast_buffers
        self.broadcast_buffers = bool(get_family_cls(spec.family).broadcast_buffers if chosen is None else chosen)
        self.ddp = None
        if world_size > 1:
            sync = buffer_sync_kwargs(self.broadcast_buffers)
            if "broadcast_buffers" in sync and not self.broadcast_buffers:
                copy_rank0_buffers(self.module)
            self.ddp = DistributedDataParallel(self.module, device_ids=[device.index] if device.type == "cuda" else None,
                                               **sync)
        wrapped = self.ddp or self.module
        self.wrapped = torch.compile(wrapped) if spec.train.compile else wrapped
        self.optimizer = make_optimizer(self.groups, phase, spec.train,
                                        fused=spec.train.fused_adam and device.type == "cuda")
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

    def restart_state(self, params: list[nn.Parameter]) -> None:
        for p in self.groups[self.group_index(params)]:
            zero_state_(self.optimizer.state.get(p, {}))

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
        state = load_weights_only(self._file(directory), map_location=self.device)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
