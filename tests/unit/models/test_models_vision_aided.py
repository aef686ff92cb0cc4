"""Vision-aided discriminator: frozen backbones loaded from external-layout files, heads, losses, probe."""
from __future__ import annotations

import argparse
import time

import pytest
import torch

from models.losses.vision_aided import VisionAidedHeads, choose_backbone, d_loss, g_loss, head_loss, probe_accuracy
from models.nets.vision_backbones import (BACKBONES, Backbone, BackboneWeightsError, build_backbone, feature_dims,
                                     parameter_count, read_state_dict, save_random_backbone)

# Published sizes (no classifier heads): the base configs are the real architectures.
PUBLISHED = {"clip_vitb32": 87_849_216, "dino_vitb16": 85_798_656, "swin_t": 27_519_354, "vgg16": 14_714_688}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Backbone]:
    d = tmp_path_factory.mktemp("weights")
    return {k: build_backbone(k, save_random_backbone(k, d / f"{k}.pt", seed=1), size="tiny") for k in BACKBONES}


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_save_load_external_layout_reproduces_weights(kind, suffix, tmp_path):
    path = save_random_backbone(kind, tmp_path / f"w{suffix}", seed=3)
    saved = read_state_dict(path)
    bb = build_backbone(kind, path, size="tiny")
    assert bb.kind == kind and bb.input_size == 32 and len(bb.mean) == 3 and len(bb.std) == 3
    loaded = bb.external_state_dict()
    assert loaded.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(loaded[k], v), k
    other = read_state_dict(save_random_backbone(kind, tmp_path / f"o{suffix}", seed=4))
    assert any(not torch.equal(other[k], v) for k, v in saved.items())   # the seed matters


def test_external_key_names(tmp_path):
    keys = {k: set(read_state_dict(save_random_backbone(k, tmp_path / f"{k}.pt"))) for k in BACKBONES}
    assert {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj",
            "visual.transformer.resblocks.0.attn.in_proj_weight", "visual.transformer.resblocks.1.mlp.c_proj.bias",
            "visual.ln_post.weight"} <= keys["clip_vitb32"]
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias",
            "norm.weight"} <= keys["dino_vitb16"]
    assert {"patch_embed.proj.weight", "patch_embed.norm.weight", "layers.0.blocks.1.attn.relative_position_bias_table",
            "layers.1.downsample.reduction.weight", "layers.3.downsample.norm.bias", "norm.weight"} <= keys["swin_t"]
    assert not any("relative_position_index" in k or "attn_mask" in k or k.startswith("layers.0.downsample")
                   for k in keys["swin_t"])
    assert {"features.0.weight", "features.0.bias"} <= keys["vgg16"]


