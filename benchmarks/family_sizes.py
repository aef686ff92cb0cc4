"""Parameter counts and CPU step time of the ready specs at their published sizes.

    .venv/bin/python benchmarks/family_sizes.py [--specs scbgan_rosetta,diffusion_uncond] [--steps 3]

For each spec: the networks the family builds (trainable / frozen parameters), then `--steps`
training steps (every phase, single process, plain torch Adam per phase, the spec's per-worker
batch and precision fp32) on a fixed random batch; step 0 includes the lazy regularisers where a
family has them (StyleGAN2's R1 and path length), so it is reported apart from the median of the
rest. SCB-GAN runs with its three vision-aided backbones added (CLIP ViT-B/32, DINO ViT-B/16,
Swin-T at published size, randomly initialised and written to temporary files in the published
layouts: the speed is that of the real networks). Not a test: nothing here asserts.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from jobs.spec import SPECS_DIR, load_spec  # noqa: E402
from models.family import StepContext  # noqa: E402
from models.snapshot import save_snapshot  # noqa: E402
from models.nets.vision_backbones import save_random_backbone  # noqa: E402

SPECS = ("scbgan_rosetta", "diffusion_uncond", "spatiotemporal_diffusion", "spatiotemporal_controlnet")
VISION = ("clip_vitb32", "dino_vitb16", "swin_t")


def overrides(name: str, tmp: Path) -> list[str]:
    sets = ["train.precision=fp32", "scaling.use_gpu=false"]
    if name.startswith("scbgan"):
        for kind in VISION:
            sets.append(f"model.vision_aided.weights.{kind}={save_random_backbone(kind, tmp / f'{kind}.pt', size='base')}")
        sets += [f"model.vision_aided.candidates=[{','.join(VISION)}]"]
    if name == "spatiotemporal_controlnet":
        base = load_spec(SPECS_DIR / "diffusion_uncond.yaml").make_family()
        net = base.build()["ema"]
        with torch.no_grad():   # a trained base: DDPM's zero-initialised output layers would pass no gradient
            for p in net.parameters():
                p.add_(0.01 * torch.randn_like(p))
        save_snapshot(tmp / "base.pt", base, net)
        sets.append(f"model.base_from={tmp / 'base.pt'}")
    return sets


def measure(name: str, steps: int, tmp: Path) -> dict:
    spec = load_spec(SPECS_DIR / f"{name}.yaml", overrides(name, tmp))
    family = spec.make_family()
    torch.manual_seed(0)
    nets = family.build()
    phases = family.phases()
    counts = {n: (sum(p.numel() for p in m.parameters() if p.requires_grad),
                  sum(p.numel() for p in m.parameters() if not p.requires_grad)) for n, m in nets.items()}
    if name.startswith("scbgan"):
        family.active = list(VISION)   # all three stages' backbones in the loss
    opts = {ph.name: torch.optim.Adam([p for p in nets[ph.name].parameters() if p.requires_grad], lr=ph.lr,
                                      betas=ph.betas) for ph in phases}
    n, r = spec.per_worker_batch, spec.data.resolution
    shapes = {"image": spec.data.channels, "cond": spec.data.channels, "mask": 1}
    batch = {k: torch.rand(n, shapes[k], r, r) * 2 - 1 for k in family.data_keys}
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        for ph in phases:
            for other, net in nets.items():
                if other in opts:
                    for p in opts[other].param_groups[0]["params"]:
                        p.requires_grad_(other == ph.name)
            loss, _ = family.loss(batch, StepContext(networks=nets, trained=nets, phase=ph.name, step=i,
                                                     device=torch.device("cpu")))
            opts[ph.name].zero_grad(set_to_none=True)
            loss.backward()
            opts[ph.name].step()
        times.append(time.perf_counter() - t0)
    return {"spec": name, "resolution": r, "batch": n, "channels": spec.data.channels, "counts": counts,
            "first": times[0], "rest": statistics.median(times[1:]) if len(times) > 1 else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--specs", default=",".join(SPECS))
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    print(f"### {date.today()} · {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}\n")
    print("| spec | size (per-worker batch) | networks: trainable (+frozen) parameters | step 0 | later steps |")
    print("|---|---|---|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.specs.split(","):
            m = measure(name, args.steps, Path(tmp))
            nets = " · ".join(f"{k} {t:,}" + (f" (+{f:,})" if f else "") for k, (t, f) in m["counts"].items())
            print(f"| {name} | {m['resolution']}² × {m['channels']}ch ({m['batch']}) | {nets} | "
                  f"{m['first']:.2f} s | {m['rest']:.2f} s |", flush=True)


if __name__ == "__main__":
    main()
