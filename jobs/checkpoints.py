"""What a Ray Train checkpoint holds: the full training state and the inference snapshot.

    engines/           every engine's weights, optimizer and LR-schedule state, in the engine's
                       own format (DDP: engines/<name>.pt; DeepSpeed: engines/<name>/ with the
                       ZeRO partition of every rank)
    training_state.pt  step, image counter, networks without an engine (EMA copies, frozen
                       networks), the family's own state (e.g. ADA's p)
    generator.pt       the inference snapshot (models/snapshot.py): what the registry gets
    progress.json      step, images seen and the MLflow run id, readable without torch

Every rank calls `write` into its own local folder; Ray Train merges the folders of all ranks
into one checkpoint in storage, and hands the whole of it to every rank on restart.

No RNG state and no stream state is saved: the loop reseeds from (seed, rank, step) at every
step and reopens the data stream at batch `step`, so a resumed run draws the same noise and the
same batches as an uninterrupted one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from models.family import Family
from models.safe_load import load_weights_only
from models.snapshot import save_snapshot

ENGINES = "engines"
TRAINING_STATE = "training_state.pt"
SNAPSHOT = "generator.pt"
PROGRESS = "progress.json"


def write(directory: Path, *, rank: int, engines: Mapping, networks: Mapping[str, nn.Module], family: Family,
          step: int, images_seen: int, extra: dict[str, Any] | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for engine in engines.values():   # collective for DeepSpeed: every rank writes its partition
        engine.save(directory / ENGINES, rank)
    if rank != 0:
        return
    progress = {"step": step, "images_seen": images_seen, **(extra or {})}
    torch.save({"step": step, "images_seen": images_seen, "family": family.state_dict(),
                "networks": {name: net.state_dict() for name, net in networks.items() if name not in engines}},
               directory / TRAINING_STATE)
    save_snapshot(directory / SNAPSHOT, family, networks[family.sampler_role], extra=progress)
    (directory / PROGRESS).write_text(json.dumps(progress))


def read(directory: Path, *, engines: Mapping, networks: Mapping[str, nn.Module], family: Family) -> dict[str, Any]:
    """Restores everything `write` saved into the live objects; returns step and images seen."""
    state = load_weights_only(directory / TRAINING_STATE)
    for engine in engines.values():
        engine.load(directory / ENGINES)
    for name, weights in state["networks"].items():
        networks[name].load_state_dict(weights)
    if state["family"]:
        family.load_state_dict(state["family"])
    return {"step": state["step"], "images_seen": state["images_seen"]}


def progress(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / PROGRESS).read_text())
