"""Tiny runs of the ready specs: every test that trains a ready spec on a CPU builds it here.

The model's size is the family's own data (`Family.tiny`, `--set`-style keys); the run's size
(steps, batch, samples, a small built-in data set) is the same for every family (`RUN`). A spec
whose model freezes another spec's registered model (`model.*_from: models:/NAME@champion`:
sat2ground's stage 2, the ControlNet) gets a tiny snapshot of that spec's model instead, made
here (`tiny_spec`), so that it runs without a tracking store.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pytest
import torch
import yaml

from data_shards.builtin import builtin_for_keys
from jobs.spec import JobSpec, load_spec, ready_specs
from models.family import Family
from models.registry import get_family_cls
from models.snapshot import save_snapshot

# The size of a tiny run, whatever the family.
RUN: dict[str, Any] = {"train.steps": 2, "train.batch": 4, "train.precision": "fp32", "scaling.use_gpu": False,
                       "eval.num_samples": 8}
DATA_COUNT = 32   # with the ready specs' data.holdout of 0.1, every built-in set holds out >= 2


def raw_spec(name: str) -> dict[str, Any]:
    return yaml.safe_load(ready_specs()[name].read_text())


def specs_using(family: str) -> list[str]:
    """The ready specs whose `family:` is `family`."""
    return [name for name in ready_specs() if raw_spec(name)["family"] == family]


def as_sets(overrides: Mapping[str, Any]) -> list[str]:
    """`--set` arguments (values as YAML: JSON is YAML)."""
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


def tiny_of(family: str | type[Family]) -> dict[str, Any]:
    """The family's tiny configuration; a family without one fails the calling test."""
    cls = get_family_cls(family) if isinstance(family, str) else family
    if not cls.tiny:
        pytest.fail(f"the family {cls.name!r} ({cls.__module__}.{cls.__qualname__}) declares no tiny configuration: "
                    "declare it as the class attribute `tiny`, the `--set` overrides of its smallest model "
                    'that trains on a CPU in seconds, e.g. tiny = {"data.resolution": 16, "model.width": 8} '
                    "(see models/family.py)", pytrace=False)
    return dict(cls.tiny)


def tiny_model(family: str | type[Family]) -> dict[str, Any]:
    """The `model:` section of the family's tiny configuration (for building it without a spec)."""
    return {k.removeprefix("model."): v for k, v in tiny_of(family).items() if k.startswith("model.")}


def tiny_data(spec: JobSpec) -> str:
    """A small built-in set for the spec: its own built-in set with DATA_COUNT samples, else one
    with the keys its family trains on."""
    train = spec.data.train
    if train.startswith("builtin:"):
        name = train.removeprefix("builtin:").split("?")[0]
    else:
        name = builtin_for_keys(spec.make_family().data_keys)
    return f"builtin:{name}?count={DATA_COUNT}&seed=0"


def tiny_sets(name: str, *extra: str) -> list[str]:
    """The `--set` overrides of the ready spec `name` at its family's tiny size (then `extra`)."""
    sets = [*as_sets(tiny_of(raw_spec(name)["family"])), *as_sets(RUN)]
    return [*sets, f"data.train={tiny_data(load_spec(ready_specs()[name], sets))}", *extra]


def references(name: str) -> dict[str, str]:
    """The model fields of spec `name` that name another ready spec's registered model
    (`model.generator_from: models:/sat2ground-stage1@champion`) -> that spec."""
    by_model = {raw_spec(n).get("tracking", {}).get("registry_model"): n for n in ready_specs()}
    out = {}
    for key, value in (raw_spec(name).get("model") or {}).items():
        if key.endswith("_from") and isinstance(value, str) and value.startswith("models:/"):
            model = value.removeprefix("models:/").split("@")[0].split("/")[0]
            if model not in by_model:
                raise KeyError(f"{name}: model.{key} names {value}, which no ready spec registers")
            out[key] = by_model[model]
    return out


def perturb_(net: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """A stand-in for a trained network: small random changes to every weight (DDPM starts its
    output convs at zero, which would make its output and its gradients upstream vanish)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.is_floating_point():
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return net


def reference_path(name: str, workdir: Path) -> Path:
    return Path(workdir) / f"{name}.tiny.pt"


def reference_snapshot(name: str, workdir: Path) -> Path:
    """A snapshot of the tiny model of ready spec `name` (with perturbed weights), as its
    registered champion would be; written once per workdir."""
    path = reference_path(name, workdir)
    if not path.exists():
        spec = tiny_spec(name, workdir)
        family = spec.make_family()
        torch.manual_seed(0)
        sampler = perturb_(family.build()[family.sampler_role])
        save_snapshot(path, family, sampler)
    return path


def tiny_spec(name: str, workdir: Path, *extra: str) -> JobSpec:
    """Ready spec `name` at its family's tiny size; the models it freezes (`models:/...` in
    `model.*_from`) replaced by tiny snapshots under `workdir`."""
    setup = [f"model.{key}={reference_snapshot(ref, workdir)}" for key, ref in references(name).items()]
    return load_spec(ready_specs()[name], tiny_sets(name, *setup, *extra))
