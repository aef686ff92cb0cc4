"""The feature levels each vision-aided backbone hands its heads are the reference's.

Reference: Kumari et al., github.com/nupurkmr9/vision-aided-gan, commit f200140f,
`vision_aided_loss/cvmodel.py` (features) and `vision_aided_loss/cv_discriminator.py` (heads:
`get_decoder` gives CLIP and DINO a `MultiLevelDViT(level=3, ...)`, Swin and VGG a `SimpleD`,
one conv map -> one logit).
"""
from __future__ import annotations

import pytest
import torch

from models.nets.vision_backbones import (BACKBONES, _instantiate, build_backbone, feature_dims, is_multilevel,
                                          save_random_backbone)

# kind -> (channels, spatial side at 224) of each level the reference returns; None: a pooled vector.
REFERENCE_LEVELS = {
    # cvmodel.py:117 feat_points = [0, 4, 8, 12]; :135-137 two (768, 7, 7) token maps, then ln_post(CLS) @ proj (512)
    "clip_vitb32": [(768, 7), (768, 7), (512, None)],
    # cvmodel.py:164-168 get_intermediate_layers(n=8)[0, 4, -1]: two (768, 14, 14) token maps, then CLS (768)
    "dino_vitb16": [(768, 14), (768, 14), (768, None)],
    # cvmodel.py:83-86 ('conv'): layers, norm, reshape(-1, 768, 7, 7): one map
    "swin_t": [(768, 7)],
    # cvmodel.py:29 out = self.model(x), the whole vgg16 `.features` (through pool5): one (512, 7, 7) map
    "vgg16": [(512, 7)],
}


@pytest.mark.parametrize("kind", BACKBONES)
def test_levels_are_the_references(kind):
    expected = REFERENCE_LEVELS[kind]
    assert feature_dims(kind) == [c for c, _ in expected]
    assert is_multilevel(kind) == (len(expected) > 1)
    with torch.device("meta"):   # shapes only: no weights, no compute
        levels = _instantiate(kind, "base", {}).levels(torch.empty(2, 3, 224, 224))
    shapes = []
    for level in levels:
        if level.ndim == 3:   # ViT tokens (N, L, C) on a square patch grid
            side = int(level.shape[1] ** 0.5)
            assert side * side == level.shape[1]
            shapes.append((level.shape[2], side))
        elif level.ndim == 4:
            assert level.shape[2] == level.shape[3]
            shapes.append((level.shape[1], level.shape[2]))
        else:
            shapes.append((level.shape[1], None))
    assert shapes == expected


@pytest.mark.parametrize("kind", ["swin_t", "vgg16"])
def test_single_level_backbones_pool_their_map_for_the_probe(kind, tmp_path):
    """The probe reads the reference's `pool` output: the map averaged over space."""
    bb = build_backbone(kind, save_random_backbone(kind, tmp_path / "w.pt", seed=2), size="tiny")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    (level,) = bb(x)
    assert level.ndim == 4 and level.shape[:2] == (2, bb.level_dims[0])
    torch.testing.assert_close(bb.pooled(x), level.mean((2, 3)))
