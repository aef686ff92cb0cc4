"""`orbitgen data verify`: re-read every shard, check it against the manifest, decode every sample.

Checks: each shard's size and sha256 against `manifest.parquet`; its samples decode (every key
of the card's modalities, at the card's resolution and channels, or fitted to it where the card
says `resize`) and number what the manifest says; the card's count, shard count and fingerprint agree with the manifest. Each problem
names its shard (and sample, where one is to blame). An adopted set (adopt.py: shards made
elsewhere, the card beside them or under the job's storage) is checked the same way against the
card written when it was adopted, so a shard changed since then is reported.
"""
from __future__ import annotations

import hashlib
import io
import tarfile
from dataclasses import dataclass, field

from .card import fingerprint, read_card, read_manifest
from .decode import KEYS, CorruptSample, decode_sample, expected_shapes
from .member_names import UnsafeMemberName
from .shard_reader import read_shard, tar_samples


@dataclass
class Problem:
    shard: str
    sample: str | None
    reason: str

    def __str__(self) -> str:
        return f"{self.shard}" + (f" sample {self.sample}" if self.sample else "") + f": {self.reason}"


@dataclass
class Report:
    url: str
    shards: int = 0
    samples: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(url: str) -> Report:
    card, manifest = read_card(url), read_manifest(url)
    report = Report(url)
    keys = tuple(k for k in KEYS if k in card.modalities)
    shapes = expected_shapes(card.resolution, card.channels)
    for row in manifest.itertuples(index=False):
        name = row.url.rsplit("/", 1)[-1]
        report.shards += 1
        try:
            data = read_shard(row.url)
        except Exception as exc:
            report.problems.append(Problem(name, None, f"cannot read: {type(exc).__name__}: {exc}"))
            continue
        if len(data) != row.bytes:
            report.problems.append(Problem(name, None, f"{len(data)} bytes, the manifest says {row.bytes}"))
        elif hashlib.sha256(data).hexdigest() != row.sha256:
            report.problems.append(Problem(name, None, "sha256 differs from the manifest (content changed)"))
        n = 0
        try:
            for raw in tar_samples(io.BytesIO(data), row.url):
                n += 1
                try:
                    decode_sample(raw, keys, shapes, card.resize)
                except CorruptSample as exc:  # its message names the sample (said once here) and the part
                    reason = str(exc).removeprefix(f"sample {raw['__key__']!r}").lstrip(": ")
                    report.problems.append(Problem(name, raw["__key__"], reason))
                except Exception as exc:  # anything else a decoder raises on bad bytes
                    report.problems.append(Problem(name, raw["__key__"], f"{type(exc).__name__}: {exc}"))
        except UnsafeMemberName:   # refused, not a finding: nothing from this set is used
            raise
        except (tarfile.TarError, EOFError) as exc:
            report.problems.append(Problem(name, None, f"damaged tar after {n} sample{'s' * (n != 1)}: {exc}"))
        report.samples += n
        if n != row.samples:
            report.problems.append(Problem(name, None, f"{n} sample{'s' * (n != 1)}, the manifest says {row.samples}"))
    checks = [("count", card.count, int(manifest.samples.sum())), ("shards", card.shards, len(manifest)),
              ("fingerprint", card.fingerprint, fingerprint(list(manifest.sha256)))]
    for what, in_card, in_manifest in checks:
        if in_card != in_manifest:
            report.problems.append(Problem("dataset.json", None, f"{what} {in_card} != manifest's {in_manifest}"))
    return report
