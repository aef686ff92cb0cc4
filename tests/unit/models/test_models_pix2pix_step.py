"""pix2pix's step as the train loop runs it: one generator forward per micro-batch, the D phase
learning from exactly the fakes (dropout included) that the G phase made, and a resume that
continues exactly (the fakes live inside a step only)."""
from __future__ import annotations

import pytest
import torch

from jobs.train import checkpoints
from jobs.spec import JobSpec, parse_spec
from jobs.train.loop import build_training, train_step
from family_checks import paired_batch

CPU = torch.device("cpu")
BATCH, ACCUM = 4, 2


def make_spec(family: str = "pix2pix") -> JobSpec:
    data = "builtin:timeseries" if family.startswith("cgan") else "builtin:maps"
    text = (f"name: t\nfamily: {family}\ndata: {{train: '{data}', resolution: 16}}\n"
            "model: {ngf: 8, ndf: 8, d_layers: 2}\n"
            f"train: {{batch: {BATCH}, steps: 4, grad_accum: {ACCUM}}}\n")
    return parse_spec(text, ["scaling.num_workers=1"])


def fresh_training(spec: JobSpec):
    """(family, networks, phases, engines) as a worker builds them."""
    return build_training(spec, CPU, 1)


def batch_of(family, seed: int) -> dict[str, torch.Tensor]:
    return paired_batch(family, n=BATCH, seed=seed)


def run_step(training, batch, step: int) -> dict[str, torch.Tensor]:
    family, networks, phases, engines = training
    torch.manual_seed(1000 + step)   # the loop seeds every step (dropout draws from it)
    return train_step(family, phases, engines, networks, batch, step=step, device=CPU, grad_accum=ACCUM)


@pytest.mark.parametrize("family", ["pix2pix", "cgan_unet"])
def test_one_generator_forward_per_micro_batch(family):
    training = fresh_training(make_spec(family))
    calls = []
    training[1]["G"].register_forward_hook(lambda *_: calls.append(1))
    for step in range(2):
        calls.clear()
        run_step(training, batch_of(training[0], seed=step), step)
        assert len(calls) == ACCUM, f"step {step}: {len(calls)} generator forwards for {ACCUM} micro-batches"


def test_d_phase_learns_from_the_g_phases_own_fakes():
    """Same values, dropout noise included: the fake D judges is the one G's loss was computed on."""
    training = fresh_training(make_spec())
    family, networks = training[0], training[1]
    assert family.config.dropout > 0   # otherwise a second forward would give the same values
    made, judged = [], []

    def record_fake(module, inputs, output):
        if next(module.parameters()).requires_grad:   # the G phase: G is the trained network
            made.append(output.detach().clone())

    def record_pair(module, inputs, output):
        if next(module.parameters()).requires_grad:   # the D phase: D is the trained network
            judged.append(inputs[0].detach().clone())

    networks["G"].register_forward_hook(record_fake)
    networks["D"].register_forward_hook(record_pair)
    batch = batch_of(family, seed=0)
    run_step(training, batch, step=0)
    assert len(made) == ACCUM and len(judged) == 2 * ACCUM   # per micro-batch: the real pair, then the fake pair
    for i, micro in enumerate(zip(batch["cond"].chunk(ACCUM), batch["image"].chunk(ACCUM))):
        cond, real = micro
        real_pair, fake_pair = judged[2 * i], judged[2 * i + 1]
        assert torch.equal(real_pair, torch.cat([cond, real], 1))
        assert torch.equal(fake_pair, torch.cat([cond, made[i]], 1)), f"micro-batch {i}: D judged another fake"


def test_d_phase_without_this_steps_g_phase_fails_clearly():
    family, networks, phases, engines = fresh_training(make_spec())
    assert [ph.name for ph in phases] == ["G", "D"]
    with pytest.raises(RuntimeError, match=r"phase 'D' of step 0 found no fake of this step's phase 'G'"):
        train_step(family, phases[::-1], engines, networks, batch_of(family, 0), step=0, device=CPU,
                   grad_accum=ACCUM)
    # A D phase that follows the G phase of an earlier step is refused too: its fakes are stale.
    family, networks, phases, engines = fresh_training(make_spec())
    train_step(family, phases[:1], engines, networks, batch_of(family, 0), step=0, device=CPU, grad_accum=ACCUM)
    with pytest.raises(RuntimeError, match="of step 1"):
        train_step(family, phases[1:], engines, networks, batch_of(family, 1), step=1, device=CPU,
                   grad_accum=ACCUM)


def test_resume_continues_exactly(tmp_path):
    spec = make_spec()
    batches = [batch_of(fresh_training(spec)[0], seed=s) for s in range(3)]
    straight = fresh_training(spec)
    for step, batch in enumerate(batches):
        run_step(straight, batch, step)

    first = fresh_training(spec)
    run_step(first, batches[0], 0)
    family, networks, _, engines = first
    checkpoints.write(tmp_path, rank=0, engines=engines, networks=networks, family=family, step=1, images_seen=BATCH)
    resumed = fresh_training(spec)
    family, networks, _, engines = resumed
    assert checkpoints.read(tmp_path, engines=engines, networks=networks, family=family)["step"] == 1
    for step in (1, 2):
        run_step(resumed, batches[step], step)
    for role in ("G", "D"):
        for (name, a), b in zip(straight[1][role].state_dict().items(), resumed[1][role].state_dict().values()):
            assert torch.equal(a, b), f"{role}.{name}"
