"""What a Ray Train checkpoint holds: the full training state and the inference snapshot.

    training_state.pt  every engine's weights and optimizer state, step, image counter
    generator.pt       the inference snapshot (models/snapshot.py): what the registry gets
    progress.json      step and images seen, readable without torch

No RNG state is saved: the loop reseeds from (seed, rank, step) at every step, so a resumed
run draws the same noise as an uninterrupted one.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from models.family import Family
from models.snapshot import save_snapshot

TRAINING_STATE = "training_state.pt"
SNAPSHOT = "generator.pt"
PROGRESS = "progress.json"


def write(directory: Path, *, engines: dict, family: Family, step: int, images_seen: int,
          extra: dict[str, Any] | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"engines": {name: e.state_dict() for name, e in engines.items()}, "step": step,
                "images_seen": images_seen}, directory / TRAINING_STATE)
    save_snapshot(directory / SNAPSHOT, family, engines[family.sampler_role].module,
                  extra={"step": step, "images_seen": images_seen, **(extra or {})})
    (directory / PROGRESS).write_text(json.dumps({"step": step, "images_seen": images_seen, **(extra or {})}))


def read(directory: Path, engines: dict) -> dict[str, Any]:
    state = torch.load(directory / TRAINING_STATE, map_location="cpu", weights_only=False)
    for name, engine in engines.items():
        engine.load_state_dict(state["engines"][name])
    return state
