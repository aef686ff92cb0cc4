"""`Family.sample_seeds`, checked for every discovered family × every ready spec that uses it, at the
family's tiny size (tests/tiny_specs.py): one image per seed, image i the image
`sample(sampler, 1, seed=seeds[i], cond=cond[i:i+1], ...)` draws alone, within float tolerance.

- What the family draws (each image's noise from its own seed, in `sample`'s order; the inputs'
  rows) is checked within 1e-5 through a sampler that runs its batch row by row (`RowByRow`): one
  call of it computes what `sample(1, seed)` computes for each image (bit for bit on a CPU).
- The batch is drawn in one go: the sampler network runs as often for three seeds as for one (once
  for a GAN, once per DDIM step for diffusion). The default in `models/family.py` (one call an
  image) fails this; it is checked on its own for its exact images and its refusals.
- With the real, batched network the images match within 1e-5, except diffusion's: its first DDIM
  step (t = T-1, ᾱ ≈ 2.4e-9 on the cosine schedule) divides the network's rounding (~1e-6 between
  a batched and a single forward) by √ᾱ before x̂_0 is clipped, so a few pixels move by up to a
  uint8 level; their mean difference stays under 1e-5.
- Image order follows the seeds where the family uses them (swapping two seeds swaps their images),
  else the input rows.
- Diffusion with DDIM eta > 0 draws fresh noise at each step: each image's from its own seed.
- `models generate` (`jobs.generate.sample_images`) calls a DCGAN's generator once for a batch.

The expected images always come from `sample`, never from `sample_seeds`.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from torch import nn

from family_checks import paired_batch
from models.family import Family
from models.registry import available_families
from tiny_specs import perturb_, specs_using, tiny_spec

SEEDS = [3, 7, 11]
TOL = {"atol": 1e-5, "rtol": 1e-5}
# Diffusion with noise at every DDIM step: the tiny 2-step schedule adds it at the first step.
NOISY_STEPS = ("model.ddim_eta=0.5",)


def cases() -> list:
    out = [pytest.param(spec, (), id=f"{family}:{spec}")
           for family in available_families() for spec in specs_using(family)]
    out += [pytest.param(spec, NOISY_STEPS, id=f"diffusion:{spec}:eta0.5")
            for spec in ("diffusion_uncond",)]
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Shared by the cases: the tiny snapshots that stage 2 and the ControlNet freeze are made once."""
    return tmp_path_factory.mktemp("sample-seeds")


_BUILT: dict[tuple[str, tuple[str, ...]], tuple[Family, nn.Module]] = {}


def tiny_family(spec_name: str, extra: tuple[str, ...], workdir: Path) -> tuple[Family, nn.Module]:
    """The family of the tiny spec and its sampler, perturbed; built once per case (sampling does not
    change either: the tests run it in eval mode under no_grad)."""
    key = (spec_name, extra)
    if key not in _BUILT:
        family = tiny_spec(spec_name, workdir, *extra).make_family()
        torch.manual_seed(0)
        _BUILT[key] = family, perturb_(family.build()[family.sampler_role])
    return _BUILT[key]


def inputs_for(family: Family, n: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """cond (and mask), n distinct rows, for a conditional family; nothing for the others."""
    if not family.conditional:
        return {}
    batch = paired_batch(family, n=n, seed=seed)
    return {k: batch[k] for k in ("cond", "mask") if k in batch}


def rows(inputs: dict[str, torch.Tensor], index: list[int]) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in inputs.items()}


