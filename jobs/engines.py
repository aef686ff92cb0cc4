"""Engines: one per trained network. An engine owns wrapping for data parallelism, backward,
the optimizer step, mixed precision and the network's training state.

The train loop only calls `engine.step(loss)` and reads `engine.wrapped` / `engine.module`;
a DeepSpeed engine (one `deepspeed.initialize` per network) fits behind the same interface.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models.family import Phase


class DDPEngine:
    """torch DDP over the process group Ray Train set up (gloo on CPU, NCCL on GPU)."""

    def __init__(self, module: nn.Module, phase: Phase, device: torch.device, world_size: int, precision: str):
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("train.precision fp16 needs a GPU; use bf16 or fp32 on CPU")
        self.name = phase.name
        self.module = module.to(device)
        # DDP broadcasts rank 0's weights at construction, so every rank starts identical.
        self.wrapped = (DistributedDataParallel(self.module, device_ids=[device.index] if device.type == "cuda" else None)
                        if world_size > 1 else self.module)
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=phase.lr, betas=phase.betas,
                                          weight_decay=phase.weight_decay)
        self.device = device
        self.precision = precision
        self.scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def set_trainable(self, flag: bool) -> None:
        self.module.requires_grad_(flag)

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])


def make_engine(kind: str, module: nn.Module, phase: Phase, device: torch.device, world_size: int,
                precision: str, zero_stage: int = 1):
    if kind == "ddp":
        return DDPEngine(module, phase, device, world_size, precision)
    raise NotImplementedError(f"strategy.kind {kind!r} is not available yet; use ddp")
