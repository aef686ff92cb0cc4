"""The family-agnostic training loop that Ray Train runs on every worker.

Per step: one batch from this rank's share of the shards; for each phase of the family, only
that phase's network is trainable, the family computes the loss (per micro-batch) and the phase's
engine steps. Every checkpoint interval, every rank saves its part of the training state and
reports it to Ray Train; every rank scores its share of the evaluation (jobs/eval/spread.py) and
rank 0 logs to MLflow. After a failure Ray restarts the worker group, and the loop continues from
the latest checkpoint at the same step, with the same batches and the same noise as an
uninterrupted run.
"""
from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from data_shards.preview import image_grid
from data_shards.split import Holdout
from data_shards.storage import join
from data_shards.stream import batches_per_epoch, image_stream, iterate_once, retries, skipped, training_share
from jobs.train import checkpoints
from jobs.train.engines import Engine, check_training_setup, make_engine
from jobs.eval.core import EvalSettings, preview
from jobs.eval.spread import evaluate_spread, gather_to_rank0
from jobs.train.config import WorkerConfig
from jobs.train.progress import WorkerProgress
from jobs.train.resume import checkpoint_to_resume
from jobs.spec import JobSpec
from jobs.tracking import model_refs
from jobs.tracking.buffered import pending_url
from jobs.tracking.runs import RunLogger
from models.family import Family, Phase, StepContext, StepEnd
from models.images import to_float

GRID_SEED = 123


@dataclass
class Worker:
    """One rank's training: what every checkpoint report needs, in one place."""

    cfg: WorkerConfig
    spec: JobSpec
    family: Family
    networks: dict[str, nn.Module]
    engines: dict[str, Engine]
    rank: int
    world: int
    device: torch.device
    log: RunLogger | None        # rank 0 only


def say(msg: str) -> None:
    # Not print(): Ray Train patches print and, with stdout wrapped, shows each line twice.
    sys.stdout.write(f"[orbitgen] {msg}\n")
    sys.stdout.flush()


def build_training(spec: JobSpec, device: torch.device, world_size: int
                   ) -> tuple[Family, dict[str, nn.Module], list[Phase], dict[str, Engine]]:
    """The family, its networks on the device (bare modules), its phases and one engine per
    phase, identical on every rank."""
    family = spec.make_family()
    check_training_setup(spec, family)
    torch.manual_seed(spec.train.seed)  # identical init everywhere (DDP also broadcasts rank 0's)
    networks = family.build()
    phases = family.phases()
    engines = {ph.name: make_engine(spec, networks[ph.name], ph, device, world_size) for ph in phases}
    for name, net in networks.items():
        if name not in engines:   # EMA copies, frozen networks: no engine, no gradients
            net.to(device).requires_grad_(False)
    networks.update({name: e.module for name, e in engines.items()})
    return family, networks, phases, engines


def step_seed(seed: int, rank: int, step: int) -> int:
    """The noise seed of one rank's step: a function of (seed, rank, step) only, so a resumed run
    draws what an uninterrupted one would. Hashed, not a linear mix: `seed·a + rank·b + step`
    gives rank r at step s the seed of rank r+1 at step s−b, so ranks of long runs would reuse
    each other's noise."""
    digest = hashlib.blake2b(f"orbitgen-step/{seed}/{rank}/{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1   # 63 bits: what torch.manual_seed takes without wrapping


def _gather(value: int, world_size: int) -> list[int]:
    if world_size == 1:
        return [value]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, value)
    return out


def _mean_over_ranks(world_size: int):
    def mean(t: torch.Tensor) -> torch.Tensor:
        if world_size == 1:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)
        return t / world_size
    return mean


def _from_rank0(world_size: int):
    def broadcast(obj: Any) -> Any:
        if world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return broadcast


# How long the other ranks wait for rank 0's solo work (`StepEnd.on_rank0`): SCB-GAN's probe reads
# 10k images, runs four backbones on 20k and fits 12 probes, far past the 300 s collective timeout.
SOLO_WORK_TIMEOUT_S = 3 * 3600


def _on_rank0(world_size: int, rank: int, timeout_s: float = SOLO_WORK_TIMEOUT_S):
    """`StepEnd.on_rank0`: rank 0 runs the work, then broadcasts its result over a gloo group of
    its own with a long timeout; the run's group (NCCL on GPUs) and its timeout stay as they were.
    The group is made on first use, before rank 0 starts the work, while every rank is there."""
    group: list[Any] = []

    def run(work: Callable[[], Any]) -> Any:
        if world_size == 1:
            return work()
        if not group:
            group.append(dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)))
        box: list[Any] = [None]
        if rank == 0:
            try:
                box = [(True, work())]
            except Exception as e:
                # The others must not wait out the long timeout for a result that will not come.
                dist.broadcast_object_list([(False, f"{type(e).__name__}: {e}")], src=0, group=group[0])
                raise
        dist.broadcast_object_list(box, src=0, group=group[0])
        ok, value = box[0]
        if not ok:
            raise RuntimeError(f"rank 0's work failed: {value}")
        return value
    return run


