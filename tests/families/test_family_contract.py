"""The family contract, checked for every discovered family × every ready spec that uses it, at
the family's tiny size (`Family.tiny`; see tests/tiny_specs.py): the spec builds the family
(through `JobSpec.make_family`, i.e. `models.registry.make_family`), every phase trains only its
own network, a step trains under DDP and (marked integration: DeepSpeed's start costs seconds)
under DeepSpeed with the real loop (`jobs.train.loop.build_training` / `run_steps`, one process),
sampling is deterministic in the seed, the inference snapshot round-trips without the files the
spec named, and the registered model samples through `mlflow.pyfunc`.

A family without a `tiny` configuration, or without a ready spec, fails here. The family files'
own tests (test_models_*.py) check what is particular to each system."""
from __future__ import annotations

import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from family_checks import CPU, check_gradient_isolation, has_grads, paired_batch
from jobs.spec import JobSpec, SpecError, parse_spec
from jobs.tracking.pyfunc import input_columns
from jobs.tracking.registry import log_generator
from jobs.tracking.runs import ensure_experiment
from jobs.train.loop import build_training, run_steps
from models.family import Family, StepContext
from models.images import nchw_to_nhwc_numpy, to_float, to_uint8
from models.png import encode_png
from models.registry import available_families, get_family_cls
from models.snapshot import load_snapshot, save_snapshot
from tiny_specs import perturb_, ready_specs, reference_path, references, specs_using, tiny_of, tiny_spec


def cases() -> list:
    out = []
    for family in available_families():
        out += [pytest.param(family, spec, id=f"{family}:{spec}") for spec in specs_using(family)] or \
               [pytest.param(family, None, id=f"{family}:no-spec")]
    return out


CASES = cases()


