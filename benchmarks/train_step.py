"""Train-step benchmark: orbitgen's step (engines + the loop's `train_step`) against a plain
single-process PyTorch loop on the same model, batch and data, in the same run.

    .venv/bin/python benchmarks/train_step.py [--families dcgan,pix2pix,stylegan2,diffusion]
        [--steps 10] [--rounds 7] [--precision fp32]

For each family among dcgan, pix2pix, stylegan2 and diffusion that exists:
  * plain: the family's networks and loss, one torch Adam per phase, per phase: requires_grad on
    for the phase's network only, forward (under torch.autocast with --precision bf16),
    zero_grad, backward, step; the global RNG reseeded per step as orbitgen does (so both draw
    the same noise);
  * orbitgen DDP engine: `build_training` + `train_step` in one process (world size 1: the DDP
    wrapper is skipped there, as in training with one worker);
  * orbitgen DeepSpeed engine, ZeRO-0, -1 and -2: the same in a one-process gloo group.
All variants start from the same weights and see the same batch (already on the device, so only
the step is timed). Rounds interleave the variants (rotating their order), `--steps` steps each
after a warm-up; each figure is the fastest single step over all rounds (the machine is shared;
the fastest step is the least disturbed one). ZeRO-0 separates DeepSpeed's engine from ZeRO's
partitioning.
Prints a markdown table for benchmarks/BENCHMARKS.md. Not a test: nothing here asserts.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import sys
import time
from datetime import date
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))  # DeepSpeed's comm op

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from jobs.train.engines import autocast_dtype  # noqa: E402
from jobs.spec import JobSpec  # noqa: E402
from jobs.train.loop import build_training, step_seed, train_step  # noqa: E402
from models.family import StepContext
from models.registry import available_families  # noqa: E402

FAMILIES = ("dcgan", "pix2pix", "stylegan2", "diffusion")
# Published default widths; resolution and batch sized for 2 CPU cores.
SETUPS = {
    "dcgan": {"resolution": 64, "batch": 16, "model": {}},
    "pix2pix": {"resolution": 32, "batch": 4, "model": {}},
    # paper256 widths (512 channels at 32²) without the vision-aided heads (they need backbone files)
    "stylegan2": {"resolution": 32, "batch": 4, "model": {"vision_aided": None}},
    "diffusion": {"resolution": 32, "batch": 4, "model": {}},   # DDPM's CIFAR-10 UNet
}
STRATEGIES = {"DDP engine": {"kind": "ddp"}, "DeepSpeed ZeRO-0": {"kind": "deepspeed", "zero_stage": 0},
              "DeepSpeed ZeRO-1": {"kind": "deepspeed", "zero_stage": 1},
              "DeepSpeed ZeRO-2": {"kind": "deepspeed", "zero_stage": 2}}


def make_spec(family: str, strategy: dict, precision: str) -> JobSpec:
    s = SETUPS[family]
    return JobSpec.model_validate({
        "name": "bench", "family": family, "model": s["model"],
        "data": {"train": "builtin:craters", "resolution": s["resolution"], "channels": 3},
        "train": {"batch": s["batch"], "steps": 1000, "precision": precision},
        "strategy": strategy, "scaling": {"num_workers": 1}})


def fixed_batch(keys: tuple[str, ...], spec: JobSpec) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r, n = spec.data.resolution, spec.train.batch
    channels = {"image": 3, "cond": 3, "mask": 1}
    batch = {k: torch.rand(n, channels[k], r, r, generator=g) * 2 - 1 for k in keys if k in channels}
    if "cls" in keys:
        batch["cls"] = torch.randint(0, 10, (n,), generator=g)
    return batch


def plain_step_fn(spec: JobSpec, batch: dict) -> Callable[[int], None]:
    """The loop one writes by hand for the family: no engine, no wrapper."""
    family = spec.make_family()
    torch.manual_seed(spec.train.seed)   # the engines' runs start from these same weights
    nets = family.build()
    phases = family.phases()
    opts = {ph.name: torch.optim.Adam(nets[ph.name].parameters(), lr=ph.lr, betas=ph.betas,
                                      weight_decay=ph.weight_decay) for ph in phases}
    device = torch.device("cpu")
    dtype = autocast_dtype(spec.train.precision)

    def step(i: int) -> None:
        torch.manual_seed(step_seed(spec.train.seed, 0, i))
        for ph in phases:
            for name, net in nets.items():
                net.requires_grad_(name == ph.name)
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss, _ = family.loss(batch, StepContext(networks=nets, trained=nets, phase=ph.name, step=i, device=device))
            opts[ph.name].zero_grad(set_to_none=True)
            loss.backward()
            opts[ph.name].step()
    return step


def engine_step_fn(spec: JobSpec, batch: dict) -> Callable[[int], None]:
    device = torch.device("cpu")
    family, networks, phases, engines = build_training(spec, device, world_size=1)

    def step(i: int) -> None:
        torch.manual_seed(step_seed(spec.train.seed, 0, i))
        train_step(family, phases, engines, networks, batch, step=i, device=device, grad_accum=spec.train.grad_accum)
    return step


def one_process_group() -> None:
    """A gloo group of one: what DeepSpeed needs to run outside a launcher (see ENVIRONMENT.md)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)


def time_steps(step: Callable[[int], None], first: int, n: int) -> list[float]:
    times = []
    for i in range(first, first + n):
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    return times


def bench_family(name: str, args) -> dict[str, float]:
    spec = make_spec(name, {"kind": "ddp"}, args.precision)
    batch = fixed_batch(spec.make_family().data_keys, spec)
    variants = {"plain PyTorch": plain_step_fn(spec, batch)}
    for label, strategy in STRATEGIES.items():
        variants[label] = engine_step_fn(make_spec(name, strategy, args.precision), batch)
    for label, step in variants.items():   # warm-up: first steps allocate, Adam creates its state
        time_steps(step, 0, args.warmup)
    times: dict[str, list[float]] = {label: [] for label in variants}
    labels = list(variants)
    for r in range(args.rounds):   # interleaved, each round in another order: disturbances hit all alike
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            times[label] += time_steps(variants[label], args.warmup + r * args.steps, args.steps)
    return {label: min(t) for label, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--steps", type=int, default=10, help="steps per variant per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    one_process_group()

    rows, missing = [], []
    for name in args.families.split(","):
        if name not in available_families():
            missing.append(name)
            continue
        s = SETUPS[name]
        best = bench_family(name, args)
        base = best["plain PyTorch"]
        rows.append(f"| {name} | {s['resolution']}² × {s['batch']} | {base * 1000:.1f} | "
                    + " | ".join(f"{best[k] * 1000:.1f} ({best[k] / base:.3f}×)" for k in STRATEGIES) + " |")
        print(f"[bench] {name} done", file=sys.stderr)

    print(f"\n{date.today()} · {platform.node()} · {os.cpu_count()} cores, no GPU · torch {torch.__version__} · "
          f"{torch.get_num_threads()} threads · precision {args.precision} · fastest step of {args.rounds} "
          f"rounds × {args.steps} steps\n")
    print("| family | resolution × batch | plain PyTorch ms/step | " + " | ".join(f"{k} ms/step (vs plain)" for k in STRATEGIES) + " |")
    print("|---|---|---:|" + "---:|" * len(STRATEGIES))
    print("\n".join(rows))
    if missing:
        print(f"\nNot measured (no such family in this checkout): {', '.join(missing)}.")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
