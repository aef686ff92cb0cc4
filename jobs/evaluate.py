"""Evaluation: the family's metrics (`family.metrics`) on generated images against the real shards.

Unconditional families: `num_samples` images from fixed seeds against up to `num_samples` real
images, a seeded random draw from the whole set. Conditional families: the model's outputs for up
to `num_samples` inputs (`cond`, and `mask` where the family uses one) against their targets
(`image`), drawn with the same seed from the held-out split when `data.holdout` is set (samples
training never sees), else from the whole set. Never "the first N": shard sets keep their source's
order, and class-folder sets are sorted by class. The fixed seed makes two runs, or two checkpoints
of one run, judged on the same reals.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from data_shards.split import Holdout, evaluation_positions
from data_shards.stream import iterate_once
from models.family import Family
from models.images import nchw_to_nhwc_numpy, to_float, to_uint8
from models.metrics.extractors import VGG16Extractor, make_extractor
from models.metrics.suite import MetricSuite

EVAL_SEED = 1_000_000  # fixed, so two runs are judged on the same noise
REAL_SEED = 0          # fixed, so two runs are judged on the same real samples
PREVIEW_MAX_PAIRS = 16  # conditional previews: input | output | target strips, at most this many


def _conditional_outputs(family: Family, sampler: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """uint8 outputs for one data batch of a conditional family."""
    inputs = {k: to_float(batch[k]).to(device) for k in ("cond", "mask") if k in family.data_keys}
    return to_uint8(family.sample(sampler, len(batch["image"]), **inputs)).cpu()


def real_samples(family: Family, data_url: str, n: int, batch: int, holdout: Holdout = None) -> Iterator[dict]:
    """Batches of the reals an evaluation reads (see the module's docstring), in manifest order."""
    split = holdout if family.conditional else None   # unconditional: the reference is the whole set
    positions = evaluation_positions(data_url, n, seed=REAL_SEED, holdout=split)
    return iterate_once(data_url, batch_size=batch, keys=family.data_keys, positions=positions)


def evaluate(family: Family, sampler: nn.Module, *, data_url: str, num_samples: int, extractor: str,
             inception_weights: str | None, device: torch.device, batch: int = 64,
             vgg_weights: str | None = None, metrics: Sequence[str] | None = None, holdout: Holdout = None
             ) -> tuple[dict[str, float], dict[str, str]]:
    """Returns (metrics, params): params say what the metrics were computed with. `metrics` picks
    among the family's (default: all of them). With `vgg_weights`, precision/recall use VGG-16
    features, else the `extractor`'s (see params). `holdout`: the spec's `data.holdout`."""
    names = tuple(metrics) if metrics is not None else tuple(family.metrics)
    metrics = set(names)
    pr_feature = VGG16Extractor(vgg_weights) if vgg_weights and "pr" in metrics else None
    needs_feature = bool(metrics & {"fid", "kid"}) or ("pr" in metrics and pr_feature is None)
    feature = make_extractor(extractor, inception_weights) if needs_feature else None
    suite = MetricSuite(names, extractor=feature, pr_extractor=pr_feature, device=device)
    data = real_samples(family, data_url, num_samples, batch, holdout)
    if family.conditional:
        for b in data:
            suite.update(fake=_conditional_outputs(family, sampler, b, device), real=b["image"], cond=b.get("cond"))
    else:
        for b in data:
            suite.update(real=b["image"])
        for start in range(0, num_samples, batch):
            n = min(batch, num_samples - start)
            suite.update(fake=to_uint8(family.sample(sampler, n, seed=EVAL_SEED + start)))
    split = f"holdout={holdout}" if family.conditional and holdout is not None else "all"
    return suite.compute(), {**suite.params(), "eval_split": split, "eval_real_seed": str(REAL_SEED)}


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