class Spy(nn.Module):
    """Stands in for an engine-wrapped network: counts its calls."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


class Tiny:
    """One case: the tiny spec, its family, and the files its set-up wrote (references it freezes)."""

    def __init__(self, family: str, spec_name: str | None, workdir: Path):
        tiny_of(family)   # fails the test with what to declare
        if spec_name is None:
            pytest.fail(f"no ready spec in jobs/specs/ uses the family {family!r}: a system is a family and a spec "
                        f"(ready specs: {', '.join(ready_specs())})", pytrace=False)
        self.spec_name, self.workdir = spec_name, workdir
        self.spec: JobSpec = tiny_spec(spec_name, workdir)
        self.family: Family = self.spec.make_family()
        assert type(self.family) is get_family_cls(family) and self.family.name == family

    def batch(self, n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
        return paired_batch(self.family, n=n, seed=seed)

    def inputs(self, n: int, seed: int = 1) -> dict[str, torch.Tensor]:
        """What `sample` takes besides the seed: cond (and mask) for conditional families."""
        if not self.family.conditional:
            return {}
        batch = self.batch(n, seed)
        return {k: batch[k] for k in ("cond", "mask") if k in batch}

    def drop_references(self) -> None:
        """Removes what the set-up wrote (a frozen stage-1 generator, a ControlNet's base): a snapshot
        or a registered model must not need them."""
        for ref in references(self.spec_name).values():
            reference_path(ref, self.workdir).unlink()


def parametrize_cases(fn):
    return pytest.mark.parametrize("family, spec_name", CASES)(fn)


# --------------------------------------------------------------------------- declared, built
def test_a_family_without_tiny_fails_with_what_to_declare():
    class Untiny(Family):
        name = "untiny"

    with pytest.raises(pytest.fail.Exception, match=r"'untiny' .* declares no tiny configuration: declare it"):
        tiny_of(Untiny)


def test_a_family_that_leaves_out_part_of_the_contract_is_refused_by_name(tmp_path, monkeypatch):
    (tmp_path / "lab_families.py").write_text(
        "from models.family import Family\n"
        "class NoSampler(Family):\n"
        "    name = 'nosampler'\n"
        "    def build(self): return {}\n"
        "    def phases(self): return []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SpecError) as err:
        parse_spec("name: lab\nfamily: lab_families:NoSampler\ndata: {train: builtin:craters}\n"
                   "train: {steps: 1}\n")
    assert "family" in str(err.value) and "does not define loss, sample" in str(err.value)


@parametrize_cases
def test_builds_from_its_spec(family, spec_name, tmp_path):
    tiny = Tiny(family, spec_name, tmp_path)
    fam, spec = tiny.family, tiny.spec
    assert (fam.resolution, fam.channels, fam.lr) == (spec.data.resolution, spec.data.channels, spec.train.lr)
    assert spec.eval.metrics == list(fam.metrics)
    nets = fam.build()
    phases = fam.phases()
    assert phases and {ph.name for ph in phases} <= set(nets) and fam.sampler_role in nets
    assert set(fam.data_keys) <= {"image", "cond", "mask", "cls"} and "image" in fam.data_keys
    assert fam.conditional == ("cond" in fam.data_keys)


# --------------------------------------------------------------------------- phases
@parametrize_cases
def test_each_phase_trains_its_own_network_only(family, spec_name, tmp_path):
    """As the engines run it (the other networks frozen, the trained one wrapped): a phase calls
    no other phase's wrapped network, and its loss reaches its own network only."""
    tiny = Tiny(family, spec_name, tmp_path)
    fam = tiny.family
    batch = tiny.batch()
    for phase in fam.phases():
        torch.manual_seed(0)
        nets = fam.build()
        trained = {ph.name: Spy(nets[ph.name]) for ph in fam.phases()}
        for name, net in nets.items():
            net.requires_grad_(name == phase.name)
        ctx = StepContext(networks=nets, trained=trained, phase=phase.name, step=0, device=CPU,
                          generator=torch.Generator().manual_seed(0))
        loss, values = fam.loss(batch, ctx)
        assert loss.ndim == 0 and torch.isfinite(loss), (phase.name, loss)
        assert all(not torch.is_tensor(v) or not v.requires_grad for v in values.values()), phase.name
        assert {n: s.calls for n, s in trained.items() if n != phase.name and s.calls} == {}, \
            f"phase {phase.name} called another phase's engine-wrapped network (use ctx.net(role))"
        loss.backward()
        assert any(has_grads(nets[phase.name])), f"phase {phase.name}: no gradient reached {phase.name}"
        others = {n: sum(p.grad is not None for p in net.parameters()) for n, net in nets.items() if n != phase.name}
        assert not any(others.values()), f"phase {phase.name} left gradients on {others}"
    if sorted(ph.name for ph in fam.phases()) == ["D", "G"]:   # a GAN, either order
        check_gradient_isolation(fam, batch)


# --------------------------------------------------------------------------- sampling, snapshot
@parametrize_cases
def test_samples_deterministically_in_the_seed(family, spec_name, tmp_path):
    tiny = Tiny(family, spec_name, tmp_path)
    fam = tiny.family
    torch.manual_seed(0)
    sampler = perturb_(fam.build()[fam.sampler_role]).train()
    inputs = tiny.inputs(3)
    torch.manual_seed(123)
    a = fam.sample(sampler, 3, seed=7, **inputs)
    torch.manual_seed(456)   # the global RNG plays no part
    b = fam.sample(sampler, 3, seed=7, **inputs)
    assert a.shape == (3, fam.channels, fam.resolution, fam.resolution) and a.dtype == torch.float32
    # Not checked: the range. The contract says [-1, 1]; StyleGAN2's output is not clamped (uint8 conversion clamps).
    assert torch.equal(a, b) and bool(torch.isfinite(a).all())
    assert sampler.training, "sample() must restore the network's mode"
    if not fam.conditional:
        assert not torch.equal(a, fam.sample(sampler, 3, seed=8))


@parametrize_cases
def test_snapshot_round_trips_without_the_spec_files(family, spec_name, tmp_path):
    tiny = Tiny(family, spec_name, tmp_path)
    fam = tiny.family
    torch.manual_seed(0)
    sampler = perturb_(fam.build()[fam.sampler_role])
    inputs = tiny.inputs(2)
    expected = fam.sample(sampler, 2, seed=3, **inputs)
    save_snapshot(tiny.workdir / "g.pt", fam, sampler)
    tiny.drop_references()
    loaded, net, _ = load_snapshot(tiny.workdir / "g.pt")
    assert type(loaded) is type(fam) and loaded.config == fam.config
    assert (loaded.resolution, loaded.channels, loaded.sampler_role) == (fam.resolution, fam.channels, fam.sampler_role)
    assert torch.equal(loaded.sample(net, 2, seed=3, **inputs), expected)


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    """One local sqlite store for the module's registered models."""
    store = tmp_path_factory.mktemp("contract-mlflow")
    mlflow.set_experiment(experiment_id=ensure_experiment(f"sqlite:///{store / 'mlflow.db'}", "family-contract",
                                                          store / "artifacts"))
    yield store
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def pngs(images: torch.Tensor) -> list[bytes]:
    return [encode_png(a) for a in nchw_to_nhwc_numpy(to_uint8(images))]


@parametrize_cases
def test_registered_model_samples_through_the_pyfunc(family, spec_name, tmp_path, tracking):
    tiny = Tiny(family, spec_name, tmp_path)
    fam, spec = tiny.family, tiny.spec
    torch.manual_seed(0)
    sampler = perturb_(fam.build()[fam.sampler_role])
    save_snapshot(tiny.workdir / "g.pt", fam, sampler)
    (tiny.workdir / "spec.yaml").write_text(spec.to_yaml())
    tiny.drop_references()   # the registered model must not need them
    name = f"contract-{tiny.spec_name}"
    with mlflow.start_run():
        assert log_generator(tiny.workdir / "g.pt", tiny.workdir / "spec.yaml", name) == "1"
    model = mlflow.pyfunc.load_model(f"models:/{name}/1")
    assert model.metadata.get_input_schema().input_names() == list(input_columns(fam))
    r, c = fam.resolution, fam.channels
    if not fam.conditional:
        out = model.predict(pd.DataFrame({"seed": [4, 5, 4]}))
        assert out.shape == (3, r, r, c) and out.dtype == np.uint8
        assert np.array_equal(out[0], out[2]) and not np.array_equal(out[0], out[1])
        assert np.array_equal(out[:1], nchw_to_nhwc_numpy(to_uint8(fam.sample(sampler, 1, seed=4))))
        return
    inputs = {k: to_float(to_uint8(v)) for k, v in tiny.inputs(3).items()}   # what survives PNG
    frame = pd.DataFrame({k: pngs(inputs[k]) for k in input_columns(fam)})
    out = model.predict(frame)
    assert out.shape == (3, r, r, c) and out.dtype == np.uint8 and not np.array_equal(out[0], out[1])
    assert np.array_equal(out, nchw_to_nhwc_numpy(to_uint8(fam.sample(sampler, 3, **inputs))))
    with pytest.raises(Exception, match="cond"):
        model.predict(pd.DataFrame({"seed": [0]}))


# --------------------------------------------------------------------------- a step under each engine
def fake_batches(spec: JobSpec, keys: tuple[str, ...]):
    """Endless batches of the spec's shape (the loop's input: uint8-range data already in [-1, 1])."""
    g = torch.Generator().manual_seed(0)
    n, r = spec.per_worker_batch, spec.data.resolution
    while True:
        yield {k: torch.rand(n, 1 if k == "mask" else spec.data.channels, r, r, generator=g) * 2 - 1
               for k in keys if k != "cls"}


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in module.parameters()])


