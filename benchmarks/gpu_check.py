"""The GPU check (issues 12, 24): one command that measures what one GPU does with orbitgen, in one table.

    bash benchmarks/gpu_check.sh [--out FILE.json] [--inception PATH] [--rows a,b] [--smoke]

gpu_check.sh first runs infra/setup.sh (the CUDA torch build that the driver runs; its time is
printed apart from the check's 8-minute budget), then this script. Without CUDA it exits non-zero in
one line, except with `--smoke`. The header names the device, the driver and the CUDA versions.

Rows, each through the code a training run uses (`jobs.spec.load_spec` with `--set` overrides,
`spec.make_family()`, `jobs.train.loop.build_training` / `run_steps` / `training_batches`, the engines
of `jobs.train.engines`), one process, world size 1. Every spec runs as it trains: at its own batch
per GPU (`train.batch / scaling.num_workers` of the ready spec) and its own switches
(`train.channels_last`, `train.compile`, `train.precision`), which each row records, with the host
syncs per step (counted with `torch.cuda.set_sync_debug_mode("warn")` over 16 steps):
  * stylegan2_ddp, stylegan2_zero1: `scbgan_rosetta` (paper256_2fmap: 256², 1 channel,
    `model.vision_aided=null`), ADA active (p starts at ADA_P, so the augmentation pipeline runs),
    under the DDP engine (at world size 1 the DDP wrapper is skipped, as in a one-worker run) and
    DeepSpeed ZeRO-1, on a fixed batch already on the device; s/kimg over whole 16-step windows (so
    R1, every 16 steps, and path length, every 4, weigh as in training), warm-up steps excluded.
  * stylegan2_anchor: StyleGAN2-ADA's published paper256 config (channel base 16384, max 512,
    mapping 8, minibatch-std group 8, batch 64 over 8 GPUs = 8 per GPU, lr 0.0025, γ 1, EMA 20 kimg,
    256² RGB) on the same code and engine, ADA active. Its s/kimg is the one the published anchors
    (SG_ANCHOR) measure; the SCB-GAN spec is 2× wider (about 3× the FLOPs per image), so every
    StyleGAN2 row also gives its model FLOPs per image and achieved TFLOP/s: compare at equal FLOPs.
  * diffusion_img_s, diffusion_tflops, diffusion_mfu: `diffusion_uncond` (DDPM's UNet, 64², bf16),
    DDP engine, training images/s; model FLOPs of one step counted with
    torch.utils.flop_counter.FlopCounterMode (forward + backward; matmuls, convolutions, attention);
    MFU = achieved FLOP/s ÷ the card's dense bf16 peak (PEAK_TFLOPS by the exact device name,
    `--peak-tflops` overrides; "unknown" otherwise, never a guess).
  * data: the shard stream (`data_shards.stream` through `jobs.train.loop.training_batches`:
    DataLoader workers, decode, `DevicePrefetcher`, MineAug) of the StyleGAN2 row's spec over a
    built-in crater set written to a temp dir; images/s delivered on the device, nothing else running.
  * randconv, inception: the evaluation's feature extractors
    (`models.metrics.extractors.make_extractor`) on uint8 batches of 64 on the device, at the
    StyleGAN2 row's resolution and channels; Inception needs NVIDIA's TorchScript file
    (`--inception` or $ORBITGEN_INCEPTION_WEIGHTS), else the row says so.

Every row has a time budget (seconds, `BUDGETS`): its measuring loop stops in time, and a row
past its budget is interrupted. A row that fails prints its error and the others still run; the
table is printed whatever happens, also when gpu_check.sh's overall limit interrupts the run.
`--smoke` runs the same code on the CPU in seconds (the families' `tiny` sizes, batch 4, one timed
step and no warm-up, bf16 as on the GPU, an Inception stand-in) so that
tests/unit/test_gpu_check_smoke.py keeps this script working.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))  # DeepSpeed's comm op (CPU)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


def no_cuda_line() -> str:
    return (f"gpu_check: no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
            "--smoke runs on the CPU")


# Refused before the project's imports (seconds, and DeepSpeed's warnings): one line, non-zero.
if __name__ == "__main__" and not {"--smoke", "-h", "--help"} & set(sys.argv[1:]) and not torch.cuda.is_available():
    print(no_cuda_line(), file=sys.stderr)
    sys.exit(2)

from data_shards.builtin import ensure_builtin  # noqa: E402
from jobs.spec import SPECS_DIR, JobSpec, load_spec  # noqa: E402
from jobs.train.loop import build_training, run_steps, training_batches  # noqa: E402
from models.metrics.extractors import make_extractor  # noqa: E402
from models.registry import get_family_cls  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's datasheets (half their "with
# sparsity" figure), keyed by the exact torch.cuda.get_device_name(): an H200 NVL is not an H200 SXM.
# A name not here is "unknown" (give --peak-tflops), never the nearest match.
PEAK_TFLOPS: dict[str, float] = {
    "NVIDIA H100 80GB HBM3": 989.5,    # H100 SXM
    "NVIDIA H100 PCIe": 756.5,
    "NVIDIA H100 NVL": 835.5,
    "NVIDIA H200": 989.5,              # H200 SXM
    "NVIDIA H200 NVL": 835.5,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-PCIE-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0,
    "NVIDIA L40S": 362.05,
    "NVIDIA L4": 121.0,
    "Tesla T4": 65.0,                  # fp16 tensor peak: T4 has no bf16 tensor cores
    "Tesla V100-SXM2-16GB": 125.0,     # fp16 tensor peak: V100 has no bf16 tensor cores
    "Tesla V100-SXM2-32GB": 125.0,
}
# Known cards without a published datasheet figure: named so the table says why, not guessed.
NO_DATASHEET = {"NVIDIA A10G": "AWS's A10G has no NVIDIA datasheet peak"}
ADA_P = 0.2   # ADA's p at the start of every StyleGAN2 row: the augmentation pipeline runs, as in training
SG_ANCHOR = "StyleGAN2-ADA paper256 (published): 21.6–24.2 s/kimg on one V100, 12.5 on one A100"
MFU_GOAL = "goal ≥ 35% (issue 6)"
# Seconds each row group may take on a GPU (the whole check: 8 minutes) and in --smoke.
BUDGETS = {"stylegan2_ddp": 80, "stylegan2_zero1": 90, "stylegan2_anchor": 70, "diffusion": 80, "data": 50,
           "randconv": 20, "inception": 30}
SMOKE_BUDGET = 120   # a cold DeepSpeed comm-op compile on a loaded CPU fits


@dataclass
class Row:
    key: str
    label: str
    unit: str
    value: float | None = None
    note: str = ""
    error: str | None = None
    seconds: float | None = None
    # How the row ran (None: not a training row, or not measured there).
    batch_per_gpu: int | None = None
    bf16: bool | None = None
    channels_last: bool | None = None
    compile: bool | None = None
    syncs_per_step: float | None = None


@dataclass
class Measured:
    """What a row group's measurement returns for one of its rows."""
    value: float | None
    note: str
    spec: JobSpec | None = None
    syncs_per_step: float | None = None


