"""Evaluation: the family's metrics (`family.metrics`) on generated images against the real shards.

Unconditional families: `num_samples` images from fixed seeds against up to `num_samples` real
images, a seeded random draw from the whole set. Conditional families: the model's outputs for up
to `num_samples` inputs (`cond`, and `mask` where the family uses one) against their targets
(`image`), drawn with the same seed from the held-out split when `data.holdout` is set (samples
training never sees), else from the whole set. Never "the first N": shard sets keep their source's
order, and class-folder sets are sorted by class. The fixed seed makes two runs, or two checkpoints
of one run, judged on the same reals. What the values were measured under, their protocol
(`protocol_of`, see jobs/tracking/protocol.py), names the data, the split, both seeds, the sample
count and the extractors with their weights' hashes.

`evaluate` runs in one process; `score_part` is its unit of work, which `jobs.eval.distributed`
spreads over Ray workers.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from data_shards.card import read_card
from data_shards.split import Holdout, Positions, evaluation_positions
from data_shards.stream import iterate_once
from jobs.spec import JobSpec
from jobs.tracking.protocol import EvalProtocol, extractor_hashes
from models.family import Family
from models.images import nchw_to_nhwc_numpy, to_float, to_uint8
from models.metrics.extractors import VGG16Extractor, make_extractor
from models.metrics.lpips import LPIPS
from models.metrics.suite import MetricSuite, named_for_weights

EVAL_SEED = 1_000_000  # fixed, so two runs are judged on the same noise
REAL_SEED = 0          # fixed, so two runs are judged on the same real samples
PREVIEW_MAX_PAIRS = 16  # conditional previews: input | output | target strips, at most this many
BATCH = 64             # images per generator call and extractor pass; unconditional seeds go per batch


def _conditional_outputs(family: Family, sampler: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """uint8 outputs for one data batch of a conditional family."""
    inputs = {k: to_float(batch[k]).to(device) for k in ("cond", "mask") if k in family.data_keys}
    return to_uint8(family.sample(sampler, len(batch["image"]), **inputs)).cpu()


def real_samples(family: Family, data_url: str, n: int, batch: int, holdout: Holdout = None,
                 real_seed: int = REAL_SEED) -> Iterator[dict]:
    """Batches of the reals an evaluation reads (see the module's docstring), in manifest order."""
    return iterate_once(data_url, batch_size=batch, keys=family.data_keys,
                        positions=real_positions(family, data_url, n, holdout, real_seed))


def real_positions(family: Family, data_url: str, n: int, holdout: Holdout = None,
                   real_seed: int = REAL_SEED) -> Positions:
    """Where the reals an evaluation reads are (per shard, see data_shards.split)."""
    split = holdout if family.conditional else None   # unconditional: the reference is the whole set
    return evaluation_positions(data_url, n, seed=real_seed, holdout=split)


def eval_split(family: Family, holdout: Holdout) -> str:
    """The split the reals come from, as the protocol and the params name it."""
    return f"holdout={holdout}" if family.conditional and holdout is not None else "all"


def split_holdout(split: str) -> Holdout:
    """The `holdout` value of an `eval_split` string."""
    if split == "all":
        return None
    value = split.removeprefix("holdout=")
    return int(value) if value.isdigit() else float(value)


@functools.lru_cache(maxsize=4)
def _extractor(kind: str, weights: str | None, stamp: tuple[int, int] | None) -> nn.Module:
    if kind == "lpips":
        return LPIPS(weights)
    return VGG16Extractor(weights) if kind == "vgg16" else make_extractor(kind, weights)


def load_extractor(kind: str, weights: str | None = None) -> nn.Module:
    """`randconv`, `inception`, `vgg16` or `lpips`, built once per process and weights file
    (Inception is 100 MB to read, and its weights hash is cached per module)."""
    stamp = (os.stat(weights).st_size, os.stat(weights).st_mtime_ns) if weights and os.path.isfile(weights) else None
    return _extractor(kind, weights, stamp)


def feature_extractors(metrics: Sequence[str], *, extractor: str, inception_weights: str | None,
                       vgg_weights: str | None = None) -> tuple[nn.Module | None, nn.Module | None]:
    """(the extractor of fid and kid, the one of pr when it is VGG-16), None where unused."""
    wanted = set(metrics)
    pr_feature = load_extractor("vgg16", vgg_weights) if vgg_weights and "pr" in wanted else None
    needs_feature = bool(wanted & {"fid", "kid"}) or ("pr" in wanted and pr_feature is None)
    return (load_extractor(extractor, inception_weights) if needs_feature else None), pr_feature


@contextlib.contextmanager
def fp32_highest() -> Iterator[None]:
    """fp32 arithmetic as the published metrics use it, the protocol's "fp32-highest": TF32 off
    for matmuls and cuDNN convolutions (cuDNN allows it by default) and matmul precision
    "highest" (torch.cdist goes through matmul). The settings before are restored on exit."""
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              torch.get_float32_matmul_precision())
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before[:2]
        torch.set_float32_matmul_precision(before[2])


