"""Evaluation: the family's metrics (`family.metrics`) on generated images against the real shards.

Unconditional families: `num_samples` images from fixed seeds against up to `num_samples` real
images. Conditional families: the model's outputs for the first `num_samples` inputs of the
set (`cond`, and `mask` where the family uses one) against their targets (`image`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from data_shards.stream import iterate_once
from models.family import Family
from models.images import nchw_to_nhwc_numpy, to_float, to_uint8
from models.metrics.extractors import VGG16Extractor, make_extractor
from models.metrics.suite import MetricSuite

EVAL_SEED = 1_000_000  # fixed, so two runs are judged on the same noise
PREVIEW_MAX_PAIRS = 16  # conditional previews: input | output | target strips, at most this many


def _conditional_outputs(family: Family, sampler: nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """uint8 outputs for one data batch of a conditional family."""
    inputs = {k: to_float(batch[k]).to(device) for k in ("cond", "mask") if k in family.data_keys}
    return to_uint8(family.sample(sampler, len(batch["image"]), **inputs)).cpu()


def evaluate(family: Family, sampler: nn.Module, *, data_url: str, num_samples: int, extractor: str,
             inception_weights: str | None, device: torch.device, batch: int = 64,
             vgg_weights: str | None = None, metrics: Sequence[str] | None = None
             ) -> tuple[dict[str, float], dict[str, str]]:
    """Returns (metrics, params): params say what the metrics were computed with. `metrics` picks
    among the family's (default: all of them). With `vgg_weights`, precision/recall use VGG-16
    features, else the `extractor`'s (see params)."""
    names = tuple(metrics) if metrics is not None else tuple(family.metrics)
    metrics = set(names)
    pr_feature = VGG16Extractor(vgg_weights) if vgg_weights and "pr" in metrics else None
    needs_feature = bool(metrics & {"fid", "kid"}) or ("pr" in metrics and pr_feature is None)
    feature = make_extractor(extractor, inception_weights) if needs_feature else None
    suite = MetricSuite(names, extractor=feature, pr_extractor=pr_feature, device=device)
    data = iterate_once(data_url, batch_size=batch, limit=num_samples, keys=family.data_keys)
    if family.conditional:
        for b in data:
            suite.update(fake=_conditional_outputs(family, sampler, b, device), real=b["image"], cond=b.get("cond"))
    else:
        for b in data:
            suite.update(real=b["image"])
        for start in range(0, num_samples, batch):
            n = min(batch, num_samples - start)
            suite.update(fake=to_uint8(family.sample(sampler, n, seed=EVAL_SEED + start)))
    return suite.compute(), suite.params()


def preview(family: Family, sampler: nn.Module, *, data_url: str, n: int, seed: int,
            device: torch.device) -> np.ndarray:
    """Images for the sample grid, uint8 N×H×W×C: n samples from `seed` (unconditional), or, for
    a conditional family, one strip per input of the first inputs of the set: input (and mask),
    output, target side by side."""
    if not family.conditional:
        return nchw_to_nhwc_numpy(to_uint8(family.sample(sampler, n, seed=seed)))
    b = next(iterate_once(data_url, batch_size=min(n, PREVIEW_MAX_PAIRS), keys=family.data_keys))
    channels = b["image"].shape[1]
    # A 1-channel mask is shown as grey in every channel of the strip.
    parts = [b[k].expand(-1, channels, -1, -1) if k == "mask" else b[k] for k in ("cond", "mask") if k in b]
    parts += [_conditional_outputs(family, sampler, b, device), b["image"]]
    return nchw_to_nhwc_numpy(torch.cat(parts, dim=3))