class RowTimeout(Exception):
    pass


@contextlib.contextmanager
def hard_limit(seconds: float):
    """Interrupts the block after `seconds` (SIGALRM: the main thread, between Python bytecodes)."""
    def expire(signum, frame):
        raise RowTimeout(f"past its budget of {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Check:
    """What every row needs: the device, the mode, sizes, a temp dir, a deadline."""

    def __init__(self, args: argparse.Namespace, tmp: Path):
        self.args, self.tmp, self.smoke = args, tmp, args.smoke
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.smoke else torch.device("cpu")
        self.deadline = math.inf

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def spec(self, name: str, *sets: str, batch: int | None = None) -> JobSpec:
        """Ready spec `name` with `sets` on one worker, at the ready spec's own batch per GPU (or `batch`),
        at its family's tiny size and batch 4 in --smoke."""
        path = SPECS_DIR / f"{name}.yaml"
        if batch is None:
            batch = load_spec(path, list(sets)).per_worker_batch   # as it trains: train.batch / num_workers
        common = [f"scaling.use_gpu={str(self.device.type == 'cuda').lower()}", "scaling.num_workers=1",
                  "train.steps=1000000", *sets, f"train.batch={batch}"]
        if self.smoke:
            tiny = get_family_cls(load_spec(path, common).family).tiny
            common += [f"{k}={json.dumps(v)}" for k, v in tiny.items()] + ["train.batch=4"]
        return load_spec(path, common + list(self.args.set))

    def sg_spec(self, *sets: str, batch: int | None = None) -> JobSpec:
        """scbgan_rosetta as it trains (bf16, its batch per GPU), without the vision-aided heads, ADA active."""
        return self.spec("scbgan_rosetta", "model.vision_aided=null", "data.resolution=256", "data.channels=1",
                         "train.precision=bf16", f"augment.ada.initial_p={ADA_P}", *sets,
                         batch=batch if batch is not None else self.args.sg_batch)

    def measure(self, one: Callable[[], Any], *, warmup: int, chunk: int, seconds: float) -> tuple[int, float]:
        """Runs `one` `warmup` times untimed, then in chunks of `chunk` until `seconds` have passed
        (at least one chunk) or the next chunk would pass the deadline; returns (calls timed, seconds)."""
        if self.smoke:
            warmup, chunk, seconds = 0, 1, 0.0
        for _ in range(warmup):
            one()
        self.sync()
        t0, n = time.perf_counter(), 0
        while True:
            for _ in range(chunk):
                one()
            n += chunk
            self.sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds or time.perf_counter() + elapsed * chunk / n > self.deadline:
                return n, elapsed


def device_batch(spec: JobSpec, keys: tuple[str, ...], device: torch.device) -> dict[str, torch.Tensor]:
    """A fixed training batch on the device, as `to_device` hands the loop: images in [-1, 1]."""
    g = torch.Generator().manual_seed(0)
    n, r = spec.per_worker_batch, spec.data.resolution
    out = {k: (torch.rand(n, 1 if k == "mask" else spec.data.channels, r, r, generator=g) * 2 - 1).to(device)
           for k in keys if k != "cls"}
    if "cls" in keys:
        out["cls"] = torch.zeros(n, dtype=torch.int64, device=device)
    return out


def training_steps(check: Check, spec: JobSpec) -> Callable[[], Any]:
    """One call = one step of `run_steps` (every phase, `after_step`) on a fixed device batch."""
    family, networks, phases, engines = build_training(spec, check.device, world_size=1)
    batches = itertools.repeat(device_batch(spec, family.data_keys, check.device))
    steps = run_steps(spec, family, phases, engines, networks, batches, start=0, device=check.device)
    return lambda: next(steps)


class _NoModuleTracker:
    """Stands in for FlopCounterMode's per-module tracker, whose backward hooks refuse autograd.grad
    (R1 and path length differentiate a gradient): every FLOP goes to "Global", which is all we read."""
    parents = {"Global"}

    def __enter__(self) -> "_NoModuleTracker":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def count_flops(one: Callable[[], Any], steps: int) -> float | None:
    """Model FLOPs of `steps` calls (forward + backward, double backward included; FlopCounterMode's
    formulas); None where it cannot count."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _NoModuleTracker()
    try:
        with counter:
            for _ in range(steps):
                one()
        return float(counter.get_total_flops())
    except Exception:   # noqa: BLE001 — a counting failure must not cost the row its timing
        traceback.print_exc(file=sys.stderr)
        return None


def count_host_syncs(check: Check, one: Callable[[], Any], steps: int) -> float | None:
    """Host syncs per call over `steps` calls: torch.cuda.set_sync_debug_mode("warn") warns at each one.
    None on the CPU (there is no device to wait for)."""
    if check.device.type != "cuda":
        return None
    check.sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                one()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    check.sync()
    return sum("synchroniz" in str(w.message) for w in caught) / steps


def peak_for(card: str) -> tuple[float | None, str]:
    """The dense bf16 peak of the card named exactly `card`, and where it comes from ("unknown: ..." else)."""
    if card in PEAK_TFLOPS:
        return PEAK_TFLOPS[card], card
    return None, f"unknown: {card}" + (f" ({NO_DATASHEET[card]})" if card in NO_DATASHEET else "")


def peak_tflops(check: Check) -> tuple[float | None, str]:
    """The peak the check divides by: --peak-tflops, else the table's entry for this device's exact name."""
    card = device_name(check.device)
    if check.args.peak_tflops is not None:
        return check.args.peak_tflops, f"--peak-tflops ({card})"
    return peak_for(card)


def stylegan2(check: Check, spec: JobSpec) -> dict[str, Measured]:
    """s/kimg of `spec` over whole 16-step windows, with model FLOPs per image over one such window."""
    one = training_steps(check, spec)
    window = 1 if check.smoke else 16   # one R1 step and four path-length steps per window
    if not check.smoke:
        for _ in range(4):
            one()   # first-use allocations, kernel choices and compiles, outside every count
    flops = count_flops(one, window)
    if flops is None:
        one = training_steps(check, spec)   # the failed count may have stopped the step generator
    syncs = count_host_syncs(check, one, 16)
    n, seconds = check.measure(one, warmup=4, chunk=16, seconds=20)
    batch = spec.per_worker_batch
    per_image = seconds / (n * batch)
    work = "FLOPs: n/a"
    if flops is not None:
        per_img = flops / (window * batch)
        work = f"{per_img / 1e9:.1f} GFLOP/img (FlopCounterMode, {window}-step window), " \
               f"{per_img / per_image / 1e12:.1f} TFLOP/s achieved"
    return {"": Measured(per_image * 1000, f"{1 / per_image:.1f} img/s · {spec.data.resolution}² × "
                                           f"{spec.data.channels}ch, ch. base {spec.model['channel_base']}, "
                                           f"ADA p₀ {ADA_P}, {n} steps timed · {work} · {SG_ANCHOR}",
                         spec, syncs)}


def anchor_sets(check: Check) -> list[str]:
    """StyleGAN2-ADA's paper256 config (its cfg_specs: ref_gpus 8, mb 64, mbstd 8, fmaps 0.5, lrate 0.0025,
    gamma 1, ema 20, map 8) in scbgan_rosetta's terms; 256² RGB as its published timings."""
    return ["model.channel_base=16384", "model.channel_max=512", "model.mapping_layers=8",
            f"model.mbstd_group={4 if check.smoke else 8}", "train.lr=0.0025", "model.r1_gamma=1.0",
            "model.ema_kimg=20", "data.channels=3", "strategy.kind=ddp"]


