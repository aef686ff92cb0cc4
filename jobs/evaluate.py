"""Evaluation: the family's metrics on generated images against the real shards."""
from __future__ import annotations

import torch
from torch import nn

from data_shards.stream import iterate_once
from models.family import Family
from models.images import to_uint8
from models.metrics.extractors import make_extractor
from models.metrics.fid import frechet_distance

EVAL_SEED = 1_000_000  # fixed, so two runs are judged on the same noise


def evaluate(family: Family, sampler: nn.Module, *, data_url: str, num_samples: int, extractor: str,
             inception_weights: str | None, device: torch.device, batch: int = 64) -> tuple[dict[str, float], dict[str, str]]:
    """Returns (metrics, params): params say what the metrics were computed with."""
    feature = make_extractor(extractor, inception_weights).to(device)
    real = (b["image"] for b in iterate_once(data_url, batch_size=batch, limit=num_samples))

    def fake():
        for start in range(0, num_samples, batch):
            n = min(batch, num_samples - start)
            yield to_uint8(family.sample(sampler, n, seed=EVAL_SEED + start))

    fid = frechet_distance(real, fake(), feature, device=device)
    return {"fid": fid}, {"fid_extractor": feature.name, "fid_num_samples": str(num_samples)}
