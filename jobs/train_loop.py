"""The family-agnostic training loop that Ray Train runs on every worker.

Per step: one batch from this rank's share of the shards; for each phase of the family, only
that phase's network is trainable, the family computes the loss and the phase's engine steps.
Rank 0 logs to MLflow, writes checkpoints and evaluates; every rank reports to Ray Train.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from data_shards.stream import image_stream
from data_shards.preview import image_grid
from jobs import checkpoints
from jobs.engines import make_engine
from jobs.evaluate import evaluate
from jobs.spec import JobSpec
from jobs.tracking import RunLogger
from models.family import StepContext, get_family_cls
from models.images import nchw_to_nhwc_numpy, to_float, to_uint8

GRID_SEED = 123


def say(msg: str) -> None:
    # Not print(): Ray Train patches print and, with stdout wrapped, shows each line twice.
    sys.stdout.write(f"[orbitgen] {msg}\n")
    sys.stdout.flush()


def build_family(spec: JobSpec):
    cls = get_family_cls(spec.family)
    return cls(cls.config_cls.model_validate(spec.model), resolution=spec.data.resolution,
               channels=spec.data.channels, lr=spec.train.lr)


def step_seed(seed: int, rank: int, step: int) -> int:
    # Noise depends on (seed, rank, step) only: a resumed run draws what an uninterrupted one would.
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63)


def _gather(value: int, world_size: int) -> list[int]:
    if world_size == 1:
        return [value]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, value)
    return out


def to_device(batch: dict[str, Any], keys: tuple[str, ...], device: torch.device) -> dict[str, torch.Tensor]:
    """uint8 image tensors become float in [-1, 1] on the device; `cls` stays int64."""
    return {k: to_float(batch[k].to(device, non_blocking=True)) if batch[k].dtype == torch.uint8
            else batch[k].to(device) for k in keys}


def train_loop_per_worker(config: dict[str, Any]) -> None:
    os.environ.update(config.get("env", {}))
    spec = JobSpec.model_validate(config["spec"])
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device()
    log = RunLogger(config["tracking_uri"], config["run_id"]) if rank == 0 else None

    family = build_family(spec)
    torch.manual_seed(spec.train.seed)  # identical init everywhere (DDP also broadcasts rank 0's)
    networks = family.build()
    phases = family.phases()
    engines = {ph.name: make_engine(spec.strategy.kind, networks[ph.name], ph, device, world,
                                    spec.train.precision, spec.strategy.zero_stage) for ph in phases}
    for name, net in networks.items():
        if name not in engines:
            net.to(device).requires_grad_(False)
    trained = {name: e.wrapped for name, e in engines.items()}

    step, images_seen = 0, 0
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            state = checkpoints.read(Path(d), engines)
        step, images_seen = state["step"], state["images_seen"]
        if rank == 0:
            say(f"resumed from step {step} ({images_seen} images)")

    total = spec.total_steps
    stream = image_stream(config["data_url"], rank=rank, world_size=world, batch_size=spec.per_worker_batch,
                          seed=spec.train.seed, shuffle_buffer=spec.data.shuffle_buffer,
                          num_workers=spec.data.loader_workers, keys=family.data_keys)
    pending: dict[str, torch.Tensor] = {}
    t0, seen0 = time.perf_counter(), images_seen
    while step < total:
        batch = to_device(next(stream), family.data_keys, device)
        torch.manual_seed(step_seed(spec.train.seed, rank, step))
        for ph in phases:
            for name, e in engines.items():
                e.set_trainable(name == ph.name)
            ctx = StepContext(networks=networks, trained=trained, phase=ph.name, step=step, device=device)
            with engines[ph.name].autocast():
                loss, values = family.loss(batch, ctx)
            engines[ph.name].step(loss)
            pending.update({k: v.detach() if torch.is_tensor(v) else torch.tensor(float(v)) for k, v in values.items()})
        step += 1
        images_seen += spec.train.batch

        if log is not None and (step % spec.train.log_every == 0 or step == total):
            # Read losses back only here: a .item() every step would sync the device each step.
            values = {k: float(v) for k, v in pending.items()}
            rate = (images_seen - seen0) / max(time.perf_counter() - t0, 1e-9)
            log.metrics(step, {**values, "images_per_s": rate, "kimg": images_seen / 1000})
            shown = " · ".join(f"{k} {v:.3f}" for k, v in sorted(values.items()))
            say(f"step {step}/{total} · {shown} · {rate:.0f} img/s")

        if step % spec.checkpoint.every_steps == 0 or step == total:
            _report(spec, config, family, networks, engines, step, images_seen, rank, world, log, device,
                    final=step == total)


def _report(spec, config, family, networks, engines, step, images_seen, rank, world, log, device, final):
    steps_per_rank = _gather(step, world)
    metrics: dict[str, Any] = {"step": step, "images_seen": images_seen}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            sampler = networks[family.sampler_role]
            if final or (spec.eval.every_steps and step % spec.eval.every_steps == 0):
                grid = image_grid(nchw_to_nhwc_numpy(to_uint8(family.sample(sampler, 64, seed=GRID_SEED))))
                log.image(grid, f"samples/grid_step{step:07d}.png")
                scores, params = evaluate(family, sampler, data_url=config["data_url"],
                                          num_samples=spec.eval.num_samples, extractor=spec.eval.fid_extractor,
                                          inception_weights=spec.eval.inception_weights, device=device)
                log.metrics(step, scores)
                if final:
                    log.params(params)
                    log.metrics(step, {f"steps_rank_{r}": s for r, s in enumerate(steps_per_rank)})
                metrics.update(scores)
            checkpoints.write(Path(tmp), engines=engines, family=family, step=step, images_seen=images_seen,
                              extra={"steps_per_rank": steps_per_rank})
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        metrics["steps_per_rank"] = steps_per_rank
        ray.train.report(metrics, checkpoint=checkpoint)
