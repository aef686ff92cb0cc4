"""SCB-GAN's vision-aided heads start with fresh optimizer state when their stage adds them to D.

Heads of backbones not yet added sit in D's Adam with zero gradients. Without a restart, Adam's
step count runs on while its second moment stays 0, so the bias correction is spent: with
β = (0, 0.99), the first real update of a head is lr·|g|/√((1 − 0.99)·g² / (1 − 0.99^(t+1))),
up to 10·lr. With fresh state it is lr·sign(g): every element moves by lr or not at all. Checked
through the real loop (`jobs.train.loop.run_steps`: the family asks, the engine restarts), under the
DDP engine and DeepSpeed ZeRO 0/1/2, uninterrupted and across a checkpoint taken right after the
stage began.
"""
from __future__ import annotations

import json

import pytest
import torch

from family_checks import CPU, smooth_batch
from jobs.train import checkpoints
from jobs.train.loop import build_training, run_steps
from data_shards.builtin import ensure_builtin
from models.nets.vision_backbones import save_random_backbone
from tiny_specs import tiny_spec

KINDS = ["clip_vitb32", "vgg16"]
BATCH, IDLE_STEPS = 4, 6            # the first stage starts after 6 steps of 4 images
STRATEGIES = {
    "ddp": ["strategy.kind=ddp"],
    **{f"zero{z}": pytest.param(["strategy.kind=deepspeed", f"strategy.zero_stage={z}"],
                                marks=pytest.mark.integration) for z in (0, 1, 2)},
}


def scbgan_spec(tmp_path, strategy: list[str]):
    weights = {k: str(save_random_backbone(k, tmp_path / f"{k}.pt", size="tiny", seed=i)) for i, k in enumerate(KINDS)}
    kimg = IDLE_STEPS * BATCH / 1000
    vision = {"candidates": KINDS, "weights": weights, "size": "tiny", "warmup_kimg": kimg,
              "kimg_stages": [kimg, kimg], "probe_images": 8}
    return tiny_spec("scbgan_rosetta", tmp_path, f"model.vision_aided={json.dumps(vision)}",
                     f"train.batch={BATCH}", f"train.steps={IDLE_STEPS + 2}", "augment.ada=null",
                     "augment.mineaug=[]", "scaling.num_workers=1", *strategy)


def batches():
    step = 0
    while True:
        step += 1
        yield {"image": smooth_batch(BATCH, 1, 16, seed=step)}


def heads(networks, kind: str) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in networks["D"].heads.parameters_of(kind)])


def first_active_update(spec, data_url, tmp_path, *, resume: bool) -> float:
    """max |Δ| / lr of the first stage's heads over the first step after the stage began."""
    training = build_training(spec, CPU, 1)
    family, networks, phases, engines = training
    loop = run_steps(spec, family, phases, engines, networks, batches(), start=0, device=CPU, data_url=data_url)
    for step, _ in loop:
        if family.active:
            break
    assert step == IDLE_STEPS and len(family.active) == 1
    kind = family.active[0]
    if resume:   # a new process's training, everything from the checkpoint written at this step
        checkpoints.write(tmp_path / "ckpt", rank=0, engines=engines, networks=networks, family=family,
                          step=step, images_seen=step * BATCH)
        family, networks, phases, engines = build_training(spec, CPU, 1)
        checkpoints.read(tmp_path / "ckpt", engines=engines, networks=networks, family=family)
        assert family.active == [kind]
        gen = batches()
        for _ in range(step):
            next(gen)
        loop = run_steps(spec, family, phases, engines, networks, gen, start=step, device=CPU, data_url=data_url)
    before = heads(networks, kind)
    next(loop)
    lr = phases[0].lr
    return float((heads(networks, kind) - before).abs().max() / lr)


@pytest.mark.parametrize("strategy", STRATEGIES.values(), ids=STRATEGIES.keys())
@pytest.mark.parametrize("resume", [False, True], ids=["uninterrupted", "resumed"])
def test_a_heads_first_update_is_the_learning_rate(strategy, resume, tmp_path, process_group):
    spec = scbgan_spec(tmp_path, strategy)
    data_url = ensure_builtin("builtin:craters?count=16&seed=0", str(tmp_path / "data"), 16, 1)
    ratio = first_active_update(spec, data_url, tmp_path, resume=resume)
    # Fresh Adam with β1 = 0: lr·g/(|g| + ε) ≤ lr. Spent bias correction: √(1 − 0.99^7)/0.1 ≈ 2.6 here.
    assert 0.99 < ratio < 1.001   # float32 rounding of p ± lr


def test_heads_are_groups_of_their_own_and_only_a_whole_group_restarts(tmp_path):
    spec = scbgan_spec(tmp_path, STRATEGIES["ddp"])
    family, networks, phases, engines = build_training(spec, CPU, 1)
    d = engines["D"]
    assert [len(g) for g in d.groups][1:] == [len(list(networks["D"].heads.parameters_of(k))) for k in KINDS]
    with pytest.raises(ValueError, match="not one optimizer group"):
        d.restart_state(list(networks["D"].heads.parameters_of(KINDS[0]))[:1])