def score_part(family: Family, sampler: nn.Module, suite: MetricSuite, *, data_url: str, positions: Positions,
               fake_starts: Iterable[int], num_samples: int, device: torch.device, batch: int = BATCH,
               seed_base: int = EVAL_SEED) -> None:
    """Feeds `suite` one part of an evaluation: the reals at `positions` (conditional families:
    with the outputs for their inputs), and, unconditional, the generated batches starting at
    `fake_starts` (multiples of `batch`; seeds `seed_base + start`). Parts cut at multiples of
    `batch`, fed in order, give what one whole evaluation gives."""
    with fp32_highest():   # the protocol's precision (jobs/tracking/protocol.py)
        _score_part(family, sampler, suite, data_url=data_url, positions=positions, fake_starts=fake_starts,
                    num_samples=num_samples, device=device, batch=batch, seed_base=seed_base)


def _score_part(family: Family, sampler: nn.Module, suite: MetricSuite, *, data_url: str, positions: Positions,
                fake_starts: Iterable[int], num_samples: int, device: torch.device, batch: int = BATCH,
                seed_base: int = EVAL_SEED) -> None:
    data = iterate_once(data_url, batch_size=batch, keys=family.data_keys, positions=positions)
    if family.conditional:
        for b in data:
            suite.update(fake=_conditional_outputs(family, sampler, b, device), real=b["image"], cond=b.get("cond"))
        return
    for b in data:
        suite.update(real=b["image"])
    for start in fake_starts:
        n = min(batch, num_samples - start)
        suite.update(fake=to_uint8(family.sample(sampler, n, seed=seed_base + start)))


def eval_params(suite: MetricSuite, family: Family, holdout: Holdout, real_seed: int = REAL_SEED) -> dict[str, str]:
    """What the values of `suite` were computed with (MLflow params)."""
    return {**suite.params(), "eval_split": eval_split(family, holdout), "eval_real_seed": str(real_seed)}


def protocol_of(extractors: Iterable[nn.Module | None], family: Family, *, data_url: str, num_samples: int,
                holdout: Holdout, real_seed: int = REAL_SEED, seed_base: int = EVAL_SEED) -> EvalProtocol:
    """The protocol of an evaluation of the data at `data_url` with these extractors (None: unused)."""
    return EvalProtocol(data_fingerprint=read_card(data_url).fingerprint, split=eval_split(family, holdout),
                        real_seed=real_seed, seed_base=seed_base, num_samples=num_samples,
                        extractors=extractor_hashes([e for e in extractors if e is not None]))