def diffusion(check: Check) -> dict[str, Measured]:
    spec = check.spec("diffusion_uncond", "train.precision=bf16", batch=check.args.diff_batch)
    one = training_steps(check, spec)
    if not check.smoke:
        one()   # first-use allocations and kernel choices, outside the count
    flops = count_flops(one, 1) or 0.0
    syncs = count_host_syncs(check, one, 16)
    n, seconds = check.measure(one, warmup=2, chunk=5, seconds=20)
    batch = spec.per_worker_batch
    rate, achieved = n * batch / seconds, flops * n / seconds
    size = f"{spec.data.resolution}² × {spec.data.channels}ch, {n} steps timed"
    peak, source = peak_tflops(check)
    mfu = Measured(achieved / (peak * 1e12) * 100, f"of {peak:g} TFLOP/s dense bf16 ({source}) · {MFU_GOAL}", spec,
                   syncs) if peak else Measured(None, f"peak {source} (give --peak-tflops) · {MFU_GOAL}", spec, syncs)
    return {"img_s": Measured(rate, size, spec, syncs),
            "tflops": Measured(achieved / 1e12, f"{flops / 1e9 / batch:.2f} GFLOP per image (fwd + bwd, "
                                                "FlopCounterMode)", spec, syncs),
            "mfu": mfu}


