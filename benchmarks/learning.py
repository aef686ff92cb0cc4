"""Does every family learn? Each ready spec, shrunk to a CPU budget, trained on its built-in set:
the untrained model's metrics against the trained one's, and the trained samples beside reals.

Per spec: the family's tiny model (`Family.tiny`, the `--set` keys of each spec's header check)
unless `SIZES` names a larger one, a built-in set (the spec's own; specs whose data is not built
in get one with the same keys), one process, no Ray: the worker's own code
(`jobs.train.loop.build_training`, `training_batches`, `run_steps`) for at most `--steps` steps or
`--minutes` minutes, then the evaluation the worker runs at a checkpoint (`jobs.eval.core`, through
`jobs.eval.learning`) on the untrained and the trained model, same extractor and seeds.
Writes `OUT/<spec>.png` (reals left, samples right; conditional families: input, output, target
strips) and prints a markdown table. The goal (issue 12): trained FID ≤ 0.5× untrained.

Specs that freeze another spec's registered model (`model.*_from: models:/NAME@champion`) get the
snapshot of that spec trained earlier in the same run (it is added to the run if not asked for).
Their "untrained" model holds that trained part, so they also get a from-scratch baseline: the
same spec built on the frozen spec's untrained snapshot (the whole pipeline before any training).
The SCB-GAN specs run as plain StyleGAN2-ADA (`model.vision_aided=null`: the vision-aided heads
need backbone weight files that are not on this machine).

    .venv/bin/python benchmarks/learning.py                      # every ready spec
    .venv/bin/python benchmarks/learning.py --specs quickstart dcgan_rsicb --minutes 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_shards.builtin import builtin_for_keys  # noqa: E402
from jobs.eval.learning import reals_beside_samples, save_png, scores  # noqa: E402
from jobs.inputs import resolve_data  # noqa: E402
from jobs.spec import JobSpec, load_spec, ready_specs  # noqa: E402
from jobs.train.loop import GRID_SEED, build_training, run_steps, training_batches  # noqa: E402
from models.registry import get_family_cls  # noqa: E402
from models.snapshot import save_snapshot  # noqa: E402

CPU = torch.device("cpu")
# The run's size, whatever the family (the model's size is the family's).
RUN: dict[str, Any] = {"train.batch": 16, "train.precision": "fp32", "train.grad_accum": 1, "train.log_every": 50,
                       "scaling.num_workers": 1, "scaling.use_gpu": False, "strategy.kind": "ddp",
                       "eval.num_samples": 256}
DATA_COUNT = 512
# Specs that already fit a CPU (the quickstart): their own model and run, on one worker.
AS_IS = {"quickstart"}
# Larger than the family's tiny model where tiny does not learn visibly in a few CPU minutes
# (measured: see BENCHMARKS.md, "Learning"). Stage 2 and the ControlNet must match the model they freeze.
# Tiny's G (two layers at 16²) and a 32-wide one at 16² both collapsed to flat grey: one more layer.
_SAT2GROUND = {"data.resolution": 32, "model.nz": 32, "model.ngf": 32, "model.ndf": 32}
_DIFFUSION = {"model.base_channels": 16, "model.sample_steps": 25}   # tiny's 2 DDIM steps sample noise
SIZES: dict[str, dict[str, Any]] = {
    "sat2ground_stage1": _SAT2GROUND, "sat2ground_stage2": _SAT2GROUND,
    "diffusion_uncond": _DIFFUSION, "spatiotemporal_diffusion": _DIFFUSION,
    # ControlNet's 1e-5 is meant for 100k+ steps: in a few thousand its zero convs barely open.
    "spatiotemporal_controlnet": {**_DIFFUSION, "train.lr": 1e-4},
}


def raw(name: str) -> dict[str, Any]:
    return yaml.safe_load(ready_specs()[name].read_text())


def sets(overrides: dict[str, Any]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def references(name: str) -> dict[str, str]:
    """model.*_from fields naming another ready spec's registered model -> that spec."""
    by_model = {raw(n).get("tracking", {}).get("registry_model"): n for n in ready_specs()}
    out = {}
    for key, value in (raw(name).get("model") or {}).items():
        if key.endswith("_from") and isinstance(value, str) and value.startswith("models:/"):
            out[key] = by_model[value.removeprefix("models:/").split("@")[0].split("/")[0]]
    return out


def in_order(names: list[str]) -> list[str]:
    """`names` with the specs they freeze added, each after what it freezes."""
    out: list[str] = []

    def visit(n: str) -> None:
        for ref in references(n).values():
            visit(ref)
        if n not in out:
            out.append(n)
    for n in names:
        visit(n)
    return out


def builtin_data(spec: JobSpec) -> str:
    train = spec.data.train
    name = (train.removeprefix("builtin:").split("?")[0] if train.startswith("builtin:")
            else builtin_for_keys(spec.make_family().data_keys))
    return f"builtin:{name}?count={DATA_COUNT}&seed=0"


