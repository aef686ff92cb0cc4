"""The extractors' weights files of an evaluation, carried from the driver to workers on other nodes.

`eval.inception_weights`, `eval.vgg_weights` and `eval.lpips_weights` are local files, checked on
the driver (jobs/inputs.py). A worker on another node has no such path: the driver puts each
file's bytes into Ray's object store (`ship`), and a worker writes them under a folder of its
own where its node lacks the path (`place`), as `model.*_from` snapshots travel
(jobs/tracking/model_refs.py). The bytes are the same, so the weights' hashes, and the protocol,
are the same on every node. A placed file is named by its content's hash: the evaluations of one
node share one copy, and a changed file never reads as the old one.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

# EvalSettings' fields that name a weights file, with the spec key they come from.
WEIGHT_FIELDS = {"inception_weights": "eval.inception_weights", "vgg_weights": "eval.vgg_weights",
                 "lpips_weights": "eval.lpips_weights"}


def weight_paths(settings) -> dict[str, str]:
    """{spec key: path} of the weights files `settings` (an EvalSettings) names."""
    return {key: path for field, key in WEIGHT_FIELDS.items() if (path := getattr(settings, field))}


def ship(paths: dict[str, str]) -> dict[str, Any]:
    """On the driver: {spec key: {"ref": object ref of the file's bytes, "sha256": its digest}}
    (Ray must be initialised); a path that is no file is left out (the checks named it before)."""
    import ray

    out = {}
    for key, path in paths.items():
        file = Path(path).expanduser()
        if file.is_file():
            data = file.read_bytes()
            out[key] = {"ref": ray.put(data), "sha256": hashlib.sha256(data).hexdigest()}
    return out


def place(settings, shipped: dict[str, Any], dest: Path):
    """On a worker: `settings` with each shipped weights file written under `dest` where this
    node lacks its path (the same settings when it has them all)."""
    import ray

    changes = {}
    for field, key in WEIGHT_FIELDS.items():
        path = getattr(settings, field)
        if not path or key not in shipped or Path(path).expanduser().is_file():
            continue
        item = shipped[key]
        local = dest / f"{key.replace('.', '-')}-{item['sha256'][:16]}{Path(path).suffix or '.bin'}"
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            tmp = local.with_name(f"{local.name}.{os.getpid()}.tmp")   # workers of one node may race
            tmp.write_bytes(ray.get(item["ref"]))
            tmp.replace(local)
        changes[field] = str(local)
    return replace(settings, **changes) if changes else settings


def node_folder() -> Path:
    """Where a worker keeps the weights files shipped to its node."""
    import tempfile

    return Path(tempfile.gettempdir()) / "orbitgen-eval-weights"
