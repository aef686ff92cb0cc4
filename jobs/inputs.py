"""The driver's checks of a spec's inputs, before anything starts: the training data (a built-in
set is materialised here), its card against the spec, and the local files the family needs.

Used by `train`, `eval`, `search` and `doctor`; they run once, on the driver. Workers trust what
the driver checked (`jobs/spec.py` validators never touch a disk).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from data_shards.builtin import ensure_builtin, is_builtin
from data_shards.card import read_card
from data_shards.errors import UserError
from jobs.spec import JobSpec, SpecError


def resolve_data(spec: JobSpec, home: str | None = None) -> str:
    """The shard set's URL; a built-in set is made first, once, under `home` (default: the
    workdir's `shards/`; on a cluster, jobs/placement.py `builtin_home`)."""
    if is_builtin(spec.data.train):
        try:
            return ensure_builtin(spec.data.train, home or str(spec.workdir_path() / "shards"),
                                  spec.data.resolution, spec.data.channels)
        except UserError as e:
            raise SpecError(f"data.train: {e}") from None
    return spec.data.train


def check_data(spec: JobSpec, url: str) -> dict[str, Any]:
    try:
        card = read_card(url)
    except UserError as e:
        raise SpecError(f"data.train: {e}") from None
    differ = [f"data.{k}={getattr(spec.data, k)}" for k in ("channels", "resolution")
              if getattr(card, k) != getattr(spec.data, k)]
    if differ:
        raise SpecError(f"data.train {url} holds {card.channels}-channel {card.resolution}² images, "
                        f"but the spec says {', '.join(differ)}; set it to match the shard set")
    return card.model_dump(mode="json")


def check_files(spec: JobSpec, *, family_files: bool = True) -> None:
    """The local files the spec needs, before Ray starts: the evaluation's extractor weights and,
    unless `family_files` is off (a search that trains nothing), the family's pretrained weights."""
    wanted = {**(spec.make_family().required_files() if family_files else {}), **spec.eval.weight_files()}
    missing = [f"  {key}: " + (f"no file at {path}" if path else "not set")
               for key, path in wanted.items() if not (path and Path(path).expanduser().is_file())]
    if missing:
        raise SpecError("files this spec needs are missing (set them with --set KEY=PATH):\n" + "\n".join(missing))
