"""What a Ray Train checkpoint holds: the full training state and the inference snapshot.

    engines/           every engine's weights, optimizer and LR-schedule state, in the engine's
                       own format (DDP: engines/<name>.pt; DeepSpeed: engines/<name>/ with the
                       ZeRO partition of every rank)
    training_state.pt  step, image counter, networks without an engine (EMA copies, frozen
                       networks), the family's own state (e.g. ADA's p)
    generator.pt       the inference snapshot (models/snapshot.py): what the registry gets
    progress.json      step, images seen and the MLflow run id, readable without torch
    complete-rank<r>.json  written last by every rank that wrote files: their sizes and sha256;
                       rank 0's also names the step and the ranks that wrote (DeepSpeed: all)

Every rank calls `write` into its own local folder; Ray Train merges the folders of all ranks
into one checkpoint in storage, and hands the whole of it to every rank on restart.

A copy to storage cut short (a worker killed mid-upload, a node lost) leaves a folder that looks
like a checkpoint; `verify` accepts only one whose markers are all there and vouch for every
file's size and content, and resume (jobs/train/resume.py) skips the others.

No RNG state and no stream state is saved: the loop reseeds from (seed, rank, step) at every
step and reopens the data stream at batch `step`, so a resumed run draws the same noise and the
same batches as an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import pyarrow.fs
import torch
import torch.distributed as dist
from torch import nn

from models.family import Family
from models.safe_load import load_weights_only
from models.snapshot import SNAPSHOT, save_snapshot

ENGINES = "engines"
TRAINING_STATE = "training_state.pt"
PROGRESS = "progress.json"
COMPLETE = "complete-rank{}.json"


class IncompleteCheckpoint(Exception):
    """A checkpoint folder whose files are not all there, or not as written."""


def write(directory: Path, *, rank: int, engines: Mapping, networks: Mapping[str, nn.Module], family: Family,
          step: int, images_seen: int, extra: dict[str, Any] | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for engine in engines.values():   # collective for DeepSpeed: every rank writes its partition
        engine.save(directory / ENGINES, rank)
    if rank == 0:
        progress = {"step": step, "images_seen": images_seen, **(extra or {})}
        torch.save({"step": step, "images_seen": images_seen, "family": family.state_dict(),
                    "networks": {name: net.state_dict() for name, net in networks.items() if name not in engines}},
                   directory / TRAINING_STATE)
        save_snapshot(directory / SNAPSHOT, family, networks[family.sampler_role], extra=progress)
        (directory / PROGRESS).write_text(json.dumps(progress))
    files = {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*")) if p.is_file()}
    writers = [r for r, wrote in enumerate(_gather(bool(files))) if wrote]
    if files:   # last: a checkpoint without its markers was cut short
        marker = {"files": {name: [p.stat().st_size, _sha256(p.open("rb"))] for name, p in files.items()}}
        if rank == 0:
            marker.update(step=step, writers=writers)
        done = directory / COMPLETE.format(rank)
        partial = done.with_name(f".{done.name}.partial")   # renamed whole into place: never half a marker
        partial.write_text(json.dumps(marker))
        partial.replace(done)


def _gather(value: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _sha256(f) -> str:
    with f:
        h = hashlib.sha256()
        while chunk := f.read(1 << 20):
            h.update(chunk)
        return h.hexdigest()


def verify(path: str, fs: pyarrow.fs.FileSystem | None = None) -> int:
    """The step of the checkpoint at `path` (on `fs`; None: local), when its markers vouch for
    every file (size and sha256); IncompleteCheckpoint saying what is wrong otherwise."""
    fs = fs or pyarrow.fs.LocalFileSystem()
    path = str(path).rstrip("/")

    def marker(rank: int, *keys: str) -> dict[str, Any]:
        name = COMPLETE.format(rank)
        try:
            with fs.open_input_stream(f"{path}/{name}") as f:
                found = json.loads(f.read())
            if not isinstance(found, dict) or any(k not in found for k in keys):
                raise ValueError(f"missing {', '.join(k for k in keys if k not in found)}")
            return found
        except FileNotFoundError:
            raise IncompleteCheckpoint(f"{path}: no {name} (its copy was cut short, "
                                       "or it was written before completion markers)") from None
        except (ValueError, UnicodeDecodeError, TypeError):   # JSONDecodeError is a ValueError
            raise IncompleteCheckpoint(f"{path}: {name} does not read whole (its copy was cut short)") from None

    head = marker(0, "files", "writers", "step")
    listed = dict(head["files"])
    for r in head["writers"]:
        if r != 0:
            listed.update(marker(r, "files")["files"])
    sizes = {i.path[len(path) + 1:]: i.size for i in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))
             if i.type == pyarrow.fs.FileType.File}
    for name, (size, digest) in listed.items():
        if name not in sizes:
            raise IncompleteCheckpoint(f"{path}: {name} is missing")
        if sizes[name] != size:
            raise IncompleteCheckpoint(f"{path}: {name} has {sizes[name]} of its {size} bytes")
        if _sha256(fs.open_input_stream(f"{path}/{name}")) != digest:
            raise IncompleteCheckpoint(f"{path}: {name} is not what was written (sha256 differs)")
    return int(head["step"])


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