def one_at_a_time(family: Family, sampler: nn.Module, seeds: list[int], inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([family.sample(sampler, 1, seed=s, **rows(inputs, [i])) for i, s in enumerate(seeds)])


class RowByRow(nn.Module):
    """The sampler, called on each row of its batch alone: its output for a batch is exactly what it
    gives each image by itself, so no batched float sum can hide a wrong noise or a wrong order."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        n = args[0].shape[0]

        def row(value, i):
            return value[i:i + 1] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n else value

        return torch.cat([self.inner(*(row(a, i) for a in args), **{k: row(v, i) for k, v in kwargs.items()})
                          for i in range(n)])


@contextmanager
def counting_calls(net: nn.Module) -> Iterator[list[int]]:
    """Counts the forward calls of `net` (the outer module: one per batch it is handed)."""
    calls = [0]
    handle = net.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.parametrize("spec_name, extra", cases())
def test_each_image_is_the_one_its_seed_draws_alone(spec_name, extra, workdir):
    family, sampler = tiny_family(spec_name, extra, workdir)
    inputs = inputs_for(family, len(SEEDS))
    drawn = family.sample_seeds(RowByRow(sampler), SEEDS, **inputs)
    assert drawn.shape == (len(SEEDS), family.channels, family.resolution, family.resolution)
    assert drawn.dtype == torch.float32
    torch.testing.assert_close(drawn, one_at_a_time(family, sampler, SEEDS, inputs), **TOL)


@pytest.mark.parametrize("spec_name, extra", cases())
def test_the_batch_is_one_draw_with_the_images_of_one_at_a_time(spec_name, extra, workdir):
    family, sampler = tiny_family(spec_name, extra, workdir)
    inputs = inputs_for(family, len(SEEDS))
    with counting_calls(sampler) as single:
        family.sample_seeds(sampler, SEEDS[:1], **rows(inputs, [0]))
    with counting_calls(sampler) as batched_calls:
        batched = family.sample_seeds(sampler, SEEDS, **inputs)
    assert batched_calls[0] == single[0], (f"{family.name}: {batched_calls[0]} sampler calls for {len(SEEDS)} "
                                           f"seeds, {single[0]} for one: the batch is not drawn in one go")
    expected = one_at_a_time(family, sampler, SEEDS, inputs)
    if family.name != "diffusion":
        torch.testing.assert_close(batched, expected, **TOL)
        return
    difference = (batched - expected).abs()   # see the module docstring
    assert float(difference.mean()) < 1e-5 and float(difference.max()) < 2 / 255


@pytest.mark.parametrize("spec_name, extra", cases())
def test_image_order_follows_the_seeds_or_else_the_inputs(spec_name, extra, workdir):
    family, sampler = tiny_family(spec_name, extra, workdir)
    inputs = inputs_for(family, len(SEEDS))
    same_row = rows(inputs, [0, 0, 0])
    takes_seed = not torch.allclose(family.sample(sampler, 1, seed=SEEDS[0], **rows(inputs, [0])),
                                    family.sample(sampler, 1, seed=SEEDS[1], **rows(inputs, [0])), atol=1e-4)
    assert takes_seed == (family.name == "diffusion" or not family.conditional)
    if takes_seed:   # the same input for every image: only the seeds tell them apart
        drawn = family.sample_seeds(sampler, SEEDS, **same_row)
        swapped = family.sample_seeds(sampler, [SEEDS[1], SEEDS[0], SEEDS[2]], **same_row)
    else:
        drawn = family.sample_seeds(sampler, SEEDS, **inputs)
        swapped = family.sample_seeds(sampler, SEEDS, **rows(inputs, [1, 0, 2]))
    assert not torch.allclose(drawn[0], drawn[1], atol=1e-3)
    torch.testing.assert_close(swapped, drawn[[1, 0, 2]], **TOL)


def test_eta_draws_step_noise_from_each_seed(workdir):
    """With eta > 0 the images differ from eta 0's for the same start noise: the per-seed step noise
    the first test checks is really drawn."""
    quiet, sampler = tiny_family("diffusion_uncond", (), workdir)
    noisy, _ = tiny_family("diffusion_uncond", NOISY_STEPS, workdir)
    assert not torch.allclose(quiet.sample_seeds(sampler, SEEDS), noisy.sample_seeds(sampler, SEEDS), atol=1e-3)


def test_the_default_draws_one_image_a_call_with_the_images_of_sample(workdir):
    family, sampler = tiny_family("spatiotemporal_cgan", (), workdir)
    inputs = inputs_for(family, len(SEEDS))
    with counting_calls(sampler) as calls:
        drawn = Family.sample_seeds(family, sampler, SEEDS, **inputs)
    assert calls[0] == len(SEEDS)
    torch.testing.assert_close(drawn, one_at_a_time(family, sampler, SEEDS, inputs), atol=0, rtol=0)
    with pytest.raises(ValueError, match="3 seeds but 2 cond images"):
        Family.sample_seeds(family, sampler, SEEDS, **rows(inputs, [0, 1]))
    with pytest.raises(ValueError, match="at least one seed"):
        Family.sample_seeds(family, sampler, [], **rows(inputs, []))


def test_generate_calls_a_dcgan_generator_once_for_a_batch(workdir):
    from jobs.generate import sample_images

    family, sampler = tiny_family("dcgan_rsicb", (), workdir)
    seeds = [40, 41, 42, 43, 44]
    with counting_calls(sampler) as calls:
        images = sample_images(family, sampler, seeds)
    assert calls[0] == 1
    torch.testing.assert_close(images, one_at_a_time(family, sampler, seeds, {}), **TOL)
