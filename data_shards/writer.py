"""Samples -> WebDataset tar shards at any fsspec URL, plus `dataset.json` and `manifest.parquet`.

Shards are written under `<dest>/.tmp-<uuid>/` and moved into place only when all of them
are done; `manifest.parquet` is written last, so its presence means the set is complete.
Tar headers carry a fixed mtime and PNG/JSON encoding is deterministic: the same samples
give the same bytes, hence the same fingerprint, which is how a rebuild is recognised.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import sys
import uuid
from typing import Iterable

import numpy as np
from PIL import Image

from .card import CARD, MANIFEST, DatasetCard, fingerprint, read_card, write_card, write_manifest
from .sources import Sample
from .storage import filesystem, join, to_url

log = logging.getLogger(__name__)

TAR_MTIME = 0  # reproducible tar files


class _Hashing(io.RawIOBase):
    """Write-through file wrapper that counts bytes and computes sha256 on the way."""

    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.size += len(b)
        self.f.write(b)
        return len(b)


def encode_png(a: np.ndarray) -> bytes:
    """(H, W, 1) -> 8-bit gray PNG, (H, W, 3) -> RGB PNG; lossless."""
    a = np.asarray(a)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] not in (1, 3):
        raise ValueError(f"need an (H, W, 1|3) uint8 array, got {a.shape} {a.dtype}")
    buf = io.BytesIO()
    Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _modalities(s: Sample) -> list[str]:
    return ["image"] + [m for m in ("cond", "mask", "cls") if getattr(s, m) is not None]


def _record(s: Sample, resolution: int, channels: int, modalities: list[str]) -> dict:
    if not s.key or "." in s.key or s.key.startswith("_"):
        raise ValueError(f"sample key {s.key!r}: must be non-empty, no '.', not start with '_' "
                         "(webdataset splits file names at the first dot)")
    if s.image.shape != (resolution, resolution, channels):
        raise ValueError(f"sample {s.key}: image shape {s.image.shape}, the set promises "
                         f"{(resolution, resolution, channels)}")
    if _modalities(s) != modalities:
        raise ValueError(f"sample {s.key} has parts {_modalities(s)}, earlier samples {modalities}")
    rec = {"__key__": s.key, "image.png": encode_png(s.image),
           "json": json.dumps(s.meta, sort_keys=True).encode()}
    for m in ("cond", "mask"):
        if getattr(s, m) is not None:
            rec[f"{m}.png"] = encode_png(getattr(s, m))
    if s.cls is not None:
        rec["cls"] = str(int(s.cls)).encode()
    return rec


def _write_shard(fs, path: str, records: Iterable[dict]) -> tuple[int, int, str]:
    import webdataset as wds  # imports torch: only when actually writing

    n = 0
    with fs.open(path, "wb") as f:
        out = _Hashing(f)
        with wds.TarWriter(out, encoder=False, mtime=TAR_MTIME) as tar:
            for rec in records:
                tar.write(rec)
                n += 1
    return n, out.size, out.sha.hexdigest()


def _complete_card(url: str, fs, path: str) -> DatasetCard | None:
    return read_card(url) if fs.exists(join(path, MANIFEST)) and fs.exists(join(path, CARD)) else None


def write_shards(samples: Iterable[Sample], dest: str, *, layout: str, resolution: int, channels: int,
                 source: str, shard_samples: int = 1000, progress: bool = True) -> DatasetCard:
    """Write `samples` as `shard-000000.tar`, ... under `dest`; returns the card written.

    An existing complete set at `dest` is left alone if it has the same content (its card is
    returned), otherwise `FileExistsError`. On any error the temporary prefix is removed.
    """
    from tqdm import tqdm

    if shard_samples < 1:
        raise ValueError("shard_samples must be >= 1")
    dest = to_url(dest).rstrip("/")
    fs, root = filesystem(dest)
    existing = _complete_card(dest, fs, root)
    what = dict(layout=layout, resolution=resolution, channels=channels)  # content decides the rest
    if existing is not None and existing.model_dump(include=set(what)) != what:
        raise FileExistsError(f"{dest} already holds a different shard set "
                              f"({existing.model_dump(include=set(what))}); remove it or pick another dest")

    tmp = join(root, f".tmp-{uuid.uuid4().hex}")
    try:
        seen: set[str] = set()
        modalities: list[str] = []

        def records():
            for s in samples:
                if s.key in seen:
                    raise ValueError(f"duplicate sample key {s.key!r}")
                seen.add(s.key)
                if not modalities:
                    modalities.extend(_modalities(s))
                yield _record(s, resolution, channels, modalities)
                bar.update(1)

        shards = []
        stream = records()
        with tqdm(desc=f"writing {dest}", unit="img", disable=not progress, file=sys.stderr) as bar:
            while True:
                first = next(stream, None)  # don't leave an empty last shard
                if first is None:
                    break
                name = f"shard-{len(shards):06d}.tar"
                chunk = itertools.chain([first], itertools.islice(stream, shard_samples - 1))
                n, size, sha = _write_shard(fs, join(tmp, name), chunk)
                shards.append({"url": name, "samples": n, "bytes": size, "sha256": sha})
        if not shards:
            raise ValueError(f"no samples to write to {dest}")

        card = DatasetCard(layout=layout, modalities=modalities, resolution=resolution, channels=channels,
                           count=sum(s["samples"] for s in shards),
                           fingerprint=fingerprint([s["sha256"] for s in shards]),
                           shards=len(shards), source=source)
        existing = _complete_card(dest, fs, root)  # again: another writer may have finished meanwhile
        if existing is not None:
            if existing.fingerprint != card.fingerprint:
                raise FileExistsError(f"{dest} already holds a shard set with other content "
                                      f"(fingerprint {existing.fingerprint[:12]}, new {card.fingerprint[:12]})")
            log.info("%s already holds this shard set; nothing to do", dest)
            return existing
        for s in shards:
            fs.mv(join(tmp, s["url"]), join(root, s["url"]))
        write_card(dest, card)
        write_manifest(dest, shards)  # last: the set is complete from here on
        return card
    finally:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