def data_stream(check: Check) -> dict[str, Measured]:
    spec = check.sg_spec()
    count = 64 if check.smoke else 512
    url = ensure_builtin(f"builtin:craters?count={count}&seed=0", str(check.tmp / "data"),
                         spec.data.resolution, spec.data.channels)
    batches = training_batches(spec, url, spec.make_family(), rank=0, world=1, device=check.device, start_batch=0)
    n, seconds = check.measure(lambda: next(batches), warmup=2, chunk=8, seconds=15)
    batches = None   # drops the stream: its DataLoader workers stop
    return {"": Measured(n * spec.per_worker_batch / seconds,
                 f"{spec.data.resolution}² × {spec.data.channels}ch, batch {spec.per_worker_batch}, "
                 f"{spec.data.loader_workers} DataLoader workers, MineAug {'+'.join(spec.augment.mineaug) or 'off'}, "
                 f"{count} images, {n} batches timed", spec)}


def features(check: Check, name: str) -> dict[str, Measured]:
    weights = None
    if name == "inception":
        weights = check.args.inception or os.environ.get("ORBITGEN_INCEPTION_WEIGHTS")
        if not weights and check.smoke:
            weights = stub_inception(check.tmp / "inception-stub.pt")
        if not weights:
            return {"": Measured(None, "skipped: no weights (give --inception PATH or $ORBITGEN_INCEPTION_WEIGHTS)")}
    spec = check.sg_spec()
    extractor = make_extractor(name, weights).to(check.device)
    batch = 8 if check.smoke else 64
    images = torch.randint(0, 256, (batch, spec.data.channels, spec.data.resolution, spec.data.resolution),
                           dtype=torch.uint8, device=check.device)
    n, seconds = check.measure(lambda: extractor(images), warmup=2, chunk=5, seconds=5)
    stub = " (a stand-in TorchScript of Inception's interface: --smoke)" if check.smoke and not check.args.inception \
        and not os.environ.get("ORBITGEN_INCEPTION_WEIGHTS") and name == "inception" else ""
    return {"": Measured(n * batch / seconds, f"uint8 {spec.data.resolution}² × {spec.data.channels}ch, batch {batch}{stub}")}


