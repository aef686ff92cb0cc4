"""The inference snapshot: everything needed to rebuild a family's sampler, and nothing else.

It is what a checkpoint hands the registry and what the registered MLflow model loads; it
depends on `models/` only, so a served model needs no Ray, MLflow server or training code.

A snapshot names its family; loading one imports nothing it names: the family must be one that
discovery found (models/registry.py `loadable_family_cls`), else the file is refused
(`UntrustedFileError`) before any module is imported.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from models.family import Family
from models.registry import available_families, family_ref, loadable_family_cls, make_family
from models.safe_load import UntrustedFileError, load_weights_only

SNAPSHOT = "generator.pt"   # its file name in a training checkpoint's folder


def save_snapshot(path: str | Path, family: Family, sampler: nn.Module, extra: dict[str, Any] | None = None) -> None:
    torch.save({
        "format": "orbitgen-snapshot-v1",
        "family": family_ref(type(family)),
        "config": family.config.model_dump(),
        "resolution": family.resolution,
        "channels": family.channels,
        "lr": family.lr,
        "state_dict": {k: v.detach().cpu() for k, v in sampler.state_dict().items()},
        "extra": extra or {},
    }, path)


def load_snapshot(path: str | Path, device: str | torch.device = "cpu", *,
                  trusted_packages: Iterable[str] = ()) -> tuple[Family, nn.Module, dict[str, Any]]:
    """The family, its sampler (on `device`, in eval mode) and the extra info of a snapshot.
    `trusted_packages`: top-level packages whose code ships with the snapshot (a registered
    model's code paths); a family from one of them may be imported, no other module."""
    snap = load_weights_only(path)
    if snap.get("format") != "orbitgen-snapshot-v1":
        raise ValueError(f"{path} is not an orbitgen snapshot")
    ref = snap.get("family")
    if not isinstance(ref, str) or loadable_family_cls(ref, trusted_packages) is None:
        raise UntrustedFileError(
            f"{path}: refused to load: it names the family {ref!r}, which is not one this installation discovered "
            f"({', '.join(available_families())}; a lab's own family is installed through the orbitgen.families "
            "entry point). Loading imports nothing a file names: was the snapshot replaced in storage?")
    family = make_family(snap["family"], snap["config"], resolution=snap["resolution"], channels=snap["channels"],
                         lr=snap["lr"])
    sampler = family.build()[family.sampler_role]
    sampler.load_state_dict(snap["state_dict"])
    return family, sampler.to(device).eval(), snap["extra"]


def load_reference(path: str | Path, *, family: Family, field: str, wanted: str, fits: Callable[[Family], bool],
                   keys: tuple[str, ...], label: str) -> nn.Module:
    """The sampler of the snapshot that `model.<field>` names (a frozen stage-1 generator, a
    ControlNet's base), checked to be `wanted` (`fits`) and to share the config `keys`, the
    resolution and the channels with `family`; the errors name the field."""
    ref, sampler, _ = load_snapshot(path)
    if ref.name != family.name or not fits(ref):
        raise ValueError(f"model.{field}: {path} holds a {ref.name} model that is not {wanted}")
    ours, theirs = ({k: getattr(f.config, k) for k in keys} | {"resolution": f.resolution, "channels": f.channels}
                    for f in (family, ref))
    if ours != theirs:
        diff = ", ".join(f"{k}: {label} {theirs[k]}, here {ours[k]}" for k in ours if ours[k] != theirs[k])
        raise ValueError(f"model.{field}: the {label} does not fit this spec ({diff})")
    return sampler