def shrunk(name: str, workdir: Path, steps: int, snapshots: dict[str, Path]) -> JobSpec:
    """Spec `name` at the benchmark's size, trained for `steps` steps (AS_IS specs: their own)."""
    if name in AS_IS:   # its own model, data, batch and steps, on one worker
        return load_spec(ready_specs()[name], ["scaling.num_workers=1", f"workdir={workdir}"])
    model = {**get_family_cls(raw(name)["family"]).tiny, **SIZES.get(name, {})}
    overrides = [*sets(model), *sets(RUN), f"train.steps={steps}", f"workdir={workdir}",
                 *[f"model.{key}={snapshots[ref]}" for key, ref in references(name).items()]]
    spec = load_spec(ready_specs()[name], overrides)
    return load_spec(ready_specs()[name], [*overrides, f"data.train={builtin_data(spec)}"])


def train_one(name: str, spec: JobSpec, minutes: float, out: Path,
              from_scratch: JobSpec | None = None) -> dict[str, Any]:
    data_url = resolve_data(spec)
    family, networks, phases, engines = build_training(spec, CPU, 1)
    sampler = networks[family.sampler_role]
    before = scores(spec, family, sampler, data_url, CPU)
    untrained = spec.workdir_path() / f"{name}-untrained.pt"
    save_snapshot(untrained, family, sampler)
    scratch = None
    if from_scratch is not None:
        f0, nets0, _, _ = build_training(from_scratch, CPU, 1)
        scratch = scores(from_scratch, f0, nets0[f0.sampler_role], data_url, CPU)
    batches = training_batches(spec, data_url, family, 0, 1, CPU, start_batch=0)
    t0, done, last = time.perf_counter(), 0, {}
    for done, values in run_steps(spec, family, phases, engines, networks, batches, start=0, device=CPU):
        if done % spec.train.log_every == 0:
            last = {k: round(float(v), 3) for k, v in values.items()}
            print(f"  {name} step {done}: {last}", file=sys.stderr, flush=True)
        if time.perf_counter() - t0 > 60 * minutes:
            break
    seconds = time.perf_counter() - t0
    after = scores(spec, family, sampler, data_url, CPU)
    picture = save_png(reals_beside_samples(family, sampler, data_url, seed=GRID_SEED, device=CPU), out / f"{name}.png")
    snapshot = spec.workdir_path() / f"{name}.pt"
    save_snapshot(snapshot, family, sampler)
    return {"spec": name, "family": family.name, "steps": done, "seconds": seconds, "before": before,
            "after": after, "picture": picture, "snapshot": snapshot, "untrained": untrained,
            "from_scratch": scratch, "resolution": spec.data.resolution, "batch": spec.train.batch}


def row(r: dict[str, Any]) -> str:
    b, a = r["before"], r["after"]
    ratio = a["fid"] / b["fid"] if b.get("fid") else float("nan")
    others = ", ".join(f"{k} {b[k]:.3g} → {a[k]:.3g}" for k in a if k != "fid")
    s = r["from_scratch"]
    scratch = f"{s['fid']:.4f} ({a['fid'] / s['fid']:.3f})" if s else "–"
    return (f"| {r['spec']} | {r['family']} | {r['resolution']}² × {r['batch']} | {r['steps']} | {b['fid']:.4f} | "
            f"{a['fid']:.4f} | {ratio:.3f} | {scratch} | {others or '–'} | {r['seconds']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--specs", nargs="*", default=None, help="ready spec names (default: all)")
    ap.add_argument("--steps", type=int, default=2000, help="at most this many steps per spec")
    ap.add_argument("--minutes", type=float, default=3.0, help="at most this much training time per spec")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "learning", help="where the PNGs go")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/orbitgen-learning"), help="shards, snapshots")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    names = in_order(args.specs or list(ready_specs()))
    snapshots: dict[str, Path] = {}
    untrained: dict[str, Path] = {}
    rows = []
    for name in names:
        spec = shrunk(name, args.workdir.absolute(), args.steps, snapshots)
        print(f"{name}: {spec.family}, {spec.data.resolution}², batch {spec.train.batch}, data {spec.data.train}",
              file=sys.stderr, flush=True)
        scratch = shrunk(name, args.workdir.absolute(), args.steps, untrained) if references(name) else None
        result = train_one(name, spec, args.minutes, args.out, from_scratch=scratch)
        snapshots[name], untrained[name] = result["snapshot"], result["untrained"]
        rows.append(result)
        print(row(result), file=sys.stderr, flush=True)
    print("| spec | family | size × batch | steps | untrained FID | trained FID | trained / untrained | "
          "from scratch FID (trained / it) | other metrics (untrained → trained) | train s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        print(row(r))
    print()
    for r in rows:   # links as BENCHMARKS.md (in benchmarks/) resolves them
        print(f"![{r['spec']}: reals left, samples right]({os.path.relpath(r['picture'], REPO / 'benchmarks')})")


if __name__ == "__main__":
    main()
