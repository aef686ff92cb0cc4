"""Samples -> WebDataset tar shards at any fsspec URL, plus `dataset.json` and `manifest.parquet`.

Shards are written under `<dest>/.tmp-<uuid>/` and moved into place only when all of them
are done; `manifest.parquet` is written last, so its presence means the set is complete.
Tar headers carry a fixed mtime and PNG/JSON encoding is deterministic: the same samples
give the same bytes, hence the same fingerprint, which is how a rebuild is recognised.
A sample is `KEY.image.png` (+ `cond.png`, `mask.png`, `cls`, `json`); images with more than
4 bands, which PNG can't hold, are `.npy` instead.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import sys
import uuid
from typing import Iterable, Iterator, Sequence

import numpy as np
from PIL import Image

from .errors import InputExists
from .card import CARD, MANIFEST, SKIPPED, DatasetCard, fingerprint, read_card, write_card, write_manifest
from .pixels import PIL_MODES
from .sources import Sample
from .storage import filesystem, join, to_url
from .threads import in_threads

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
    """(H, W, 1|2|3|4) uint8 -> 8-bit L / LA / RGB / RGBA PNG; lossless."""
    a = np.asarray(a)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] not in PIL_MODES:
        raise ValueError(f"need an (H, W, 1-4) uint8 array, got {a.shape} {a.dtype}")
    buf = io.BytesIO()
    Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a, PIL_MODES[a.shape[2]]).save(
        buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_npy(a: np.ndarray) -> bytes:
    """(H, W, C) uint8 -> .npy bytes (for more bands than PNG holds; every reader has np.load)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def image_extension(channels: int) -> str:
    return "png" if channels in PIL_MODES else "npy"


def encode_image(a: np.ndarray) -> tuple[str, bytes]:
    """(extension, bytes): PNG up to 4 bands, .npy beyond."""
    ext = image_extension(a.shape[2])
    return ext, encode_png(a) if ext == "png" else encode_npy(a)


def _modalities(s: Sample) -> list[str]:
    return ["image"] + [m for m in ("cond", "mask", "cls") if getattr(s, m) is not None] + ["json"]


def _record(s: Sample, resolution: int, channels: int, modalities: list[str]) -> dict:
    if not s.key or "." in s.key or s.key.startswith("_"):
        raise ValueError(f"sample key {s.key!r}: must be non-empty, no '.', not start with '_' "
                         "(webdataset splits file names at the first dot)")
    if _modalities(s) != modalities:
        raise ValueError(f"sample {s.key} has parts {_modalities(s)}, earlier samples {modalities}")
    rec = {"__key__": s.key}
    for m, bands in (("image", channels), ("cond", channels), ("mask", 1)):
        a = getattr(s, m)
        if a is None:
            continue
        if a.shape != (resolution, resolution, bands) or a.dtype != np.uint8:
            raise ValueError(f"sample {s.key}: {m} is {a.dtype} {a.shape}, the set promises uint8 "
                             f"{(resolution, resolution, bands)}")
        ext, data = encode_image(a)
        rec[f"{m}.{ext}"] = data
    if s.cls is not None:
        rec["cls"] = str(int(s.cls)).encode()
    rec["json"] = json.dumps(s.meta, sort_keys=True).encode()
    return rec


def _write_shard(fs, path: str, records: Iterator[dict], max_samples: int, max_bytes: int | None) -> tuple[int, int, str]:
    """Write records until the shard holds `max_samples` or `max_bytes` (whichever comes first)."""
    import webdataset as wds  # imports torch: only when actually writing

    n = 0
    with fs.open(path, "wb") as f:
        out = _Hashing(f)
        with wds.TarWriter(out, encoder=False, mtime=TAR_MTIME) as tar:
            for rec in records:
                tar.write(rec)
                n += 1
                if n >= max_samples or (max_bytes is not None and out.size >= max_bytes):
                    break
    return n, out.size, out.sha.hexdigest()


def _complete_card(url: str, fs, path: str) -> DatasetCard | None:
    return read_card(url) if fs.exists(join(path, MANIFEST)) and fs.exists(join(path, CARD)) else None


