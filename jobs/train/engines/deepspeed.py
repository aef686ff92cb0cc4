"""The DeepSpeed engine: one `deepspeed.initialize` per trained network, configured from the spec.

Rules that two engines in one process need (see ENVIRONMENT.md and DeepSpeed issue #4923):
- other phases call the bare `module`, never the DeepSpeed engine, so that only the phase's own
  engine runs its backward hooks;
- a network not trained in a phase has `requires_grad` off before that phase's forward (the loop
  does this through `set_trainable`): at ZeRO >= 2 its gradient hooks would otherwise fire for a
  second reduction ("parameter has already been reduced");
- each engine saves under its own tag, so two engines never overwrite one `latest` file.

Inside Ray Train, `deepspeed.initialize` finds Ray's process group already set up and reuses it.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from jobs.train.engines.base import Engine, make_optimizer, make_scheduler, zero_state_
from jobs.spec import JobSpec
from models.family import Phase
from models.safe_load import deepspeed_safe_classes, load_weights_only


# ZeRO-1/2's reduce and all-gather buckets, in elements. DeepSpeed's default (5e8) allocates 2 GB
# fp32 buffers per engine; a GAN's networks hold a few 1e7 parameters, so a bucket the size of the
# network (at most this) loses no overlap and saves the memory.
MAX_BUCKET = 50_000_000
MIN_BUCKET = 1_000_000


def bucket_size(module: nn.Module | None) -> int:
    """Elements per ZeRO bucket for this network: its parameter count within [MIN_BUCKET, MAX_BUCKET]."""
    if module is None:
        return MAX_BUCKET
    return int(min(MAX_BUCKET, max(MIN_BUCKET, sum(p.numel() for p in module.parameters()))))


def deepspeed_config(spec: JobSpec, world_size: int, module: nn.Module | None = None) -> dict[str, Any]:
    """The DeepSpeed config of an engine of a run (of `module`, which sizes the ZeRO buckets): the
    spec's settings, then `strategy.deepspeed` over them."""
    bucket = bucket_size(module)
    config: dict[str, Any] = {
        "train_batch_size": spec.per_worker_batch * world_size,
        "train_micro_batch_size_per_gpu": spec.per_worker_batch // spec.train.grad_accum,
        "gradient_accumulation_steps": spec.train.grad_accum,
        "gradient_clipping": spec.train.grad_clip or 0.0,   # DeepSpeed's own default is 1.0
        "zero_optimization": {"stage": spec.strategy.zero_stage, "reduce_bucket_size": bucket,
                              "allgather_bucket_size": bucket},
        # Mixed precision as under DDP: fp32 weights (ZeRO keeps the optimizer state fp32 too) and
        # torch.autocast. DeepSpeed's "bf16"/"fp16" modes would cast the networks themselves, which
        # BatchNorm and the bare modules other phases call (fp32 inputs) do not survive.
        # No module's gradients reduced in the autocast dtype (DeepSpeed's default for Linear/Conv):
        # fp32 reductions, as DDP does with fp32 weights, so the two strategies train alike.
        "torch_autocast": {"enabled": spec.train.precision != "fp32",
                           "dtype": {"bf16": "bfloat16", "fp16": "float16"}.get(spec.train.precision, "float32"),
                           "lower_precision_safe_modules": []},
        "steps_per_print": 2**31 - 1,   # the loop logs; DeepSpeed's own step lines would only repeat it
        "wall_clock_breakdown": False,
    }
    return _merge(config, spec.strategy.deepspeed)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class DeepSpeedEngine(Engine):
    def __init__(self, module: nn.Module, phase: Phase, device: torch.device, spec: JobSpec, world_size: int):
        import deepspeed

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        super().__init__(module, phase, device, spec)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.module,
            optimizer=make_optimizer(self.groups, phase, spec.train),
            lr_scheduler=lambda optimizer: make_scheduler(optimizer, phase, spec),
            config=deepspeed_config(spec, world_size, self.module),
        )
        self.module = self.engine.module
        _load_weights_only(self.engine.checkpoint_engine)
        if spec.train.compile:
            self.engine.compile()
        self.wrapped = self.engine

    def step(self, loss: torch.Tensor) -> None:
        # DeepSpeed counts micro-batches itself: it scales by 1/grad_accum, reduces gradients and
        # steps the optimizer and schedule only at the accumulation boundary.
        self.engine.backward(loss)
        self.engine.step()

    def restart_state(self, params: list[nn.Parameter]) -> None:
        i = self.group_index(params)
        optimizer = self.engine.optimizer
        if hasattr(optimizer, "single_partition_of_fp32_groups"):
            # ZeRO 1/2: the torch optimizer steps one flat fp32 partition per group (this rank's
            # share), in the order of our groups; its state is that group's state.
            assert {id(p) for p in optimizer.bit16_groups[i]} == {id(p) for p in params}
            flat = optimizer.single_partition_of_fp32_groups[i]
            zero_state_(optimizer.optimizer.state.get(flat, {}))
        else:   # ZeRO 0: the torch optimizer itself, per parameter
            for p in self.groups[i]:
                zero_state_(optimizer.state.get(p, {}))

    def save(self, directory: Path, rank: int) -> None:
        # Collective: rank 0 writes the weights, every rank its ZeRO partition of the optimizer state.
        self.engine.save_checkpoint(str(directory), tag=self.name, save_latest=False)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=self.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed state for {self.name!r} under {directory}")


def _load_weights_only(checkpoint_engine: Any) -> None:
    """DeepSpeed's checkpoint engine reads with torch.load(weights_only=False): every file of an
    engine state goes through our restricted load instead (models/safe_load.py)."""
    allow = deepspeed_safe_classes()
    checkpoint_engine.load = lambda path, map_location=None: load_weights_only(path, map_location=map_location,
                                                                               allow=allow)
