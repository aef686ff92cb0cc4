"""Short proxy trainings for the MineAug search's stage 2, on the real training loop.

`search` never imports `jobs` (docs/ARCHITECTURE.md): it receives the function made here. One call trains
the spec's family for `budget_steps` on one worker with the given MineAug augmentations, using the
same pieces as a Ray Train worker (`jobs.train.loop.build_training`, `training_batches`, `run_steps`)
without Ray Train's start-up cost, and scores the generator against the ORIGINAL images only
(`jobs.eval.core.evaluate` reads the un-augmented shards): scoring against the augmented set would
reward augmentations that leak into the generated images, the published code's flaw.
"""
from __future__ import annotations

import os
from dataclasses import replace
from typing import Any, Callable

import torch

from jobs.eval.core import EvalSettings, evaluate
from jobs.mineaug.trivial import TrivialAugmentBatches
from jobs.runtime.env import forwarded_env
from jobs.spec import JobSpec
from jobs.train.loop import build_training, run_steps, training_batches
from models.images import to_uint8

EVALUATIONS = 4          # FIDs reported per proxy training (ASHA decides on the earlier ones)
LEAK_SAMPLES_SEED = 7_000_000
# Samples the leak check compares (search.validate.leak_check). Above 256 because the check's margin
# is KID's own noise, which shrinks with the sample; 1024 costs a quarter of one proxy FID at the
# default 2,048 and fills KID's 1000-image subsets.
LEAK_SAMPLES = 1024


def proxy_spec(spec: JobSpec, augmentations: list[str], budget_steps: int, seed: int | None = None) -> JobSpec:
    """`spec` trained for `budget_steps` on one worker with `augmentations` as MineAug's list, and
    `seed` as train.seed (stage 2 pairs subsets with "none" at equal seeds)."""
    raw = spec.model_dump(mode="json")
    raw["augment"] = {**raw["augment"], "mineaug": list(augmentations)}
    raw["train"] = {**raw["train"], "steps": budget_steps, "kimg": None,
                    **({"seed": int(seed)} if seed is not None else {})}
    raw["scaling"] = {**raw["scaling"], "num_workers": 1}
    raw["strategy"] = {**raw["strategy"], "kind": "ddp"}   # one process: no DeepSpeed start-up per trial
    return JobSpec.model_validate(raw)


def eval_steps(budget_steps: int, evaluations: int = EVALUATIONS) -> list[int]:
    """Steps after which the proxy is scored: evenly spaced, the last one included."""
    every = max(1, budget_steps // evaluations)
    return sorted({*range(every, budget_steps + 1, every), budget_steps})


def make_proxy_train_fn(spec: JobSpec, data_url: str, num_samples: int | None = None,
                        say: Callable[[str], None] | None = None) -> Callable[..., dict[str, Any]]:
    """The `train_fn` of `search.run_search`: (augmentations, budget_steps, report, trial_dir, *, seed,
    policy) -> {"fid": final FID against the originals, "kid": final KID likewise, "samples": uint8 NCHW
    generated images for the leak check (up to LEAK_SAMPLES)}.
    policy "expand" is MineAug's expansion of `augmentations`; "trivial" draws one of them per image
    per draw (jobs/mineaug/trivial.py). FIDs use `search.validate.num_samples` generated images, by
    default eval.num_samples capped at 2,048 (the paper's specs evaluate 50,000: too many for a proxy)."""
    n_eval = num_samples or spec.search.validate_.proxy_samples(spec.eval.num_samples)
    # The trial runs in a Ray worker that may have started before the driver's S3 settings were
    # set (or on another node): they travel with the function, as they do with a training's workers.
    env = forwarded_env()

    def settings(s: JobSpec, family, final: bool) -> EvalSettings:
        # FID is the objective at every evaluation; KID, reported beside it, at the last one only
        # (it keeps every feature and costs its kernel matrices: not worth it at the halving rungs).
        return replace(EvalSettings.from_spec(s, family), num_samples=n_eval,
                       metrics=("fid", "kid") if final else ("fid",))

    def train(augmentations: list[str], budget_steps: int, report: Callable[[int, float], None],
              trial_dir: str, *, seed: int | None = None, policy: str = "expand") -> dict[str, Any]:
        os.environ.update(env)
        trivial = policy == "trivial"
        s = proxy_spec(spec, [] if trivial else augmentations, budget_steps, seed)
        device = torch.device("cuda" if s.scaling.use_gpu and torch.cuda.is_available() else "cpu")
        family, networks, phases, engines = build_training(s, device, world_size=1)
        batches = training_batches(s, data_url, family, rank=0, world=1, device=device, start_batch=0)
        if trivial:
            batches = TrivialAugmentBatches(batches, augmentations, s.data.channels)
        sampler = networks[family.sampler_role]
        checkpoints, fid, kid = set(eval_steps(budget_steps)), float("nan"), None
        for step, _ in run_steps(s, family, phases, engines, networks, batches, start=0, device=device,
                                 data_url=data_url):
            if step in checkpoints:
                scores, _ = evaluate(family, sampler, settings(s, family, step == budget_steps), data_url=data_url,
                                     device=device)
                fid, kid = scores["fid"], scores.get("kid", kid)
                report(step, fid)
                if say:
                    what = "trivial" if trivial else "+".join(augmentations) or "(none)"
                    say(f"proxy {what} · seed {s.train.seed} · step {step}/{budget_steps} · fid {fid:.3f}")
        samples = to_uint8(family.sample(sampler, min(n_eval, LEAK_SAMPLES), seed=LEAK_SAMPLES_SEED)).cpu()
        return {"fid": fid, "kid": kid, "samples": samples}

    return train
