"""The GPU check (issue 12): one command that measures what one GPU does with orbitgen, in one table.

    bash benchmarks/gpu_check.sh [--out FILE.json] [--inception PATH] [--rows a,b] [--smoke]

Rows, each through the code a training run uses (`jobs.spec.load_spec` with `--set` overrides,
`spec.make_family()`, `jobs.train.loop.build_training` / `run_steps` / `training_batches`, the engines
of `jobs.train.engines`), one process, world size 1:
  * stylegan2_ddp, stylegan2_zero1: `scbgan_rosetta` at its paper256 size (256², 1 channel, ADA on,
    `model.vision_aided=null`), bf16, global batch `--sg-batch` on one GPU, under the DDP engine (at
    world size 1 the DDP wrapper is skipped, as in a one-worker run) and DeepSpeed ZeRO-1, on a
    fixed batch already on the device; s/kimg over whole 16-step windows (so R1, every 16 steps,
    and path length, every 4, weigh as in training), warm-up steps excluded. Anchors: StyleGAN2-ADA
    256² on one V100 21.6–24.2 s/kimg, on one A100 12.5.
  * diffusion_img_s, diffusion_tflops, diffusion_mfu: `diffusion_uncond` (DDPM's UNet, 64², bf16,
    batch `--diff-batch`), DDP engine, training images/s; model FLOPs of one step counted with
    torch.utils.flop_counter.FlopCounterMode (forward + backward; matmuls, convolutions, attention);
    MFU = achieved FLOP/s ÷ the card's dense bf16 peak (PEAK_TFLOPS by device name, `--peak-tflops`
    overrides; "unknown card" otherwise).
  * data_img_s: the shard stream (`data_shards.stream` through `jobs.train.loop.training_batches`:
    DataLoader workers, decode, `DevicePrefetcher`, MineAug) of the StyleGAN2 row's spec over a
    built-in crater set written to a temp dir; images/s delivered on the device, nothing else running.
  * randconv_img_s, inception_img_s: the evaluation's feature extractors
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
import sys
import tempfile
import time
import traceback
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

from data_shards.builtin import ensure_builtin  # noqa: E402
from jobs.spec import SPECS_DIR, JobSpec, load_spec  # noqa: E402
from jobs.train.loop import build_training, run_steps, training_batches  # noqa: E402
from models.metrics.extractors import make_extractor  # noqa: E402
from models.registry import get_family_cls  # noqa: E402

# Dense bf16 tensor peak, TFLOP/s, by a piece of torch.cuda.get_device_name(); first match wins.
PEAK_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("A100", 312.0),
               ("V100", 125.0))   # V100: fp16 tensor peak (it has no bf16 units)
SG_ANCHOR = "StyleGAN2-ADA 256²: 21.6–24.2 on one V100, 12.5 on one A100"
MFU_GOAL = "goal ≥ 35% (issue 6)"
# Seconds each row group may take on a GPU (the whole check: 8 minutes) and in --smoke.
BUDGETS = {"stylegan2_ddp": 95, "stylegan2_zero1": 105, "diffusion": 90, "data": 60, "randconv": 25,
           "inception": 40}
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

    def spec(self, name: str, *sets: str) -> JobSpec:
        """Ready spec `name` with `sets`, at its family's tiny size in --smoke."""
        path = SPECS_DIR / f"{name}.yaml"
        common = [f"scaling.use_gpu={str(self.device.type == 'cuda').lower()}", "scaling.num_workers=1",
                  "train.steps=1000000", *sets]
        if self.smoke:
            tiny = get_family_cls(load_spec(path, common).family).tiny
            common += [f"{k}={json.dumps(v)}" for k, v in tiny.items()] + ["train.batch=4"]
        return load_spec(path, common + list(self.args.set))

    def sg_spec(self, *sets: str) -> JobSpec:
        return self.spec("scbgan_rosetta", "model.vision_aided=null", "data.resolution=256", "data.channels=1",
                         "train.precision=bf16", f"train.batch={self.args.sg_batch}", *sets)

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


def stylegan2(check: Check, strategy: list[str]) -> dict[str, tuple[float, str]]:
    spec = check.sg_spec(*strategy)
    n, seconds = check.measure(training_steps(check, spec), warmup=4, chunk=16, seconds=20)
    per_image = seconds / (n * spec.train.batch)
    return {"": (per_image * 1000, f"{1 / per_image:.1f} img/s · {spec.data.resolution}² × {spec.data.channels}ch, "
                                   f"batch {spec.train.batch}, {n} steps timed · {SG_ANCHOR}")}


def diffusion(check: Check) -> dict[str, tuple[float | None, str]]:
    from torch.utils.flop_counter import FlopCounterMode

    spec = check.spec("diffusion_uncond", "train.precision=bf16", f"train.batch={check.args.diff_batch}")
    one = training_steps(check, spec)
    if not check.smoke:
        one()   # first-use allocations and kernel choices, outside the count
    with FlopCounterMode(display=False) as counter:
        one()
    flops = counter.get_total_flops()
    n, seconds = check.measure(one, warmup=2, chunk=5, seconds=20)
    rate, achieved = n * spec.train.batch / seconds, flops * n / seconds
    size = f"{spec.data.resolution}² × {spec.data.channels}ch, batch {spec.train.batch}, {n} steps timed"
    peak, card = check.args.peak_tflops, device_name(check.device)
    if peak is None:
        peak = next((p for name, p in PEAK_TFLOPS if name in card), None)
    mfu = (achieved / (peak * 1e12) * 100, f"of {peak:g} TFLOP/s dense bf16 ({card}) · {MFU_GOAL}") if peak \
        else (None, f"unknown card: {card} (give --peak-tflops) · {MFU_GOAL}")
    return {"img_s": (rate, size),
            "tflops": (achieved / 1e12, f"{flops / 1e9 / spec.train.batch:.2f} GFLOP per image (fwd + bwd, "
                                        "FlopCounterMode)"),
            "mfu": mfu}