@dataclass(frozen=True)
class EvalSettings:
    """What an evaluation computes and reads, the same on the driver and on every worker: from a
    spec (`from_spec`), or from `orbitgen eval`'s options (jobs/eval/model.py)."""

    num_samples: int
    metrics: tuple[str, ...] | None = None   # None: every metric the family is judged by
    extractor: str = "randconv"              # fid's and kid's feature space: randconv | inception
    inception_weights: str | None = None
    vgg_weights: str | None = None           # set: precision/recall in VGG-16's space, else the extractor's
    holdout: Holdout = None                  # the spec's data.holdout (conditional families read only it)
    real_seed: int = REAL_SEED
    seed_base: int = EVAL_SEED
    batch: int = BATCH
    lpips_weights: str | None = None         # set: a family's `lpips` is published LPIPS, else perceptual_randconv

    @classmethod
    def from_spec(cls, spec: JobSpec, family: Family) -> "EvalSettings":
        """The evaluation a training of `spec` runs at its checkpoints."""
        ev = spec.eval
        return cls(num_samples=ev.num_samples, metrics=spec.eval_metrics(family), extractor=ev.fid_extractor,
                   inception_weights=ev.inception_weights, vgg_weights=ev.vgg_weights, holdout=spec.data.holdout,
                   lpips_weights=ev.lpips_weights)

    def requested(self, family: Family) -> tuple[str, ...]:
        """The metrics as asked for (a family's names: `lpips` whatever the weights)."""
        return tuple(self.metrics) if self.metrics is not None else tuple(family.metrics)

    def names(self, family: Family) -> tuple[str, ...]:
        """The metrics computed: `lpips` only with its weights, else `perceptual_randconv`."""
        return named_for_weights(self.requested(family), self.lpips_weights)

    def extractors(self, family: Family) -> tuple[nn.Module | None, nn.Module | None]:
        return feature_extractors(self.names(family), extractor=self.extractor,
                                  inception_weights=self.inception_weights, vgg_weights=self.vgg_weights)

    def perceptual(self, family: Family) -> nn.Module | None:
        """Published LPIPS's network when it is computed (its weights belong in the protocol), else None."""
        return load_extractor("lpips", self.lpips_weights) if "lpips" in self.names(family) else None

    def suite(self, family: Family, device: torch.device) -> MetricSuite:
        """An empty suite of these metrics."""
        feature, pr_feature = self.extractors(family)
        # The names as asked for: the suite renames `lpips` itself, and notes it in its params.
        return MetricSuite(self.requested(family), extractor=feature, pr_extractor=pr_feature, device=device,
                           lpips_weights=self.lpips_weights)

    def protocol(self, family: Family, data_url: str) -> EvalProtocol:
        """What values computed with these settings on `data_url` were measured under."""
        return protocol_of([*self.extractors(family), self.perceptual(family)], family, data_url=data_url,
                           num_samples=self.num_samples, holdout=self.holdout, real_seed=self.real_seed,
                           seed_base=self.seed_base)


def evaluate(family: Family, sampler: nn.Module, settings: EvalSettings, *, data_url: str, device: torch.device
             ) -> tuple[dict[str, float], dict[str, str]]:
    """Returns (metrics, params): params say what the metrics were computed with. In one process;
    `jobs.eval.distributed` spreads the same over Ray workers."""
    s = settings
    suite = s.suite(family, device)
    score_part(family, sampler, suite, data_url=data_url,
               positions=real_positions(family, data_url, s.num_samples, s.holdout, s.real_seed),
               fake_starts=range(0, s.num_samples, s.batch), num_samples=s.num_samples, device=device, batch=s.batch,
               seed_base=s.seed_base)
    with fp32_highest():   # precision/recall's distances run in compute()
        scores = suite.compute()
    return scores, eval_params(suite, family, s.holdout, s.real_seed)


def preview(family: Family, sampler: nn.Module, *, data_url: str, n: int, seed: int,
            device: torch.device, holdout: Holdout = None) -> np.ndarray:
    """Images for the sample grid, uint8 N×H×W×C: n samples from `seed` (unconditional), or, for
    a conditional family, one strip per input of some of the inputs evaluation reads (held out
    when `holdout` is set): input (and mask), output, target side by side."""
    if not family.conditional:
        return nchw_to_nhwc_numpy(to_uint8(family.sample(sampler, n, seed=seed)))
    pairs = min(n, PREVIEW_MAX_PAIRS)
    b = next(real_samples(family, data_url, pairs, pairs, holdout))
    channels = b["image"].shape[1]
    # A 1-channel mask is shown as grey in every channel of the strip.
    parts = [b[k].expand(-1, channels, -1, -1) if k == "mask" else b[k] for k in ("cond", "mask") if k in b]
    parts += [_conditional_outputs(family, sampler, b, device), b["image"]]
    return nchw_to_nhwc_numpy(torch.cat(parts, dim=3))
