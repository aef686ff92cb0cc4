"""DCGAN's step makes one fake per micro-batch: phase G makes it with its graph, phase D learns from
exactly that image, detached (models/families/dcgan.py), run through the real loop's `train_step`."""
from __future__ import annotations

import pytest
import torch

from jobs.spec import SPECS_DIR, load_spec
from jobs.train.loop import build_training, train_step
from models.family import StepContext

CPU = torch.device("cpu")
TINY = ["data.resolution=16", "model.nz=8", "model.ngf=8", "model.ndf=8", "model.r1_gamma=0", "scaling.num_workers=1",
        "train.batch=8", "train.grad_accum=2"]


def tiny_training():
    spec = load_spec(SPECS_DIR / "quickstart.yaml", TINY)
    return spec, *build_training(spec, CPU, 1)


def batch(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 1, 16, 16, generator=g) * 2 - 1}


class Calls:
    """Forward hooks on G and D: G's outputs, and D's inputs in the phase that trains D."""

    def __init__(self, networks):
        self.g_out: list[torch.Tensor] = []
        self.d_in: list[torch.Tensor] = []
        networks["G"].register_forward_hook(lambda m, args, out: self.g_out.append(out))
        networks["D"].register_forward_hook(self._d)

    def _d(self, module, args, out):
        if any(p.requires_grad for p in module.parameters()):   # phase D: only D is trainable
            self.d_in.append(args[0])


def test_phases_run_g_first():
    _, family, _, phases, _ = tiny_training()
    assert [ph.name for ph in phases] == ["G", "D"] == [ph.name for ph in family.phases()]


def test_one_generator_forward_per_micro_batch_and_d_learns_from_it():
    spec, family, networks, phases, engines = tiny_training()
    calls = Calls(networks)
    for step in range(2):
        calls.g_out.clear()
        calls.d_in.clear()
        train_step(family, phases, engines, networks, batch(seed=step), step=step, device=CPU,
                   grad_accum=spec.train.grad_accum)
        assert len(calls.g_out) == spec.train.grad_accum   # one G forward per micro-batch, none in phase D
        # Phase D: real then fake per micro-batch; the fake is G's output of this step, without a graph.
        fakes = calls.d_in[1::2]
        assert len(fakes) == len(calls.g_out)
        for fake, made in zip(fakes, calls.g_out):
            assert made.requires_grad and not fake.requires_grad and fake.grad_fn is None
            assert torch.equal(fake, made.detach())


def test_phase_d_without_this_steps_phase_g_fails_clearly():
    _, family, networks, _, _ = tiny_training()
    real = batch(4)

    def ctx(phase: str, step: int) -> StepContext:
        return StepContext(networks=networks, trained=networks, phase=phase, step=step, device=CPU)

    with pytest.raises(RuntimeError, match="phase 'D' of step 0 found no fake of this step's phase 'G'"):
        family.loss(real, ctx("D", 0))
    family.loss(real, ctx("G", 0))
    family.loss(real, ctx("D", 0))
    with pytest.raises(RuntimeError, match="found no fake"):   # each fake serves one D micro-batch
        family.loss(real, ctx("D", 0))
    family.loss(real, ctx("G", 0))
    with pytest.raises(RuntimeError, match="phase 'D' of step 1"):   # a fake of step 0 is not step 1's
        family.loss(real, ctx("D", 1))
    family.loss(real, ctx("G", 2))
    with pytest.raises(RuntimeError, match="micro-batch of 2 but phase 'G' made 4"):
        family.loss(batch(2), ctx("D", 2))


def test_lazy_r1_matches_finite_differences():
    """Phase D adds r1_gamma / 2 · r1_every · mean_i ‖∂ΣD/∂x_i‖² on its R1 steps, nothing on the
    others; the gradient is checked against central differences of D in float64."""
    gamma, every = 0.5, 2
    spec = load_spec(SPECS_DIR / "quickstart.yaml", ["data.resolution=8", "model.nz=4", "model.ngf=2", "model.ndf=2",
                                                      f"model.r1_gamma={gamma}", f"model.r1_every={every}",
                                                      "scaling.num_workers=1", "train.batch=4"])
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        family = spec.make_family()
        networks = {role: net.double() for role, net in family.build().items()}
        real = torch.rand(4, 1, 8, 8) * 2 - 1
        d = networks["D"]

        def fd_penalty() -> float:
            flat, eps, grad = real.clone().reshape(-1), 1e-6, torch.zeros(real.numel())
            with torch.no_grad():
                for i in range(flat.numel()):
                    up, down = flat.clone(), flat.clone()
                    up[i] += eps
                    down[i] -= eps
                    grad[i] = (d(up.view_as(real)).sum() - d(down.view_as(real)).sum()) / (2 * eps)
            return grad.view(4, -1).square().sum(1).mean().item()

        for step, r1_step in ((0, True), (1, False)):
            ctx = {ph: StepContext(networks=networks, trained=networks, phase=ph, step=step, device=CPU)
                   for ph in ("G", "D")}
            family.loss({"image": real}, ctx["G"])
            loss, logs = family.loss({"image": real}, ctx["D"])
            if r1_step:
                expected = fd_penalty()
                assert logs["r1"].item() == pytest.approx(expected, rel=1e-5)
                assert (loss - logs["loss_D"]).item() == pytest.approx(gamma / 2 * every * expected, rel=1e-5)
            else:
                assert "r1" not in logs and loss.item() == logs["loss_D"].item()
    finally:
        torch.set_default_dtype(old)