def open_stream(data_url: str, spec: JobSpec, keys: tuple[str, ...], rank: int, world_size: int,
                start_batch: int) -> Iterator[dict]:
    """This rank's batches from batch `start_batch` on: what an uninterrupted stream yields there."""
    return image_stream(data_url, rank=rank, world_size=world_size, batch_size=spec.per_worker_batch,
                        seed=spec.train.seed, shuffle_buffer=spec.data.shuffle_buffer,
                        num_workers=spec.data.loader_workers, keys=keys, start_batch=start_batch,
                        holdout=spec.data.holdout)


def to_device(batch: Mapping[str, Any], keys: tuple[str, ...], device: torch.device,
              channels_last: bool = False) -> dict[str, torch.Tensor]:
    """uint8 image tensors become float in [-1, 1] on the device; `cls` stays int64."""
    out: dict[str, Any] = {"__key__": batch["__key__"]} if "__key__" in batch else {}
    for k in keys:
        x = batch[k].to(device, non_blocking=True)
        if x.dtype == torch.uint8:
            x = to_float(x)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
        out[k] = x
    return out


class MineAugBatches:
    """The data set expanded to N·(1+K) by MineAug (models/augment/mineaug.py): in epoch e a sample is
    shown with augmentation (e + hash(key)) mod (K+1) (0: the original), so K+1 epochs show every
    original once plain and once with each augmentation. Augments on the device, batched."""

    def __init__(self, batches: Iterator[dict], names: list[str], channels: int, batches_per_epoch: int,
                 start_batch: int):
        from models.augment.mineaug import MineAugExpansion

        self.batches, self.expansion = batches, MineAugExpansion(names, channels)
        self.per_epoch, self.index = batches_per_epoch, start_batch

    def __iter__(self) -> "MineAugBatches":
        return self

    def __next__(self) -> dict:
        batch = dict(next(self.batches))
        tags = self.expansion.tags(batch["__key__"], self.index // self.per_epoch)
        batch["image"] = self.expansion(batch["image"], tags)
        self.index += 1
        return batch


class DevicePrefetcher:
    """Batches on the device; on CUDA the next batch is copied on a side stream while this step runs."""

    def __init__(self, batches: Iterator[dict], keys: tuple[str, ...], device: torch.device, channels_last: bool):
        self.batches, self.keys, self.device, self.channels_last = batches, keys, device, channels_last
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ahead = self._load() if self.copy_stream is not None else None

    def _load(self) -> dict[str, torch.Tensor]:
        raw = next(self.batches)
        if self.copy_stream is None:
            return to_device(raw, self.keys, self.device, self.channels_last)
        with torch.cuda.stream(self.copy_stream):
            pinned = {**raw, **{k: raw[k].pin_memory() for k in self.keys}}   # pinned memory: the copy is asynchronous
            return to_device(pinned, self.keys, self.device, self.channels_last)

    def __iter__(self) -> "DevicePrefetcher":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.copy_stream is None:
            return self._load()
        batch = self.ahead
        torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        for t in (batch[k] for k in self.keys):
            t.record_stream(torch.cuda.current_stream(self.device))   # keep the memory until this step is done
        self.ahead = self._load()
        return batch


def split(batch: Mapping[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    if parts == 1:
        return [dict(batch)]
    chunks = {k: v.chunk(parts) for k, v in batch.items()}
    return [{k: c[i] for k, c in chunks.items()} for i in range(parts)]


def train_step(family: Family, phases: list[Phase], engines: Mapping[str, Engine], networks: Mapping[str, nn.Module],
               batch: Mapping[str, torch.Tensor], *, step: int, device: torch.device,
               grad_accum: int = 1) -> dict[str, torch.Tensor]:
    """One optimizer step of every phase on one batch; returns the family's values, still on the device."""
    trained = {name: e.wrapped for name, e in engines.items()}
    micro_batches = split({k: v for k, v in batch.items() if torch.is_tensor(v)}, grad_accum)
    values: dict[str, torch.Tensor] = {}
    for ph in phases:
        engine = engines[ph.name]
        for name, e in engines.items():
            e.set_trainable(name == ph.name)   # before the forward (DeepSpeed ZeRO >= 2 needs it then)
        ctx = StepContext(networks=networks, trained=trained, phase=ph.name, step=step, device=device)
        for micro in micro_batches:
            with engine.micro_batch():
                with engine.autocast():
                    loss, out = family.loss(micro, ctx)
                engine.step(loss)
            for k, v in out.items():
                v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
                values[k] = values[k] + v / grad_accum if k in values else v / grad_accum
    for e in engines.values():
        e.set_trainable(True)   # the resting state, the one checkpoints are saved and loaded in
    return values


def training_batches(spec: JobSpec, data_url: str, family: Family, rank: int, world: int, device: torch.device,
                     start_batch: int) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's training batches on the device from `start_batch` on, MineAug applied when the spec asks."""
    batches: Iterator[dict[str, torch.Tensor]] = DevicePrefetcher(
        open_stream(data_url, spec, family.data_keys, rank, world, start_batch=start_batch),
        family.data_keys, device, spec.train.channels_last)
    if spec.augment.mineaug:
        batches = MineAugBatches(batches, spec.augment.mineaug, spec.data.channels,
                                 batches_per_epoch(data_url, world, spec.per_worker_batch, spec.data.holdout),
                                 start_batch=start_batch)
    return batches


def data_reals(data_url: str, device: torch.device, holdout: Holdout = None) -> Callable[[int], Iterator[torch.Tensor]]:
    """`StepEnd.reals`: up to n training images of the data set as stored (manifest order; held-out
    samples left out), float on the device."""
    def reals(n: int) -> Iterator[torch.Tensor]:
        kept = training_share(data_url, holdout)[1]
        for b in iterate_once(data_url, batch_size=64, limit=n, keys=("image",), positions=kept):
            yield to_float(b["image"]).to(device)
    return reals


def run_steps(spec: JobSpec, family: Family, phases: list[Phase], engines: Mapping[str, Engine],
              networks: Mapping[str, nn.Module], batches: Iterator[dict[str, torch.Tensor]], *, start: int,
              device: torch.device, rank: int = 0, world: int = 1, data_url: str | None = None
              ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """The loop itself: from step `start` to the spec's last step, yields (steps done, the step's values).
    Ray Train's workers and the MineAug search's proxy trainings both run it."""
    mean_over_ranks, from_rank0, on_rank0 = _mean_over_ranks(world), _from_rank0(world), _on_rank0(world, rank)
    reals = data_reals(data_url, device, spec.data.holdout) if data_url else (lambda n: iter(()))

    def restart_optimizer(role: str, params: list[nn.Parameter]) -> None:
        engines[role].restart_state(params)

    step = start
    while step < spec.total_steps:
        torch.manual_seed(step_seed(spec.train.seed, rank, step))   # MineAug's draws and the family's noise
        batch = next(batches)
        values = train_step(family, phases, engines, networks, batch, step=step, device=device,
                            grad_accum=spec.train.grad_accum)
        step += 1
        values.update(family.after_step(StepEnd(networks=networks, rank=rank, step=step, batch=spec.train.batch,
                                                device=device, mean_over_ranks=mean_over_ranks, from_rank0=from_rank0,
                                                reals=reals, restart_optimizer=restart_optimizer,
                                                on_rank0=on_rank0)))
        yield step, values


def run_worker(cfg: WorkerConfig) -> None:
    """One rank's whole run, from its `WorkerConfig` (entered through
    `jobs.train.entry.train_loop_per_worker`)."""
    os.environ.update(cfg.env)
    spec = JobSpec.from_checked(cfg.spec)   # the driver validated and checked it
    # Files the spec names (a frozen stage-1 generator, a ControlNet's base) on this node's disk.
    spec = model_refs.place(spec, cfg.model_files, Path(tempfile.gettempdir()) / "orbitgen-model-refs" / cfg.run_id)
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cuda":   # NCCL's object collectives (the spread evaluation's gather) use the current device
        torch.cuda.set_device(device)
    # What the MLflow server does not take (it went away) waits in the run's storage: the run's
    # folder is Ray's experiment name under the spec's storage (jobs/train/driver.make_trainer).
    spill = pending_url(join(spec.storage_url(), tctx.get_experiment_name()))
    log = RunLogger(cfg.tracking_uri, cfg.run_id, spill=spill) if rank == 0 else None
    progress = WorkerProgress(cfg.progress_board if rank == 0 else None)

    family, networks, phases, engines = build_training(spec, device, world)
    worker = Worker(cfg, spec, family, networks, engines, rank, world, device, log)

    step, images_seen = 0, 0
    resume = checkpoint_to_resume(ray.train.get_checkpoint())   # a whole one: a copy may have been cut short
    if resume is not None:
        with resume.as_directory() as d:
            state = checkpoints.read(Path(d), engines=engines, networks=networks, family=family)
        step, images_seen = state["step"], state["images_seen"]
        if log is not None:
            log.metrics(step, {"resumed_from_step": step})
            say(f"resumed from step {step} ({images_seen} images)")
            progress.note(f"resumed from step {step} ({images_seen} images)")

    total = spec.total_steps
    batches = training_batches(spec, cfg.data_url, family, rank, world, device, start_batch=step)
    t0, seen0 = time.perf_counter(), images_seen
    for step, values in run_steps(spec, family, phases, engines, networks, batches, start=step, device=device,
                                  rank=rank, world=world, data_url=cfg.data_url):
        images_seen += spec.train.batch

        if log is not None and (step % spec.train.log_every == 0 or step == total):
            # Read losses back only here: a .item() every step would sync the device each step.
            shown = {k: float(v) for k, v in values.items()}
            rate = (images_seen - seen0) / max(time.perf_counter() - t0, 1e-9)
            log.metrics(step, {**shown, "images_per_s": rate, "kimg": images_seen / 1000})
            say(f"step {step}/{total} · " + " · ".join(f"{k} {v:.3f}" for k, v in sorted(shown.items()))
                + f" · {rate:.0f} img/s")
            progress.post(step, shown, rate)

        if step % spec.checkpoint.every_steps == 0 or step == total:
            _report(worker, step, images_seen, final=step == total)
    if log is not None:
        log.close()   # what the server did not take by then, the driver delivers


def _eval_settings(w: Worker) -> EvalSettings:
    """The spec's evaluation, its weights files on this node (shipped by the driver where the
    node lacks the driver's paths: jobs/eval/weights.py)."""
    from jobs.eval import weights

    settings = EvalSettings.from_spec(w.spec, w.family)
    return weights.place(settings, w.cfg.model_files, weights.node_folder())


def _report(w: Worker, step: int, images_seen: int, final: bool) -> None:
    spec, family, networks, engines, rank, log, device = w.spec, w.family, w.networks, w.engines, w.rank, w.log, w.device
    world, data_url = w.world, w.cfg.data_url
    steps_per_rank = _gather(step, world)
    # Storage faults survived and corrupt samples skipped, summed over ranks: visible in the run, not only in logs.
    data = {"data_retries": sum(_gather(retries(), world)), "data_skipped": sum(_gather(skipped(), world))}
    metrics: dict[str, Any] = {"step": step, "images_seen": images_seen, "steps_per_rank": steps_per_rank, **data}
    if log is not None:
        log.metrics(step, data)
        if any(data.values()):
            say(f"data: {data['data_retries']} reads retried after storage faults, "
                f"{data['data_skipped']} corrupt samples skipped (all ranks, so far)")
    with tempfile.TemporaryDirectory() as tmp:
        # Save first (collective for DeepSpeed), then evaluate: every rank scores its share (the
        # shares are equal, so no rank waits long in the gather), rank 0 merges and logs.
        checkpoints.write(Path(tmp), rank=rank, engines=engines, networks=networks, family=family, step=step,
                          images_seen=images_seen,
                          extra={"steps_per_rank": steps_per_rank, "mlflow_run_id": w.cfg.run_id})
        due = final or (spec.eval.every_steps and step % spec.eval.every_steps == 0)
        if due or spec.checkpoint.best_metric:   # best-by-metric ranks every checkpoint
            sampler = networks[family.sampler_role]
            settings = _eval_settings(w)
            spread = evaluate_spread(family, sampler, settings, data_url=data_url, device=device, rank=rank,
                                     world=world, gather=gather_to_rank0(world, rank))
        if rank == 0 and (due or spec.checkpoint.best_metric):
            scores, params = spread
            log.image(image_grid(preview(family, sampler, data_url=data_url, n=64, seed=GRID_SEED,
                                         device=device, holdout=spec.data.holdout)),
                      f"samples/grid_step{step:07d}.png")
            log.metrics(step, scores)
            if final:
                log.params(params)
                log.metrics(step, {f"steps_rank_{r}": s for r, s in enumerate(steps_per_rank)})
            metrics.update(scores)
        # Ranks that wrote nothing (DDP's others) report no checkpoint; Ray merges the rest into one.
        written = any(Path(tmp).iterdir())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if written else None)
