"""Each family's training step on the `meta` device: a tensor made on the CPU inside the step
(`torch.randn(n)` without `device=`, `torch.tensor(...)`) then meets the networks' meta tensors
and fails loudly, as it would fail, or copy, on a GPU. Meta tensors carry shapes only, so the
whole step (every phase's loss and backward, R1 and path length included) runs in milliseconds.

What cannot run on meta, and is left out here (covered on the CPU elsewhere):
- `after_step` (EMA, ADA's controller, the vision-aided stages): between steps, not in the step;
  ADA's p and the EMA stay on the device (tests/unit/models/test_ada_on_device.py, test_ema_foreach.py).
- The load checks of frozen networks (diffusion's ControlNet base, sat2ground stage 2's generator):
  they read a flag buffer once per run (`bool(...)`), which meta tensors cannot answer; the test
  marks them done.
- SCB-GAN's vision-aided heads: the backbones need weight files (tests/families/test_models_stylegan2.py);
  the tiny spec trains plain StyleGAN2-ADA, with ADA's pipeline switched on here.
- MineAug (kornia) and the engines (DDP / DeepSpeed): kornia copies its draws out of the tensors,
  and the engines need real storage; neither is family step code.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # tests/: the shared tiny-spec helpers
from family_checks import paired_batch  # noqa: E402
from tiny_specs import specs_using, tiny_spec  # noqa: E402

from models.family import Family, StepContext  # noqa: E402
from models.registry import available_families  # noqa: E402

META = torch.device("meta")
LOAD_CHECKS = ("_base_checked", "_generator_checked")   # see the module docstring


def one_spec_per_family() -> list:
    return [pytest.param(f, specs_using(f)[0], id=f) for f in available_families() if specs_using(f)]


def run_step_on_meta(family: Family, nets: dict[str, nn.Module], batch: dict[str, torch.Tensor], step: int) -> None:
    """Every phase's loss and backward, as the loop runs them (only the phase's network trainable)."""
    for phase in family.phases():
        for name, net in nets.items():
            net.requires_grad_(name == phase.name and not name.endswith("ema"))
        ctx = StepContext(networks=nets, trained=nets, phase=phase.name, step=step, device=META)
        loss, logs = family.loss(batch, ctx)
        assert loss.device == META, f"phase {phase.name}: loss on {loss.device}"
        for k, v in logs.items():
            assert not torch.is_tensor(v) or v.device == META, f"phase {phase.name}: {k} on {v.device}"
        loss.backward()


@pytest.mark.parametrize("family_name, spec_name", one_spec_per_family())
def test_the_training_step_runs_on_the_meta_device(family_name, spec_name, tmp_path):
    spec = tiny_spec(spec_name, tmp_path)
    family = spec.make_family()
    for flag in LOAD_CHECKS:
        if hasattr(family, flag):
            setattr(family, flag, True)
    if getattr(family, "ada", None) is not None:
        family.ada.set_p(0.5)   # the pipeline runs (at p = 0 it is skipped)
    torch.manual_seed(0)
    nets = {k: v.to(META) for k, v in family.build().items()}
    batch = {k: v.to(META) for k, v in paired_batch(family).items()}
    for step in (0, 1):   # step 0 takes every lazy regulariser (R1, path length), step 1 none
        run_step_on_meta(family, nets, batch, step)


def test_a_tensor_made_on_the_cpu_in_the_step_fails_on_meta():
    """The check can fail: a step that forgets `device=` breaks here."""
    net = nn.Linear(4, 1).to(META)
    x = torch.zeros(2, 4, device=META)
    with pytest.raises((RuntimeError, NotImplementedError)):
        (net(x) + torch.randn(2, 1)).sum().backward()