def data_stream(check: Check) -> dict[str, tuple[float, str]]:
    spec = check.sg_spec()
    count = 64 if check.smoke else 512
    url = ensure_builtin(f"builtin:craters?count={count}&seed=0", str(check.tmp / "data"),
                         spec.data.resolution, spec.data.channels)
    batches = training_batches(spec, url, spec.make_family(), rank=0, world=1, device=check.device, start_batch=0)
    n, seconds = check.measure(lambda: next(batches), warmup=2, chunk=8, seconds=15)
    batches = None   # drops the stream: its DataLoader workers stop
    return {"": (n * spec.per_worker_batch / seconds,
                 f"{spec.data.resolution}² × {spec.data.channels}ch, batch {spec.per_worker_batch}, "
                 f"{spec.data.loader_workers} DataLoader workers, MineAug {'+'.join(spec.augment.mineaug) or 'off'}, "
                 f"{count} images, {n} batches timed")}


def features(check: Check, name: str) -> dict[str, tuple[float | None, str]]:
    weights = None
    if name == "inception":
        weights = check.args.inception or os.environ.get("ORBITGEN_INCEPTION_WEIGHTS")
        if not weights and check.smoke:
            weights = stub_inception(check.tmp / "inception-stub.pt")
        if not weights:
            return {"": (None, "skipped: no weights (give --inception PATH or $ORBITGEN_INCEPTION_WEIGHTS)")}
    spec = check.sg_spec()
    extractor = make_extractor(name, weights).to(check.device)
    batch = 8 if check.smoke else 64
    images = torch.randint(0, 256, (batch, spec.data.channels, spec.data.resolution, spec.data.resolution),
                           dtype=torch.uint8, device=check.device)
    n, seconds = check.measure(lambda: extractor(images), warmup=2, chunk=5, seconds=5)
    stub = " (a stand-in TorchScript of Inception's interface: --smoke)" if check.smoke and not check.args.inception \
        and not os.environ.get("ORBITGEN_INCEPTION_WEIGHTS") and name == "inception" else ""
    return {"": (n * batch / seconds, f"uint8 {spec.data.resolution}² × {spec.data.channels}ch, batch {batch}{stub}")}


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
GROUPS: dict[str, tuple[dict[str, tuple[str, str]], Callable[[Check], dict]]] = {
    "stylegan2_ddp": ({"": ("StyleGAN2 paper256, bf16, DDP engine", "s/kimg")},
                      lambda c: stylegan2(c, ["strategy.kind=ddp"])),
    "stylegan2_zero1": ({"": ("StyleGAN2 paper256, bf16, DeepSpeed ZeRO-1", "s/kimg")},
                        lambda c: stylegan2(c, ["strategy.kind=deepspeed", "strategy.zero_stage=1"])),
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
            row.value, row.note = values[suffix]
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
            "deepspeed": ds, "python": platform.python_version(), "cpu_cores": os.cpu_count(), "smoke": check.smoke}


def one_process_group(device: torch.device) -> None:
    """World size 1 for DeepSpeed outside a launcher (ENVIRONMENT.md): its variables, then the group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(s.getsockname()[1]))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def table(env: dict[str, Any], rows: list[Row]) -> str:
    smoke = " · SMOKE (CPU, tiny sizes: not a measurement)" if env["smoke"] else ""
    lines = [f"GPU check · {env['date']} · {env['card']} · torch {env['torch']} · CUDA {env['cuda']} · "
             f"cuDNN {env['cudnn']} · DeepSpeed {env['deepspeed']} · Python {env['python']} · "
             f"{env['cpu_cores']} CPU cores{smoke}",
             "", "| measure | value | unit | notes | s |", "|---|---:|---|---|---:|"]
    for r in rows:
        value = f"{r.value:.4g}" if r.value is not None else ("error" if r.error else "—")
        note = f"error: {r.error}" if r.error else r.note
        secs = f"{r.seconds:.0f}" if r.seconds is not None else "not run"
        lines.append(f"| {r.label} | {value} | {r.unit} | {note.replace('|', '/')} | {secs} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the same code on the CPU at tiny sizes, in seconds")
    ap.add_argument("--out", help="also write the figures as JSON here")
    ap.add_argument("--rows", default=",".join(GROUPS), help=f"row groups to run, of {','.join(GROUPS)}")
    ap.add_argument("--inception", help="NVIDIA's inception-2015-12-05.pt (else $ORBITGEN_INCEPTION_WEIGHTS)")
    ap.add_argument("--peak-tflops", type=float, help="the card's dense bf16 peak, over the built-in table")
    ap.add_argument("--sg-batch", type=int, default=16, help="StyleGAN2 batch on the one GPU (StyleGAN2-ADA's "
                                                            "256² single-GPU default)")
    ap.add_argument("--diff-batch", type=int, default=128, help="diffusion batch (the spec's global batch)")
    ap.add_argument("--set", action="append", default=[], help="extra spec override for every row, KEY=VALUE")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sg_batch = args.diff_batch = 4
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
        print(f"[gpu_check] {env['card']} · torch {env['torch']} · CUDA {env['cuda']}", file=sys.stderr, flush=True)
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