def stub_inception(path: Path) -> str:
    """A TorchScript file with the interface of NVIDIA's Inception (2048-d features), for --smoke."""
    class Stub(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(3, 2048)

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return self.proj(torch.nn.functional.interpolate(x, size=(299, 299)).mean(dim=(2, 3)) / 255)

    torch.jit.save(torch.jit.script(Stub()), str(path))
    return str(path)


# name -> (its rows: key suffix -> (label, unit), the measurement)
GROUPS: dict[str, tuple[dict[str, tuple[str, str]], Callable[[Check], dict[str, Measured]]]] = {
    "stylegan2_ddp": ({"": ("StyleGAN2 scbgan_rosetta (paper256_2fmap), DDP engine", "s/kimg")},
                      lambda c: stylegan2(c, c.sg_spec("strategy.kind=ddp"))),
    "stylegan2_zero1": ({"": ("StyleGAN2 scbgan_rosetta (paper256_2fmap), DeepSpeed ZeRO-1", "s/kimg")},
                        lambda c: stylegan2(c, c.sg_spec("strategy.kind=deepspeed", "strategy.zero_stage=1"))),
    "stylegan2_anchor": ({"": ("StyleGAN2-ADA paper256 (published config), DDP engine", "s/kimg")},
                         lambda c: stylegan2(c, c.sg_spec(*anchor_sets(c), batch=8))),
    "diffusion": ({"img_s": ("diffusion UNet (diffusion_uncond), bf16, DDP engine: training", "images/s"),
                   "tflops": ("diffusion UNet: achieved model FLOP/s", "TFLOP/s"),
                   "mfu": ("diffusion UNet: model FLOP utilisation", "%")}, diffusion),
    "data": ({"": ("shard stream into the device (training_batches)", "images/s")}, data_stream),
    "randconv": ({"": ("evaluation features: randconv", "images/s")}, lambda c: features(c, "randconv")),
    "inception": ({"": ("evaluation features: Inception-v3", "images/s")}, lambda c: features(c, "inception")),
}


def row_key(group: str, suffix: str) -> str:
    return f"{group}_{suffix}" if suffix else group


def run_group(check: Check, group: str) -> list[Row]:
    labels, measure = GROUPS[group]
    budget = SMOKE_BUDGET if check.smoke else BUDGETS[group]
    rows = [Row(row_key(group, s), label, unit) for s, (label, unit) in labels.items()]
    print(f"[gpu_check] {group}: up to {budget} s", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    check.deadline = t0 + 0.85 * budget   # the measuring loops stop here; the hard limit is the budget
    try:
        with hard_limit(budget):
            values = measure(check)
        for row, suffix in zip(rows, labels):
            got = values[suffix]
            row.value, row.note, row.syncs_per_step = got.value, got.note, got.syncs_per_step
            if got.spec is not None:
                row.batch_per_gpu = got.spec.per_worker_batch
                row.bf16 = got.spec.train.precision == "bf16"
                row.channels_last = bool(getattr(got.spec.train, "channels_last", False))
                row.compile = bool(getattr(got.spec.train, "compile", False))
    except Exception as e:   # noqa: BLE001 — fail soft: this row's error, then the next row
        traceback.print_exc(file=sys.stderr)
        for row in rows:
            row.error = " ".join(f"{type(e).__name__}: {e}".split())[:400]
    finally:
        gc.collect()
        if check.device.type == "cuda":
            torch.cuda.empty_cache()
    for row in rows:
        row.seconds = time.perf_counter() - t0
        shown = ("error: " + row.error if row.error
                 else f"{row.value:.4g} {row.unit}" if row.value is not None else "—")
        print(f"[gpu_check] {row.key}: {shown}  ({row.seconds:.0f} s)", file=sys.stderr, flush=True)
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})"