def trains_steps(spec: JobSpec) -> None:
    """The real loop (build_training, run_steps: every phase, then after_step) for the spec's steps."""
    family, networks, phases, engines = build_training(spec, CPU, 1)
    before = {name: flat(e.module) for name, e in engines.items()}
    done = list(run_steps(spec, family, phases, engines, networks, fake_batches(spec, family.data_keys),
                          start=0, device=CPU))
    assert [step for step, _ in done] == list(range(1, spec.total_steps + 1))
    for step, values in done:
        bad = {k: float(v) for k, v in values.items() if not np.isfinite(float(v))}
        assert values and not bad, f"step {step}: {bad or 'no values'}"
    assert {name: not torch.equal(before[name], flat(e.module)) for name, e in engines.items()} \
        == {name: True for name in engines}, "a phase's optimizer step left its network unchanged"
    assert all(p.requires_grad for e in engines.values() for p in e.params), "engines must end trainable"


@parametrize_cases
def test_trains_under_ddp(family, spec_name, tmp_path):
    tiny = Tiny(family, spec_name, tmp_path)
    trains_steps(tiny_spec(tiny.spec_name, tiny.workdir, "strategy.kind=ddp", "scaling.num_workers=1",
                           "train.grad_accum=2", "train.grad_clip=1.0"))


@pytest.mark.integration
@parametrize_cases
def test_trains_under_deepspeed(family, spec_name, tmp_path, process_group):
    tiny = Tiny(family, spec_name, tmp_path)
    trains_steps(tiny_spec(tiny.spec_name, tiny.workdir, "strategy.kind=deepspeed", "strategy.zero_stage=2",
                           "train.precision=bf16", "scaling.num_workers=1"))


@pytest.mark.integration
def test_deepspeed_reduces_bf16_gradients_in_fp32_as_ddp(tmp_path, process_group):
    """DeepSpeed's torch_autocast marks Linear/Conv parameters for bf16 gradient communication by
    default; ours marks none, so gradients are reduced in fp32 under both strategies."""
    from deepspeed.runtime.torch_autocast import get_comm_dtype

    spec = tiny_spec("quickstart", tmp_path, "strategy.kind=deepspeed", "train.precision=bf16",
                     "scaling.num_workers=1")
    _, _, _, engines = build_training(spec, CPU, 1)
    dtypes = {get_comm_dtype(p) for e in engines.values() for p in e.module.parameters()}
    assert dtypes == {torch.float32}
