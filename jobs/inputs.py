"""The driver's checks of a spec's inputs, before anything starts: the training data (a built-in
set is materialised here; plain WebDataset shards made elsewhere get their card here, on first
use: data_shards/adopt.py), its card against the spec, and the local files the family needs.

Used by `train`, `eval`, `search` and `doctor`; they run once, on the driver. Workers trust what
the driver checked (`jobs/spec.py` validators never touch a disk).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from data_shards.adopt import LAYOUT as ADOPTED_LAYOUT, resolve as adopt_if_foreign
from data_shards.builtin import ensure_builtin, is_builtin
from data_shards.card import read_card
from data_shards.errors import UserError
from jobs.spec import JobSpec, SpecError


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def resolve_data(spec: JobSpec, home: str | None = None, say: Callable[[str], None] = _to_stderr) -> str:
    """The shard set's URL; a built-in set is made first, once, under `home` (default: the
    workdir's `shards/`; on a cluster, jobs/placement.py `builtin_home`). Shards made elsewhere
    are adopted: the URL returned is their card's folder, and `say` tells where it was written."""
    home = home or str(spec.workdir_path() / "shards")
    if is_builtin(spec.data.train):
        try:
            return ensure_builtin(spec.data.train, home, spec.data.resolution, spec.data.channels)
        except UserError as e:
            raise SpecError(f"data.train: {e}") from None
    return resolve_data_url(spec.data.train, home=home, resize_to=spec.data.resolution if spec.data.resize == "resize"
                            else None, holdout=spec.data.holdout, say=say, key="data.train")


def resolve_data_url(url: str, *, home: str, resize_to: int | None = None, holdout=None,
                     say: Callable[[str], None] = _to_stderr, key: str = "--data") -> str:
    """`url` as the pipeline reads it: unchanged for a set with a complete card, else the folder
    of the card adopted for it (beside the shards, else under `home`/adopted)."""
    try:
        adopted = adopt_if_foreign(url, resize_to=resize_to, holdout=holdout, fallback=f"{home.rstrip('/')}/adopted")
    except UserError as e:
        raise SpecError(f"{key}: {e}") from None
    if adopted is None:
        return url
    if adopted.note:
        say(adopted.note)
    return adopted.url


class DataMismatch(SpecError):
    """The shard set is there, but holds other images than the spec says (channels, resolution)."""


def check_data(spec: JobSpec, url: str) -> dict[str, Any]:
    try:
        card = read_card(url)
    except UserError as e:
        raise SpecError(f"data.train: {e}") from None
    differ = [f"data.{k}={getattr(spec.data, k)}" for k in ("channels", "resolution")
              if getattr(card, k) != getattr(spec.data, k)]
    if differ:
        resize = (" (or data.resize: resize to fit its images to data.resolution on read)"
                  if card.layout == ADOPTED_LAYOUT and card.channels == spec.data.channels else "")
        raise DataMismatch(f"data.train {url} holds {card.channels}-channel {card.resolution}² images, "
                        f"but the spec says {', '.join(differ)}; set it to match the shard set{resize}")
    return card.model_dump(mode="json")


MISSING_FILES = "files this spec needs are missing (set them with --set KEY=PATH)"


def missing_files(spec: JobSpec, *, family_files: bool = True) -> list[str]:
    """`KEY: no file at PATH` (or `KEY: not set`) for each local file the spec needs and lacks: the
    evaluation's extractor weights and, unless `family_files` is off (a search that trains
    nothing), the family's pretrained weights."""
    wanted = {**(spec.make_family().required_files() if family_files else {}), **spec.eval.weight_files()}
    return [f"{key}: " + (f"no file at {path}" if path else "not set")
            for key, path in wanted.items() if not (path and Path(path).expanduser().is_file())]


def check_files(spec: JobSpec, *, family_files: bool = True) -> None:
    """Refuses, before Ray starts, a spec whose local files are missing (`missing_files`)."""
    if missing := missing_files(spec, family_files=family_files):
        raise SpecError(f"{MISSING_FILES}:\n" + "\n".join(f"  {line}" for line in missing))