def driver_version() -> str | None:
    """The NVIDIA driver's version (nvidia-smi); None where there is none."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def environment(check: Check) -> dict[str, Any]:
    try:
        import deepspeed
        ds = deepspeed.__version__
    except Exception as e:   # noqa: BLE001
        ds = f"not importable ({type(e).__name__})"
    cuda = check.device.type == "cuda"
    return {"date": str(date.today()), "host": platform.node(), "card": device_name(check.device),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None,
            "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(check.device))) if cuda else None,
            "driver": driver_version(), "deepspeed": ds, "python": platform.python_version(),
            "cpu_cores": os.cpu_count(), "smoke": check.smoke, "peak_tflops": peak_tflops(check)[0],
            "setup_seconds": float(os.environ["GPU_CHECK_SETUP_S"]) if os.environ.get("GPU_CHECK_SETUP_S") else None}


def one_process_group(device: torch.device) -> None:
    """World size 1 for DeepSpeed outside a launcher (ENVIRONMENT.md): its variables, then the group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(s.getsockname()[1]))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def flag(value: bool | None) -> str:
    return "—" if value is None else ("on" if value else "off")


def table(env: dict[str, Any], rows: list[Row]) -> str:
    smoke = " · SMOKE (CPU, tiny sizes: not a measurement)" if env["smoke"] else ""
    setup = f"{env['setup_seconds']:.0f} s" if env["setup_seconds"] is not None else "not run by gpu_check.sh"
    lines = [f"GPU check · {env['date']} · {env['card']} · driver {env['driver']} · torch {env['torch']} · "
             f"CUDA {env['cuda']} · cuDNN {env['cudnn']} · DeepSpeed {env['deepspeed']} · Python {env['python']} · "
             f"{env['cpu_cores']} CPU cores{smoke}",
             f"set-up (infra/setup.sh, outside the check's budget): {setup} · check: "
             f"{sum(r.seconds or 0 for r in rows):.0f} s of its {sum(BUDGETS.values())} s of row budgets",
             "", "| measure | value | unit | batch/GPU | bf16 | channels_last | compile | host syncs/step | notes | s |",
             "|---|---:|---|---:|---|---|---|---:|---|---:|"]
    for r in rows:
        value = f"{r.value:.4g}" if r.value is not None else ("error" if r.error else "—")
        note = f"error: {r.error}" if r.error else r.note
        secs = f"{r.seconds:.0f}" if r.seconds is not None else "not run"
        syncs = f"{r.syncs_per_step:.3g}" if r.syncs_per_step is not None else "—"
        batch = str(r.batch_per_gpu) if r.batch_per_gpu is not None else "—"
        lines.append(f"| {r.label} | {value} | {r.unit} | {batch} | {flag(r.bf16)} | {flag(r.channels_last)} | "
                     f"{flag(r.compile)} | {syncs} | {note.replace('|', '/')} | {secs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the same code on the CPU at tiny sizes, in seconds")
    ap.add_argument("--out", help="also write the figures as JSON here")
    ap.add_argument("--rows", default=",".join(GROUPS), help=f"row groups to run, of {','.join(GROUPS)}")
    ap.add_argument("--inception", help="NVIDIA's inception-2015-12-05.pt (else $ORBITGEN_INCEPTION_WEIGHTS)")
    ap.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, over the built-in table")
    ap.add_argument("--sg-batch", type=int, help="StyleGAN2 batch on the one GPU (default: the spec's batch per GPU)")
    ap.add_argument("--diff-batch", type=int, help="diffusion batch on the one GPU (default: the spec's batch per GPU)")
    ap.add_argument("--set", action="append", default=[], help="extra spec override for every row, KEY=VALUE")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(no_cuda_line(), file=sys.stderr)
        return 2
    groups = [g for g in args.rows.split(",") if g]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        ap.error(f"unknown rows {unknown}; allowed: {', '.join(GROUPS)}")
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    rows: list[Row] = []
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        check = Check(args, Path(tmp))
        env = environment(check)
        if env["setup_seconds"] is not None:
            print(f"[gpu_check] set-up (infra/setup.sh): {env['setup_seconds']:.0f} s, outside the check's "
                  f"{os.environ.get('GPU_CHECK_LIMIT', '?')} s limit", file=sys.stderr, flush=True)
        print(f"[gpu_check] {env['card']} · driver {env['driver']} · torch {env['torch']} · CUDA {env['cuda']} · "
              f"peak {env['peak_tflops'] or 'unknown'} TFLOP/s bf16", file=sys.stderr, flush=True)
        if check.device.type == "cuda":
            torch.cuda.set_device(check.device)
        try:
            if "stylegan2_zero1" in groups:
                one_process_group(check.device)
            for group in groups:
                rows += run_group(check, group)
        except KeyboardInterrupt:   # gpu_check.sh's overall limit: keep what was measured
            interrupted = True
            done = {r.key for r in rows}
            why = "interrupted or not run: the check's overall limit (GPU_CHECK_LIMIT)"
            rows += [Row(row_key(g, s), label, unit, error=why)
                     for g in groups for s, (label, unit) in GROUPS[g][0].items() if row_key(g, s) not in done]
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    print(table(env, rows), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({**env, "interrupted": interrupted,
                                              "rows": [r.__dict__ for r in rows]}, indent=2))
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
