"""The feature levels each vision-aided backbone hands its heads are the reference's.

Reference: Kumari et al., github.com/nupurkmr9/vision-aided-gan, commit f200140f,
`vision_aided_loss/cvmodel.py` (features) and `vision_aided_loss/cv_discriminator.py` (heads:
`get_decoder` gives CLIP and DINO a `MultiLevelDViT(level=3, ...)`, Swin and VGG a `SimpleD`,
one conv map -> one logit).

Which blocks are tapped and how (LayerNorm, CLS, projection) is checked on narrow 12-block ViTs
against the reference's procedure written out by hand; VGG's antialiased max-pool
(`antialiased_cnns.vgg16(filter_size=4)`: MaxPool2d(2, 1), then BlurPool [1,3,3,1]^2/64, stride 2,
reflection pad (1, 2)) against a numpy loop.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.nets.vision_backbones import (BACKBONES, BackboneWeightsError, _instantiate, build_backbone, feature_dims,
                                          is_multilevel, read_state_dict, save_random_backbone)

# kind -> (channels, spatial side at 224) of each level the reference returns; None: a pooled vector.
REFERENCE_LEVELS = {
    # cvmodel.py:117 feat_points = [0, 4, 8, 12]; :135-137 two (768, 7, 7) token maps, then ln_post(CLS) @ proj (512)
    "clip_vitb32": [(768, 7), (768, 7), (512, None)],
    # cvmodel.py:164-168 get_intermediate_layers(n=8)[0, 4, -1]: two (768, 14, 14) token maps, then CLS (768)
    "dino_vitb16": [(768, 14), (768, 14), (768, None)],
    # cvmodel.py:83-86 ('conv'): layers, norm, reshape(-1, 768, 7, 7): one map
    "swin_t": [(768, 7)],
    # cvmodel.py:29 out = self.model(x), the whole antialiased vgg16 `.features` (through the 5th
    # max+blur pool): one (512, 7, 7) map
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


# ---- which blocks are tapped, and with which LayerNorm (written out as the reference does it) -----
def _ln(x, ln):
    return torch.nn.functional.layer_norm(x, x.shape[-1:], ln.weight, ln.bias, ln.eps)


def _narrow(cls, **kw):
    """The published depth (12 blocks) and default taps at a few channels: cheap on CPU."""
    torch.manual_seed(0)
    return cls(image_size=32, patch=8, width=16, depth=12, heads=2, **kw).freeze_()


def test_clip_taps_blocks_4_and_8_raw_then_projected_cls():
    from models.nets.vision_backbones import CLIPVisual
    m = _narrow(CLIPVisual, output_dim=8)
    assert m.taps == (4, 8) and _instantiate("clip_vitb32", "base", {}).taps == (4, 8)
    x = torch.randn(2, 3, 32, 32)
    # cvmodel.py CLIP.forward_custom: tokens, ln_pre, then resblocks[0:4], [4:8], [8:12], keeping each output
    t = m.conv1(x).reshape(2, 16, -1).permute(0, 2, 1)
    t = torch.cat([m.class_embedding + torch.zeros(2, 1, 16), t], 1) + m.positional_embedding
    t = _ln(t, m.ln_pre)
    outs = []
    for a, b in [(0, 4), (4, 8), (8, 12)]:
        for blk in m.transformer.resblocks[a:b]:
            t = blk(t)
        outs.append(t)
    expected = [outs[0][:, 1:], outs[1][:, 1:], _ln(outs[2][:, 0], m.ln_post) @ m.proj]
    got = m.levels(x)
    assert len(got) == 3
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    # What the code tapped before (block 6; ln_post of the last block's tokens) is not this.
    assert not torch.allclose(got[1], _ln(outs[2], m.ln_post)[:, 1:], atol=1e-3)


def test_dino_taps_blocks_5_and_9_normed_then_normed_cls():
    from models.nets.vision_backbones import DINOViT
    m = _narrow(DINOViT)
    assert m.taps == (5, 9) and _instantiate("dino_vitb16", "base", {}).taps == (5, 9)
    x = torch.randn(2, 3, 32, 32)
    # facebookresearch/dino VisionTransformer.get_intermediate_layers(x, n=8): norm(output) of each
    # of the last 8 blocks; cvmodel.py DINO.__call__ keeps [0, 4, -1] of them.
    t = m.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat([m.cls_token.expand(2, -1, -1), t], 1) + m.pos_embed
    last8 = []
    for i, blk in enumerate(m.blocks):
        t = blk(t)
        if len(m.blocks) - i <= 8:
            last8.append(_ln(t, m.norm))
    picked = [last8[0], last8[4], last8[-1]]
    expected = [picked[0][:, 1:], picked[1][:, 1:], picked[2][:, 0]]
    got = m.levels(x)
    assert len(got) == 3
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    assert not torch.allclose(got[1], last8[-1][:, 1:], atol=1e-3)   # before: the last block's tokens


@pytest.mark.parametrize("kind", ["clip_vitb32", "dino_vitb16"])
def test_tiny_configs_tap_two_blocks_before_the_last(kind):
    m = _instantiate(kind, "tiny", {})
    depth = len(m.transformer.resblocks if kind == "clip_vitb32" else m.blocks)
    assert m.taps == (1, 2) and depth == 3
    with pytest.raises(ValueError, match="taps"):
        _instantiate(kind, "tiny", {"taps": (2, 2)})
    with pytest.raises(ValueError, match="taps"):
        _instantiate(kind, "tiny", {"taps": (1, 4)})


# ---- VGG: antialiased max-pools (antialiased_cnns.vgg16(filter_size=4)) ---------------------------
BINOMIAL4 = np.outer([1, 3, 3, 1], [1, 3, 3, 1]) / 64.0
BINOMIAL3 = np.outer([1, 2, 1], [1, 2, 1]) / 16.0


def _np_antialiased_pool(x: np.ndarray, filt: np.ndarray) -> np.ndarray:
    """2x2 max at stride 1, reflect pad (k-1)//2 before and k//2 after, k x k blur at stride 2: loops."""
    m = np.maximum.reduce([x[..., :-1, :-1], x[..., 1:, :-1], x[..., :-1, 1:], x[..., 1:, 1:]])
    k = filt.shape[0]
    p = np.pad(m, [(0, 0), (0, 0), ((k - 1) // 2, k // 2), ((k - 1) // 2, k // 2)], mode="reflect")
    oh, ow = (p.shape[2] - k) // 2 + 1, (p.shape[3] - k) // 2 + 1
    out = np.zeros(x.shape[:2] + (oh, ow))
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = (p[:, :, 2 * i:2 * i + k, 2 * j:2 * j + k] * filt).sum((2, 3))
    return out


@pytest.mark.parametrize("size, filt", [(4, BINOMIAL4), (3, BINOMIAL3)])
@pytest.mark.parametrize("hw", [(8, 8), (6, 10), (7, 9)])
def test_antialiased_max_pool_is_max_then_binomial_blur(size, filt, hw):
    from models.nets.vision_backbones import AntialiasedMaxPool
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    got = AntialiasedMaxPool(size).double()(x)
    expected = torch.from_numpy(_np_antialiased_pool(x.numpy(), filt))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)
    if hw[0] % 2 == 0 and size == 4:
        assert got.shape[-2:] == (hw[0] // 2, hw[1] // 2)   # 224 -> 112 -> ... -> 7
    const = AntialiasedMaxPool(size)(torch.full((1, 2, 8, 8), 3.0))
    torch.testing.assert_close(const, torch.full_like(const, 3.0))   # the filter sums to 1
    assert not list(AntialiasedMaxPool(size).state_dict())   # nothing to load: torchvision indices stay


def _vgg_by_hand(m, x: torch.Tensor, pool) -> torch.Tensor:
    """Conv + ReLU at the conv slots, `pool` at the torchvision max-pool slots, nothing else."""
    for mod in m.features:
        if isinstance(mod, torch.nn.Conv2d):
            x = torch.relu(torch.nn.functional.conv2d(x, mod.weight, mod.bias, padding=1))
        elif not isinstance(mod, torch.nn.ReLU):
            x = pool(x)
    return x


def test_vgg_level_is_features_with_antialiased_pools(tmp_path):
    bb = build_backbone("vgg16", save_random_backbone("vgg16", tmp_path / "v.pt", seed=5), size="tiny").double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    blur = lambda t: torch.from_numpy(_np_antialiased_pool(t.numpy(), BINOMIAL4))  # noqa: E731
    (level,) = bb.levels(x)
    assert level.shape == (2, 16, 4, 4)
    torch.testing.assert_close(level, _vgg_by_hand(bb, x, blur))
    plain = _vgg_by_hand(bb, x, lambda t: torch.nn.functional.max_pool2d(t, 2))
    assert not torch.allclose(level, plain, atol=1e-3)   # before: plain max-pools
    mx = build_backbone("vgg16", tmp_path / "v.pt", size="tiny", pool="max").double()
    torch.testing.assert_close(mx.levels(x)[0], plain)   # pool="max": torchvision's network


# tiny VGG, torchvision slots: conv 0, pool 2, conv 3, pool 5, conv 6, conv 8, pool 10;
# antialiased_cnns: conv 0, max 2, blur 3, conv 4, max 6, blur 7, conv 8, conv 10, max 12, blur 13.
TV_TO_LPF = {0: 0, 3: 4, 6: 8, 8: 10}
LPF_BLURS = {3: 8, 7: 16, 13: 16}   # index -> channels


def _lpf_file(tv: dict, size: int = 4) -> dict:
    sd = {f"features.{TV_TO_LPF[int(k.split('.')[1])]}.{k.split('.')[2]}": v for k, v in tv.items()}
    f = torch.from_numpy({4: BINOMIAL4, 3: BINOMIAL3}[size]).float()
    sd |= {f"features.{i}.filt": f[None, None].repeat(c, 1, 1, 1) for i, c in LPF_BLURS.items()}
    return sd | {"classifier.0.weight": torch.ones(3, 3), "classifier.0.bias": torch.ones(3)}


def test_antialiased_cnns_layout_loads_into_torchvision_slots(tmp_path):
    tv = read_state_dict(save_random_backbone("vgg16", tmp_path / "tv.pt", seed=6))
    assert set(tv) == {f"features.{i}.{n}" for i in TV_TO_LPF for n in ("weight", "bias")}
    torch.save({"state_dict": _lpf_file(tv)}, tmp_path / "vgg16_lpf4.pth")   # as antialiased_cnns' files
    got = build_backbone("vgg16", tmp_path / "vgg16_lpf4.pth", size="tiny").external_state_dict()
    assert got.keys() == tv.keys() and all(torch.equal(got[k], tv[k]) for k in tv)
    torch.save(_lpf_file(tv, size=3), tmp_path / "vgg16_lpf3.pth")
    with pytest.raises(BackboneWeightsError, match="blur"):
        build_backbone("vgg16", tmp_path / "vgg16_lpf3.pth", size="tiny")


def test_moby_swin_checkpoint_loads_its_encoder(tmp_path):
    """The reference's Swin weights: MoBY's {'model': {'encoder.*', 'encoder_k.*', 'projector.*', ...}},
    Microsoft layout (patch merging at the end of stages 0..2)."""
    swin = read_state_dict(save_random_backbone("swin_t", tmp_path / "s.pt", seed=7))
    other = read_state_dict(save_random_backbone("swin_t", tmp_path / "o.pt", seed=8))

    def microsoft(sd):
        out = {}
        for k, v in sd.items():
            p = k.split(".")
            if p[0] == "layers" and p[2] == "downsample":
                p[1] = str(int(p[1]) - 1)
            out[".".join(p)] = v
        return out

    model = {f"encoder.{k}": v for k, v in microsoft(swin).items()}
    model |= {f"encoder_k.{k}": v for k, v in microsoft(other).items()}
    model |= {"projector.linear1.weight": torch.ones(4, 4), "queue1": torch.ones(4, 8)}
    torch.save({"model": model, "epoch": 300}, tmp_path / "moby_swin_t_300ep_pretrained.pth")
    got = build_backbone("swin_t", tmp_path / "moby_swin_t_300ep_pretrained.pth", size="tiny").external_state_dict()
    assert all(torch.equal(got[k], swin[k]) for k in swin)
