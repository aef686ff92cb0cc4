"""Engines: one per trained network; `make_engine` picks DDP or DeepSpeed from the spec.

The interface is `jobs.train.engines.base.Engine`; see that module's docstring.
"""
from __future__ import annotations

import torch
from torch import nn

from jobs.train.engines.base import Engine, autocast_dtype, lr_factor, make_optimizer, make_scheduler
from jobs.train.engines.ddp import DDPEngine
from jobs.spec import JobSpec, check_training_setup
from models.family import Family, Phase

__all__ = ["DDPEngine", "Engine", "autocast_dtype", "check_training_setup", "lr_factor", "make_engine", "make_optimizer", "make_scheduler"]


def make_engine(spec: JobSpec, module: nn.Module, phase: Phase, device: torch.device, world_size: int) -> Engine:
    if spec.strategy.kind == "deepspeed":
        from jobs.train.engines.deepspeed import DeepSpeedEngine   # imports deepspeed: only when asked for

        return DeepSpeedEngine(module, phase, device, spec, world_size)
    return DDPEngine(module, phase, device, spec, world_size)