def write_shards(samples: Iterable[Sample], dest: str, *, layout: str, resolution: int, channels: int,
                 source: str, shard_samples: int = 1000, shard_bytes: int | None = None,
                 classes: Sequence[str] | None = None, skipped: Sequence[dict] = (),
                 progress: bool = True) -> DatasetCard:
    """Write `samples` as `shard-000000.tar`, ... under `dest`; returns the card written.

    A shard closes at `shard_samples` samples or once it reaches `shard_bytes`. `skipped` is
    what the source left out (`{"item", "reason"}` dicts, read once `samples` is exhausted):
    it goes to `skipped.jsonl` beside the card. An existing complete set at `dest` is left
    alone if it has the same content (its card is returned), otherwise `FileExistsError`.
    On any error the temporary prefix is removed.
    """
    from tqdm import tqdm

    if shard_samples < 1 or (shard_bytes is not None and shard_bytes < 1):
        raise ValueError("shard_samples and shard_bytes must be >= 1")
    dest = to_url(dest).rstrip("/")
    fs, root = filesystem(dest)
    existing = _complete_card(dest, fs, root)
    what = dict(layout=layout, resolution=resolution, channels=channels)  # content decides the rest
    if existing is not None and existing.model_dump(include=set(what)) != what:
        raise InputExists(f"{dest} already holds a different shard set "
                              f"({existing.model_dump(include=set(what))}); remove it or pick another dest")

    tmp = join(root, f".tmp-{uuid.uuid4().hex}")
    made_root = not fs.exists(root)   # a failed build removes the folder it created, not one it found
    try:
        seen: set[str] = set()
        modalities: list[str] = []

        def checked():
            for s in samples:
                if s.key in seen:
                    raise ValueError(f"duplicate sample key {s.key!r}")
                seen.add(s.key)
                if not modalities:
                    modalities.extend(_modalities(s))
                yield s

        def records():  # PNG encoding is most of a build's time: in threads
            for rec in in_threads(lambda s: _record(s, resolution, channels, modalities), checked()):
                yield rec
                bar.update(1)

        shards = []
        stream = records()
        with tqdm(desc=f"writing {dest}", unit="img", disable=not progress, file=sys.stderr) as bar:
            while True:
                first = next(stream, None)  # don't leave an empty last shard
                if first is None:
                    break
                name = f"shard-{len(shards):06d}.tar"
                n, size, sha = _write_shard(fs, join(tmp, name), itertools.chain([first], stream),
                                            shard_samples, shard_bytes)
                shards.append({"url": name, "samples": n, "bytes": size, "sha256": sha})
        if not shards:
            raise ValueError(f"no samples to write to {dest}" + (f" ({len(skipped)} skipped)" if skipped else ""))

        card = DatasetCard(layout=layout, modalities=modalities, resolution=resolution, channels=channels,
                           count=sum(s["samples"] for s in shards),
                           fingerprint=fingerprint([s["sha256"] for s in shards]),
                           shards=len(shards), source=source,
                           classes=list(classes) if classes is not None else None, skipped=len(skipped))
        existing = _complete_card(dest, fs, root)  # again: another writer may have finished meanwhile
        if existing is not None:
            if existing.fingerprint != card.fingerprint:
                raise InputExists(f"{dest} already holds a shard set with other content "
                                      f"(fingerprint {existing.fingerprint[:12]}, new {card.fingerprint[:12]})")
            log.info("%s already holds this shard set; nothing to do", dest)
            return existing
        for s in shards:
            fs.mv(join(tmp, s["url"]), join(root, s["url"]))
        if skipped:
            with fs.open(join(root, SKIPPED), "wb") as f:
                f.write("".join(json.dumps(dict(s), sort_keys=True) + "\n" for s in skipped).encode())
        elif fs.exists(join(root, SKIPPED)):
            fs.rm(join(root, SKIPPED))  # left by an earlier, failed build of this set
        write_card(dest, card)
        write_manifest(dest, shards)  # last: the set is complete from here on
        return card
    except BaseException:
        if made_root and fs.exists(root) and all(p.rstrip("/") == tmp for p in fs.ls(root, detail=False)):
            fs.rm(root, recursive=True)
        raise
    finally:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