def test_wrapped_and_foreign_layouts_load(tmp_path):
    """Full CLIP (text tower ignored), tower without `visual.`, DDP/`state_dict` wrappers, DINO
    teacher, old Swin layout, classifier heads and stale buffers ignored."""
    clip = read_state_dict(save_random_backbone("clip_vitb32", tmp_path / "c.pt"))
    full = {**clip, "transformer.resblocks.0.ln_1.weight": torch.ones(3), "token_embedding.weight": torch.ones(2, 2),
            "logit_scale": torch.tensor(1.0)}
    torch.save({"state_dict": {"module." + k: v for k, v in full.items()}}, tmp_path / "full.pth")
    torch.save({k.removeprefix("visual."): v.half() for k, v in clip.items()}, tmp_path / "tower.bin")
    ref = build_backbone("clip_vitb32", tmp_path / "c.pt", size="tiny").external_state_dict()
    for name in ("full.pth", "tower.bin"):
        got = build_backbone("clip_vitb32", tmp_path / name, size="tiny").external_state_dict()
        assert all(torch.allclose(got[k], ref[k], atol=1e-2) for k in ref)

    dino = read_state_dict(save_random_backbone("dino_vitb16", tmp_path / "d.pt"))
    torch.save({"teacher": {"backbone." + k: v for k, v in dino.items()} | {"head.mlp.0.weight": torch.ones(2)},
                "student": {}}, tmp_path / "dino_ckpt.pth")
    got = build_backbone("dino_vitb16", tmp_path / "dino_ckpt.pth", size="tiny").external_state_dict()
    assert all(torch.equal(got[k], dino[k]) for k in dino)

    swin = read_state_dict(save_random_backbone("swin_t", tmp_path / "s.pt"))
    old = {}
    for k, v in swin.items():   # Microsoft layout: merging at the end of the previous stage
        p = k.split(".")
        if p[0] == "layers" and p[2] == "downsample":
            p[1] = str(int(p[1]) - 1)
        old[".".join(p)] = v
    old["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    old["head.weight"] = torch.ones(5, 128)
    torch.save({"model": old}, tmp_path / "swin_ms.pth")
    got = build_backbone("swin_t", tmp_path / "swin_ms.pth", size="tiny").external_state_dict()
    assert all(torch.equal(got[k], swin[k]) for k in swin)

    vgg = read_state_dict(save_random_backbone("vgg16", tmp_path / "v.pt"))
    torch.save(vgg | {"classifier.0.weight": torch.ones(3, 3)}, tmp_path / "vgg_tv.pth")
    build_backbone("vgg16", tmp_path / "vgg_tv.pth", size="tiny")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_torchscript_archive_loads(tmp_path):
    """OpenAI's CLIP .pt files are TorchScript archives."""
    src = build_backbone("clip_vitb32", save_random_backbone("clip_vitb32", tmp_path / "c.pt"), size="tiny")

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.visual = src

        def forward(self, x):
            return x * 2

    torch.jit.trace(Holder(), torch.ones(1)).save(str(tmp_path / "ViT-B-32.pt"))
    got = build_backbone("clip_vitb32", tmp_path / "ViT-B-32.pt", size="tiny").external_state_dict()
    ref = src.external_state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.parametrize("kind", BACKBONES)
def test_missing_file_names_path_and_spec_key(kind, tmp_path):
    missing = tmp_path / "nope" / "weights.safetensors"
    with pytest.raises(FileNotFoundError) as e:
        build_backbone(kind, missing, size="tiny")
    assert str(missing) in str(e.value) and f"model.vision_aided.weights.{kind}" in str(e.value)
    with pytest.raises(FileNotFoundError, match=kind):
        build_backbone(kind, None, size="tiny")


def test_missing_key_and_wrong_shape_are_named(tmp_path):
    sd = read_state_dict(save_random_backbone("clip_vitb32", tmp_path / "c.pt"))
    del sd["visual.transformer.resblocks.1.ln_2.bias"]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(BackboneWeightsError) as e:
        build_backbone("clip_vitb32", tmp_path / "broken.pt", size="tiny")
    assert "broken.pt" in str(e.value) and "visual.transformer.resblocks.1.ln_2.bias" in str(e.value)

    base_keys = tmp_path / "tiny_vgg.safetensors"
    save_random_backbone("vgg16", base_keys)
    with pytest.raises(BackboneWeightsError, match="features.0.weight"):   # a tiny file is not VGG-16
        build_backbone("vgg16", base_keys, size="base")

    torch.save({"args": argparse.Namespace(arch="vit_base")}, tmp_path / "pickle.pth")   # as DINO's full checkpoints
    with pytest.raises(BackboneWeightsError, match="weights_only"):
        build_backbone("dino_vitb16", tmp_path / "pickle.pth", size="tiny")


@pytest.mark.parametrize("kind", BACKBONES)
def test_forward_levels_and_gradients(kind, tiny):
    bb = tiny[kind]
    dims = feature_dims(kind, "tiny")
    assert bb.level_dims == dims and len(dims) == (3 if bb.multilevel else 1)   # test_models_vision_levels.py
    assert not bb.training and all(not p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training   # stays frozen under a parent's .train()
    for shape in [(2, 1, 16, 16), (2, 3, 40, 40)]:
        x = (torch.rand(shape) * 2 - 1).requires_grad_(True)
        levels = bb(x)
        assert len(levels) == len(dims)
        maps = levels[:-1] if bb.multilevel else levels
        for lvl, c in zip(maps, dims):
            if kind in ("clip_vitb32", "dino_vitb16"):   # tokens (N, L, C)
                assert lvl.ndim == 3 and lvl.shape[0] == 2 and lvl.shape[2] == c
            else:                                        # maps (N, C, H, W)
                assert lvl.ndim == 4 and lvl.shape[:2] == (2, c)
        if bb.multilevel:
            assert levels[-1].shape == (2, dims[-1])
            torch.testing.assert_close(bb.pooled(x), levels[-1])
        assert all(torch.isfinite(v).all() for v in levels)
        sum(v.square().mean() for v in levels).backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        assert all(p.grad is None for p in bb.parameters())


def test_grayscale_equals_repeated_rgb(tiny):
    x = torch.rand(2, 1, 24, 24) * 2 - 1
    for bb in tiny.values():
        torch.testing.assert_close(bb.pooled(x), bb.pooled(x.repeat(1, 3, 1, 1)))


def test_heads_losses_and_gradient_paths(tiny):
    heads = VisionAidedHeads({k: feature_dims(k, "tiny") for k in BACKBONES})
    assert set(VisionAidedHeads(tiny).state_dict()) == set(heads.state_dict())   # built from backbones too
    torch.manual_seed(0)
    real = torch.rand(3, 1, 32, 32) * 2 - 1
    fake = (torch.rand(3, 1, 32, 32) * 2 - 1).requires_grad_(True)
    with torch.no_grad():
        real_f = {k: bb(real) for k, bb in tiny.items()}
    fake_f = {k: bb(fake) for k, bb in tiny.items()}
    real_l, fake_l = heads(real_f), heads(fake_f)
    for kind, levels in fake_l.items():
        assert len(levels) == len(feature_dims(kind, "tiny")) and levels[-1].shape == (3,)
        assert all(v.ndim in (1, 2) and v.shape[0] == 3 for v in levels)

    heads.zero_grad()
    d_loss(real_l, {k: [v.detach() for v in ls] for k, ls in fake_l.items()}).backward()
    for kind in BACKBONES:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in heads.parameters_of(kind)), kind

    heads.zero_grad()
    g_loss(heads(fake_f)).backward()
    assert fake.grad is not None and fake.grad.abs().sum() > 0
    assert all(p.grad is None for bb in tiny.values() for p in bb.parameters())


def test_loss_values_and_one_sided_smoothing():
    real = [torch.tensor([2.0, -1.0]), torch.tensor([[0.5, 0.0], [1.0, -3.0]])]
    fake = [torch.tensor([-2.0, 1.0]), torch.tensor([[0.0, 0.3], [-1.0, 2.0]])]
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expect = sum(bce(r, torch.ones_like(r)) + bce(f, torch.zeros_like(f)) for r, f in zip(real, fake))
    torch.testing.assert_close(d_loss(real, fake), expect)
    torch.testing.assert_close(d_loss({"a": real, "b": real}, {"a": fake, "b": fake}), 2 * expect)
    torch.testing.assert_close(g_loss(fake), sum(bce(f, torch.ones_like(f)) for f in fake))
    # With smoothing the generator's target is smoothed too (0.8), as the reference's.
    torch.testing.assert_close(g_loss(fake, label_smooth=0.2), sum(bce(f, torch.full_like(f, 0.8)) for f in fake))
    for s in (0.0, 0.2):   # smoothing moves only the real term
        torch.testing.assert_close(d_loss(real, fake, label_smooth=s) - head_loss(real, True, s),
                                   head_loss(fake, False))
    assert not torch.isclose(head_loss(real, True, 0.2), head_loss(real, True, 0.0))
    torch.testing.assert_close(head_loss(fake, False, 0.2), head_loss(fake, False, 0.0))
    torch.testing.assert_close(head_loss(real, True, 0.2),
                               sum(bce(r, torch.full_like(r, 0.8)) for r in real))


def test_probe_and_choose_backbone():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(80, 16, generator=g), torch.randn(80, 16, generator=g)
    separable = (a + 4 * torch.eye(16)[0], b - 4 * torch.eye(16)[0])
    same = (a, b)
    assert probe_accuracy(*separable) > 0.97
    assert abs(probe_accuracy(*same, repeats=5) - 0.5) < 0.15
    kind, acc = choose_backbone({"dino_vitb16": same, "swin_t": separable, "vgg16": same})
    assert kind == "swin_t" and set(acc) == {"dino_vitb16", "swin_t", "vgg16"}
    kind, acc = choose_backbone({"dino_vitb16": same, "swin_t": separable, "vgg16": same}, exclude=("swin_t",))
    assert kind in ("dino_vitb16", "vgg16") and "swin_t" not in acc
    with pytest.raises(ValueError):
        choose_backbone({"swin_t": separable}, exclude=["swin_t"])


def test_probe_is_the_references_logistic_regression():
    """Written out independently: three random 50/50 splits of each side (the reference halves its
    reals and its fakes), LogisticRegression(C=0.2) on the raw features, held-out accuracy averaged."""
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(60, 8, generator=g) + 0.4, torch.randn(60, 8, generator=g) * 3   # unequal scales
    got = probe_accuracy(real, fake, repeats=3, seed=0)
    from sklearn.model_selection import StratifiedShuffleSplit

    x = torch.cat([real, fake]).double().numpy()
    y = [1] * 60 + [0] * 60
    scores = []
    for train, test in StratifiedShuffleSplit(n_splits=3, test_size=0.5, random_state=0).split(x, y):
        assert sum(y[i] for i in test) == 30                  # half of each side held out
        clf = LogisticRegression(C=0.2, max_iter=5000, random_state=0).fit(x[train], [y[i] for i in train])
        scores.append(clf.score(x[test], [y[i] for i in test]))
    assert got == pytest.approx(sum(scores) / 3, abs=1e-12)


def test_base_architectures_have_published_parameter_counts():
    start = time.perf_counter()
    for kind, n in PUBLISHED.items():
        if time.perf_counter() - start > 10:
            pytest.skip("instantiating the base backbones took > 10 s")
        assert parameter_count(kind, "base") == n, kind
    assert feature_dims("clip_vitb32") == [768, 768, 512] and feature_dims("swin_t") == [768]
