"""`orbitgen data build`: a source layout -> checked samples -> shards.

The layouts (see each reader for its source format):
    folder          images at any depth                         image
    class-folders   one sub-folder per class                    image, cls
    stylegan-zip    a StyleGAN2 dataset_tool zip                image (+ cls)
    side-by-side    input and target halves of one image        cond, image
    paired-folders  two folders matched by file stem            cond, image
    timeseries-csv  CSV rows: past, mask, future (+ id, dates)  cond, mask, image, json
    geotiff         GeoTIFF rasters cut into tiles              image (+ CRS/transform in json)

`--on-error` decides about items that can't become samples (unreadable files, unmatched pairs,
CSV rows pointing nowhere, an image whose channel count differs from the first one's under
`--channels keep`): `fail` stops at the first and names it, `skip` leaves it out and lists it
in `skipped.jsonl` beside the card and in the summary. Either way nothing half-written stays.
"""
from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .errors import UserError
from .card import DatasetCard
from .pixels import channel_policy
from .source_geotiff import read_geotiff
from .source_timeseries import read_timeseries_csv
from .source_zip import read_stylegan_zip
from .sources import Sample, Skipped, Source, read_class_folders, read_folder, read_paired_folders, read_side_by_side
from .storage import to_url
from .writer import write_shards

log = logging.getLogger(__name__)

# layout -> reader(source, resolution, channels, **options) -> Source or an iterator of items
LAYOUTS: dict[str, Callable[..., Source | Iterator]] = {
    "folder": read_folder,
    "class-folders": read_class_folders,
    "stylegan-zip": read_stylegan_zip,
    "side-by-side": read_side_by_side,
    "paired-folders": read_paired_folders,
    "timeseries-csv": read_timeseries_csv,
    "geotiff": read_geotiff,
}
ON_ERROR = ("fail", "skip")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class SourceItemError(UserError):
    """`--on-error fail`: an item of the source couldn't become a sample."""


def parse_shard_size(text: str | int) -> tuple[int, int | None]:
    """`1000` -> (1000 samples, no byte limit); `256MB` / `1GiB` -> (no sample limit, bytes)."""
    m = re.fullmatch(r"\s*(\d+)\s*([A-Za-z]*)\s*", str(text))
    unit = m.group(2).upper() if m else None
    if not m or unit not in _UNITS or int(m.group(1)) < 1:
        raise UserError(f"shard size {text!r}: a sample count (1000) or a size (256MB, 1GiB)")
    n = int(m.group(1))
    return (n, None) if not unit else (2**62, n * _UNITS[unit])


@dataclass
class BuildResult:
    card: DatasetCard
    skipped: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def checked(items, on_error: str, skipped: list[dict]) -> Iterator[Sample]:
    """Samples only: problems (from the source, or channel counts / keys that differ from the
    first sample's) raise under `fail`, and are logged and collected in `skipped` under `skip`."""
    channels: int | None = None
    keys: set[str] = set()
    for it in items:
        problem = it if isinstance(it, Skipped) else None
        if problem is None:
            bands = {it.image.shape[2]} | ({it.cond.shape[2]} if it.cond is not None else set())
            channels = channels or it.image.shape[2]
            if bands != {channels}:
                problem = Skipped(it.meta.get("source", it.key), f"{sorted(bands)} channels, earlier items {channels}"
                                  " (use --channels gray or rgb to convert)")
            elif it.key in keys:
                problem = Skipped(it.meta.get("source", it.key), f"sample key {it.key!r} used twice")
        if problem is not None:
            if on_error == "fail":
                raise SourceItemError(f"{problem.item}: {problem.reason}")
            skipped.append({"item": problem.item, "reason": problem.reason})
            log.warning("skipping %s: %s", problem.item, problem.reason)
            continue
        keys.add(it.key)
        yield it


def build(source: str, dest: str, *, layout: str, resolution: int, channels: str | int | None = "keep",
          shard_size: str | int = 1000, on_error: str = "fail", progress: bool = True, **options) -> BuildResult:
    """Read `source` in `layout`, write shards to `dest`. `options` go to the layout's reader
    (input_side, cond_dir, image_dir, columns, stride, max_nodata, bands)."""
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; layouts: {', '.join(LAYOUTS)}")
    if on_error not in ON_ERROR:
        raise UserError(f"on_error must be one of {ON_ERROR}, not {on_error!r}")
    if resolution < 1:
        raise UserError("resolution must be >= 1")
    shard_samples, shard_bytes = parse_shard_size(shard_size)
    src = LAYOUTS[layout](source, resolution, channel_policy(channels), **options)
    src = src if isinstance(src, Source) else Source(src)
    skipped: list[dict] = []
    samples = checked(src.items, on_error, skipped)
    first = next(samples, None)
    if first is None:
        shown = "; ".join(f"{s['item']}: {s['reason']}" for s in skipped[:3])
        raise UserError(f"no usable items in {source}" + (f" ({len(skipped)} skipped: {shown})" if skipped else ""))
    card = write_shards(itertools.chain([first], samples), to_url(dest), layout=layout, resolution=resolution,
                        channels=first.image.shape[2], source=source if "://" in source else to_url(source),
                        shard_samples=shard_samples, shard_bytes=shard_bytes, classes=src.classes,
                        skipped=skipped, progress=progress)
    return BuildResult(card=card, skipped=skipped, notes=src.notes)
