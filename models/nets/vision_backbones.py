"""Frozen pretrained feature backbones for the vision-aided discriminator loss (MINEAUG.md §2).

Four kinds, each written so that its parameter names ARE the layout of the published
checkpoints, so a user points `model.vision_aided.weights.<kind>` at a real local file:

- `clip_vitb32`: CLIP ViT-B/32 image tower, open_clip / OpenAI layout (`visual.conv1.weight`,
  `visual.transformer.resblocks.{i}.attn.in_proj_weight`, `visual.proj`, ...).
- `dino_vitb16`: DINO ViT-B/16, timm `vit_base_patch16_224.dino` / facebookresearch layout
  (`cls_token`, `pos_embed`, `blocks.{i}.attn.qkv.weight`, `norm`, ...).
- `swin_t`: Swin-T, timm >= 0.9 layout (`layers.{s}.downsample` at the start of stages 1..3);
  the older Microsoft / timm < 0.9 layout (downsample at the end of stages 0..2) is converted.
- `vgg16`: torchvision / timm `features.{i}.weight` conv layout; antialiased_cnns' `vgg16` layout
  (the reference's weights, `vgg16_lpf4`) is converted on loading.

Every backbone takes images in [-1, 1] (any size, 1 or 3 channels) and returns the list of
feature levels that the vision-aided reference (Kumari et al., github.com/nupurkmr9/vision-aided-gan,
`vision_aided_loss/cvmodel.py`) gives its discriminator heads. Blocks are counted from 1:

- `clip_vitb32` (`CLIP.forward_custom`, `feat_points = [0, 4, 8, 12]`, "conv_multi_level"): the
  patch tokens (N, 49, 768) after blocks 4 and 8, raw (no ln_post, CLS dropped), then
  ln_post(CLS after block 12) @ proj (N, 512), CLIP's image embedding.
- `dino_vitb16` (`DINO.__call__`, `get_intermediate_layers(x, n=8)` picked at [0, 4, -1]; that
  DINO method applies `norm` to every output): norm(patch tokens) (N, 196, 768) after blocks 5
  and 9, then norm(CLS after block 12) (N, 768), DINO's image embedding.
- `swin_t` (`Swin.forward_custom(return_intermediate=True)`): norm(stage-4 tokens) as one map
  (N, 768, 7, 7). The reference's weights are the self-supervised MoBY Swin-T
  (`moby_swin_t_300ep_pretrained.pth`, its `encoder.` keys), which load here as they are.
- `vgg16` (`Vgg`: `antialiased_cnns.vgg16(filter_size=4).features`): the whole `features`, every
  max-pool an antialiased one (2x2 max at stride 1, then a [1,3,3,1]x[1,3,3,1]/64 blur at stride 2
  after reflection padding 1 before / 2 after): one map (N, 512, 7, 7).

Token levels stay (N, L, C) in patch-grid row order; the heads put them back on the grid as the
reference's `permute(0, 2, 1).reshape(-1, C, side, side)` does. CLIP and DINO are `multilevel`
(the reference's `MultiLevelDViT`, one head per level, the last an MLP on the embedding); Swin and
VGG single-level (`SimpleD`, one head on the map). The taps are constructor arguments (`taps`),
the published ones by default; the tiny configs tap blocks 1 and 2 of 3.

Preprocessing (not a tap point) still differs: the resize to the input size is bilinear with
antialiasing (the reference: `F.interpolate(mode='area')`), and DINO and Swin normalise with
ImageNet's mean and std (the reference: CLIP's mean with ImageNet's std, which matches neither
network's training and looks like a slip).

`level_dims` gives each level's channels, `multilevel` which of the two layouts a backbone has.
`pooled` is what the linear probe reads (the reference's `pool` output): the embedding of a
multilevel backbone, the spatial mean of a single-level one's map. The parameters are frozen,
but gradients flow to the input: the generator trains through the backbone.

`size="tiny"` builds the same classes with a few channels (input 32) so tests run on CPU.
VGG's pooling is a constructor option (`pool="blur"`, the reference's, or `"max"`, plain
torchvision); `build_backbone` keeps the default, so torchvision's max-pool-trained `vgg16`
weights run through blur pools: for the reference's network use antialiased_cnns'
`vgg16_lpf4` weights.
"""
from __future__ import annotations

import math
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKBONES: tuple[str, ...] = ("clip_vitb32", "dino_vitb16", "swin_t", "vgg16")
Size = Literal["base", "tiny"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The base entries are the published architectures; tiny ones keep every code path (CLS token,
# two intermediate taps before the last block, shifted windows, patch merging, blur pools) at a
# few channels.
_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "clip_vitb32": {
        "base": dict(image_size=224, patch=32, width=768, depth=12, heads=12, output_dim=512, taps=(4, 8)),
        "tiny": dict(image_size=32, patch=8, width=32, depth=3, heads=2, output_dim=16, taps=(1, 2)),
    },
    "dino_vitb16": {
        "base": dict(image_size=224, patch=16, width=768, depth=12, heads=12, taps=(5, 9)),
        "tiny": dict(image_size=32, patch=8, width=32, depth=3, heads=2, taps=(1, 2)),
    },
    "swin_t": {
        "base": dict(image_size=224, patch=4, embed_dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), window=7),
        "tiny": dict(image_size=32, patch=2, embed_dim=16, depths=(2, 2, 2, 1), heads=(1, 2, 2, 4), window=2),
    },
    "vgg16": {
        "base": dict(image_size=224, stages=((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))),
        "tiny": dict(image_size=32, stages=((8,), (16,), (16, 16))),
    },
}


class BackboneWeightsError(ValueError):
    """A weights file that cannot be read, or is not the expected layout / shapes."""


def _spec_hint(kind: str) -> str:
    return f"model.vision_aided.weights.{kind}"


# ---- the common part ---------------------------------------------------------------------------
class Backbone(nn.Module):
    """A frozen feature extractor; subclasses define the network and `levels`."""

    kind: str = ""
    # True: maps, then a pooled embedding last (CLIP, DINO); False: one feature map (Swin, VGG).
    multilevel: bool = True
    external_prefix: str = ""   # what the published files put before this module's own keys
    anchor: str = ""            # a key every checkpoint of the kind has: finds wrapper prefixes

    def __init__(self, *, input_size: int, mean: tuple[float, ...], std: tuple[float, ...], level_dims: list[int]):
        super().__init__()
        self.input_size = int(input_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.level_dims = list(level_dims)
        # Not persistent: the state dict stays exactly the external layout.
        self.register_buffer("_norm_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_norm_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, x: Tensor) -> Tensor:
        """[-1, 1] images of any size, 1 or 3 channels -> normalised (N, 3, input_size, input_size)."""
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{self.kind}: expected images (N, 1 or 3, H, W), got {tuple(x.shape)}")
        x = (x.to(self._norm_mean.dtype) + 1) / 2
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        s = self.input_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return (x - self._norm_mean) / self._norm_std

    def levels(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor) -> list[Tensor]:
        return self.levels(self.preprocess(x))

    def pooled(self, x: Tensor) -> Tensor:
        """One (N, C) vector per image (what the linear probe reads): the last level, averaged over
        space when it is a map."""
        last = self(x)[-1]
        return last if self.multilevel else last.mean((2, 3))

    def train(self, mode: bool = True) -> "Backbone":
        return super().train(False)   # frozen means frozen: a parent's .train() must not flip it

    def freeze_(self) -> "Backbone":
        self.requires_grad_(False)
        return self.eval()

    # ---- the external layout -------------------------------------------------------------------
    def external_state_dict(self) -> dict[str, Tensor]:
        """The weights under the names the published checkpoints use."""
        return {self.external_prefix + k: v.detach().clone().contiguous() for k, v in self.state_dict().items()}

    def _from_legacy(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        return sd

    def load_external(self, sd: Mapping[str, Tensor], source: str = "<state dict>") -> None:
        """Loads a checkpoint's tensors; ignores keys it does not know (heads, text tower, buffers)."""
        prefixes = sorted({k[: -len(self.anchor)] for k in sd if k.endswith(self.anchor)}, key=len)
        prefix = prefixes[0] if prefixes else self.external_prefix
        picked = self._from_legacy({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        own = self.state_dict()
        missing = [k for k in own if k not in picked]
        if missing:
            raise BackboneWeightsError(
                f"{source}: not a {self.kind} checkpoint of this size in the expected layout: "
                f"{len(missing)} of {len(own)} required keys missing, first: {[prefix + k for k in missing[:5]]} "
                f"(the file's keys begin {list(sd)[:4]}; see {_spec_hint(self.kind)})")
        wrong = [(prefix + k, tuple(picked[k].shape), tuple(v.shape)) for k, v in own.items()
                 if picked[k].shape != v.shape]
        if wrong:
            raise BackboneWeightsError(f"{source}: shapes differ from {self.kind} (key, file, expected): {wrong[:5]}")
        self.load_state_dict({k: picked[k] for k in own}, strict=True)


def _layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=eps)


class QuickGELU(nn.Module):
    """x·sigmoid(1.702x): the activation the OpenAI CLIP weights were trained with."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act(), nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ---- CLIP ViT-B/32 (open_clip / OpenAI layout) ---------------------------------------------------
class _CLIPBlock(nn.Module):
    def __init__(self, width: int, heads: int, act: type[nn.Module]):
        super().__init__()
        self.ln_1 = _layer_norm(width, 1e-5)
        # nn.MultiheadAttention's parameter names (in_proj_weight, out_proj) are CLIP's.
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = _layer_norm(width, 1e-5)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=act(),
                                             c_proj=nn.Linear(4 * width, width)))

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _CLIPTransformer(nn.Module):
    def __init__(self, width: int, depth: int, heads: int, act: type[nn.Module]):
        super().__init__()
        self.resblocks = nn.ModuleList(_CLIPBlock(width, heads, act) for _ in range(depth))


def _check_taps(kind: str, taps: tuple[int, ...], depth: int) -> tuple[int, int]:
    """The two intermediate taps: numbers of blocks run (1-based), increasing, within the depth."""
    taps = tuple(int(t) for t in taps)
    if len(taps) != 2 or not 1 <= taps[0] < taps[1] <= depth:
        raise ValueError(f"{kind}: taps must be two block counts 1 <= a < b <= depth={depth}, got {taps}")
    return taps


class CLIPVisual(Backbone):
    """Levels, as the reference's `CLIP.forward_custom` (`feat_points = [0, 4, 8, 12]`):
    [patch tokens after block `taps[0]` (N, L, width), patch tokens after block `taps[1]`
    (N, L, width), ln_post(CLS after the last block) @ proj (N, output_dim) = CLIP's image
    embedding]. The two token levels are the raw residual stream: no ln_post, CLS dropped."""

    kind, external_prefix, anchor = "clip_vitb32", "visual.", "conv1.weight"

    def __init__(self, *, image_size: int = 224, patch: int = 32, width: int = 768, depth: int = 12, heads: int = 12,
                 output_dim: int = 512, act: Literal["quick_gelu", "gelu"] = "quick_gelu",
                 taps: tuple[int, int] = (4, 8)):
        super().__init__(input_size=image_size, mean=CLIP_MEAN, std=CLIP_STD, level_dims=[width, width, output_dim])
        if act not in ("quick_gelu", "gelu"):
            raise ValueError(f"clip act must be 'quick_gelu' (OpenAI weights) or 'gelu', got {act!r}")
        self.taps = _check_taps(self.kind, taps, depth)
        grid = image_size // patch
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = _layer_norm(width, 1e-5)
        self.transformer = _CLIPTransformer(width, depth, heads, QuickGELU if act == "quick_gelu" else nn.GELU)
        self.ln_post = _layer_norm(width, 1e-5)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def levels(self, x: Tensor) -> list[Tensor]:
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], 1) + self.positional_embedding.to(x.dtype))
        maps = []
        for n, block in enumerate(self.transformer.resblocks, start=1):
            x = block(x)
            if n in self.taps:
                maps.append(x[:, 1:])
        return [*maps, self.ln_post(x[:, 0]) @ self.proj]


# ---- DINO ViT-B/16 (timm / facebookresearch layout) ---------------------------------------------
class _QKVAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, length, c = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, c))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.attn = _layer_norm(dim, 1e-6), _QKVAttention(dim, heads)
        self.norm2, self.mlp = _layer_norm(dim, 1e-6), _Mlp(dim, 4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int, norm: bool = False):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)
        if norm:
            self.norm = _layer_norm(dim, 1e-5)


class DINOViT(Backbone):
    """Levels, as the reference's `DINO.__call__` (`get_intermediate_layers(x, n=8)[0, 4, -1]`, each
    of those outputs passed through `norm`): [norm(patch tokens after block `taps[0]`) (N, L, 768),
    norm(patch tokens after block `taps[1]`) (N, L, 768), norm(CLS after the last block) (N, 768) =
    DINO's image embedding]. Of 12 blocks the last 8 are blocks 5..12, so [0] and [4] are 5 and 9."""

    kind, anchor = "dino_vitb16", "patch_embed.proj.weight"

    def __init__(self, *, image_size: int = 224, patch: int = 16, width: int = 768, depth: int = 12, heads: int = 12,
                 taps: tuple[int, int] = (5, 9)):
        super().__init__(input_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, level_dims=[width] * 3)
        self.taps = _check_taps(self.kind, taps, depth)
        grid = image_size // patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, grid * grid + 1, width))
        self.patch_embed = _PatchEmbed(patch, width)
        self.blocks = nn.ModuleList(_ViTBlock(width, heads) for _ in range(depth))
        self.norm = _layer_norm(width, 1e-6)
        nn.init.normal_(self.cls_token, std=1e-6)

    def levels(self, x: Tensor) -> list[Tensor]:
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        maps = []
        for n, block in enumerate(self.blocks, start=1):
            x = block(x)
            if n in self.taps:
                maps.append(self.norm(x[:, 1:]))   # LayerNorm is per token: as norm(x)[:, 1:]
        return [*maps, self.norm(x[:, 0])]


# ---- Swin-T (timm >= 0.9 layout) -----------------------------------------------------------------
def _relative_position_index(ws: int) -> Tensor:
    """Index into the (2ws-1)^2 bias table for each (query, key) pair of a ws x ws window."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def _to_windows(x: Tensor, ws: int) -> Tensor:
    """(B, H, W, C) -> (B * windows, ws * ws, C), windows of one image consecutive."""
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def _from_windows(x: Tensor, ws: int, b: int, h: int, w: int) -> Tensor:
    return x.view(b, h // ws, w // ws, ws, ws, -1).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


class _WindowAttention(nn.Module):
    def __init__(self, dim: int, heads: int, ws: int):
        super().__init__()
        self.heads = heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(0.02 * torch.randn((2 * ws - 1) ** 2, heads))
        # Derived from the window size, so computed here; a copy in a file is ignored.
        self.register_buffer("relative_position_index", _relative_position_index(ws), persistent=False)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).view(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1) + bias.permute(2, 0, 1)
        if mask is not None:   # (windows, n, n): keeps shifted windows from mixing wrapped-around regions
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, self.heads, n, n) + mask[None, :, None]).view(bw, self.heads, n, n)
        return self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c))


class _SwinBlock(nn.Module):
    def __init__(self, dim: int, heads: int, resolution: int, window: int, shift: bool):
        super().__init__()
        # As timm: a window no smaller than the map covers it whole, and then there is nothing to shift.
        self.ws = min(window, resolution)
        self.shift = self.ws // 2 if shift and resolution > window else 0
        if resolution % self.ws:
            raise ValueError(f"swin: map side {resolution} is not a multiple of the window {self.ws}")
        self.norm1, self.attn = _layer_norm(dim, 1e-5), _WindowAttention(dim, heads, self.ws)
        self.norm2, self.mlp = _layer_norm(dim, 1e-5), _Mlp(dim, 4 * dim)
        self.register_buffer("attn_mask", self._mask(resolution) if self.shift else None, persistent=False)

    def _mask(self, r: int) -> Tensor:
        """-100 between tokens of a shifted window that came from different regions of the map."""
        ws, s = self.ws, self.shift
        region = torch.zeros(1, r, r, 1)
        cuts = ((0, r - ws), (r - ws, r - s), (r - s, r))
        for i, (h0, h1) in enumerate(cuts):
            for j, (w0, w1) in enumerate(cuts):
                region[:, h0:h1, w0:w1] = 3 * i + j
        ids = _to_windows(region, ws).squeeze(-1)
        diff = ids[:, None, :] - ids[:, :, None]
        return torch.where(diff != 0, -100.0, 0.0)

    def forward(self, x: Tensor) -> Tensor:   # (B, H, W, C)
        b, h, w, c = x.shape
        y = self.norm1(x)
        if self.shift:
            y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
        y = _from_windows(self.attn(_to_windows(y, self.ws), self.attn_mask), self.ws, b, h, w)
        if self.shift:
            y = torch.roll(y, (self.shift, self.shift), (1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class _PatchMerging(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm, self.reduction = _layer_norm(4 * dim, 1e-5), nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        # Channel order of the 2x2 neighbours: (0,0), (1,0), (0,1), (1,1), as the weights expect.
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class _SwinStage(nn.Module):
    def __init__(self, dim: int, out_dim: int, resolution: int, depth: int, heads: int, window: int, downsample: bool):
        super().__init__()
        self.downsample = _PatchMerging(dim, out_dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*(_SwinBlock(out_dim, heads, resolution, window, shift=i % 2 == 1)
                                      for i in range(depth)))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.downsample(x))


class SwinT(Backbone):
    """One level: [norm(stage-4 map) (N, 768, 7, 7)], as the reference's `Swin.forward_custom`
    (layers, norm, tokens transposed to (N, 768, 49) and reshaped to 7x7: our permute of the
    (N, 7, 7, 768) map); `pooled` is its spatial mean = timm's pooled features (the reference's
    probe reads `forward_features`)."""

    kind, anchor = "swin_t", "patch_embed.proj.weight"
    multilevel = False

    def __init__(self, *, image_size: int = 224, patch: int = 4, embed_dim: int = 96,
                 depths: tuple[int, ...] = (2, 2, 6, 2), heads: tuple[int, ...] = (3, 6, 12, 24), window: int = 7):
        dims = [embed_dim * 2**i for i in range(len(depths))]
        super().__init__(input_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, level_dims=[dims[-1]])
        self.patch_embed = _PatchEmbed(patch, embed_dim, norm=True)
        res = image_size // patch
        stages = []
        for i, (depth, h) in enumerate(zip(depths, heads)):
            res = res // 2 if i > 0 else res
            stages.append(_SwinStage(dims[max(i - 1, 0)], dims[i], res, depth, h, window, downsample=i > 0))
        self.layers = nn.ModuleList(stages)
        self.norm = _layer_norm(dims[-1], 1e-5)

    def _from_legacy(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        # Microsoft's and timm < 0.9 checkpoints merge patches at the END of stages 0..2.
        if "layers.0.downsample.reduction.weight" not in sd:
            return sd
        out = {}
        for k, v in sd.items():
            parts = k.split(".")
            if len(parts) > 2 and parts[0] == "layers" and parts[2] == "downsample":
                parts[1] = str(int(parts[1]) + 1)
            out[".".join(parts)] = v
        return out

    def levels(self, x: Tensor) -> list[Tensor]:
        x = self.patch_embed.norm(self.patch_embed.proj(x).permute(0, 2, 3, 1))
        for stage in self.layers:
            x = stage(x)
        return [self.norm(x).permute(0, 3, 1, 2)]


# ---- VGG-16 (torchvision / timm `features` layout; antialiased_cnns' too) -------------------------
def _binomial_filter(size: int) -> Tensor:
    """(size, size) outer product of row `size - 1` of Pascal's triangle, summing to 1
    (4: [1, 3, 3, 1] x [1, 3, 3, 1] / 64)."""
    row = torch.tensor([math.comb(size - 1, k) for k in range(size)], dtype=torch.float64)
    return (torch.outer(row, row) / row.sum() ** 2).float()


class AntialiasedMaxPool(nn.Module):
    """Zhang's (ICML 2019) antialiased max-pool, as `antialiased_cnns.vgg16` has in place of each
    MaxPool2d(2, 2): a 2x2 max at stride 1, then a binomial blur of side `size` at stride 2 after
    reflection padding of (size - 1) // 2 before and size // 2 after (4: 1 and 2), so H -> H / 2
    for even H. No parameters, and its filter is not in the state dict: the slot keeps the
    torchvision index of the max-pool it replaces."""

    def __init__(self, size: int = 4):
        super().__init__()
        if not 1 <= size <= 7:
            raise ValueError(f"vgg16: blur filter size must be 1..7 (antialiased_cnns' range), got {size}")
        self.size = int(size)
        self.pad = ((size - 1) // 2, size // 2) * 2   # (left, right, top, bottom)
        self.register_buffer("filter", _binomial_filter(size)[None, None], persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(x, 2, stride=1)
        x = F.pad(x, self.pad, mode="reflect")
        c = x.shape[1]
        return F.conv2d(x, self.filter.to(x.dtype).expand(c, 1, -1, -1), stride=2, groups=c)


class VGG16(Backbone):
    """One level: [the output of all of `features` (N, 512, 7, 7)], as the reference's `Vgg`
    (`antialiased_cnns.vgg16(pretrained=True, filter_size=4).features`): every max-pool is an
    `AntialiasedMaxPool(4)` (`pool="max"`: torchvision's plain MaxPool2d(2, 2)). Tiny: the output
    of its last stage's pool. `pooled` is the map's spatial mean (the reference's `pool`).

    Parameter names are torchvision's (`features.{i}`, pools at 4, 9, 16, 23, 30); the
    antialiased_cnns layout (max-pool and blur in two slots, so later indices shift, with `filt`
    buffers) is recognised and converted on loading."""

    kind, anchor = "vgg16", "features.0.weight"
    multilevel = False

    def __init__(self, *, image_size: int = 224,
                 stages: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256,) * 3, (512,) * 3, (512,) * 3),
                 pool: Literal["blur", "max"] = "blur", blur_size: int = 4):
        super().__init__(input_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, level_dims=[stages[-1][-1]])
        if pool not in ("blur", "max"):
            raise ValueError(f"vgg16 pool must be 'blur' (the reference's antialiased VGG) or 'max', got {pool!r}")
        self.pool, self.blur_size = pool, int(blur_size)
        layers: list[nn.Module] = []
        c = 3
        for widths in stages:
            for w in widths:
                layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU()]
                c = w
            layers.append(AntialiasedMaxPool(self.blur_size) if pool == "blur" else nn.MaxPool2d(2, 2))
        self.features = nn.Sequential(*layers)   # same indices as torchvision's vgg16().features

    def _from_legacy(self, sd: dict[str, Tensor]) -> dict[str, Tensor]:
        # antialiased_cnns: each pool is two modules (MaxPool2d(2, 1), BlurPool with a `filt` buffer),
        # so the k-th torchvision slot is at k + (pools before it) there.
        filts = {k: v for k, v in sd.items() if k.startswith("features.") and k.endswith(".filt")}
        if not filts:
            return sd
        sizes = {tuple(v.shape[-2:]) for v in filts.values()}
        if self.pool == "blur" and sizes != {(self.blur_size, self.blur_size)}:
            raise BackboneWeightsError(f"vgg16: the file's blur filters are {sorted(sizes)}, this backbone's "
                                       f"{self.blur_size}x{self.blur_size} (blur_size)")
        out = {k: v for k, v in sd.items() if not k.startswith("features.")}
        pools = 0
        for i, module in enumerate(self.features):
            for name in ("weight", "bias"):
                key = f"features.{i + pools}.{name}"
                if key in sd:
                    out[f"features.{i}.{name}"] = sd[key]
            if isinstance(module, (AntialiasedMaxPool, nn.MaxPool2d)):
                pools += 1
        return out

    def levels(self, x: Tensor) -> list[Tensor]:
        return [self.features(x)]


_CLASSES: dict[str, type[Backbone]] = {"clip_vitb32": CLIPVisual, "dino_vitb16": DINOViT, "swin_t": SwinT,
                                       "vgg16": VGG16}


# ---- files -----------------------------------------------------------------------------------------
def _check(kind: str, size: str) -> type[Backbone]:
    if kind not in _CLASSES:
        raise ValueError(f"unknown backbone {kind!r}; one of {list(BACKBONES)}")
    if size not in ("base", "tiny"):
        raise ValueError(f"backbone size must be 'base' or 'tiny', got {size!r}")
    return _CLASSES[kind]


def _instantiate(kind: str, size: str, options: Mapping[str, Any]) -> Backbone:
    return _check(kind, size)(**{**_CONFIGS[kind][size], **options})


def _is_torchscript(path: Path) -> bool:
    """OpenAI's CLIP .pt files are TorchScript archives (they hold code, besides data.pkl)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("/constants.pkl") for name in z.namelist())


def _unwrap(obj: Any, source: Path) -> dict[str, Tensor]:
    # Training checkpoints nest the weights: {"state_dict": ...}, {"model": ...}, DINO's {"teacher": ...}.
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in ("state_dict", "model", "teacher", "module") if isinstance(obj.get(k), Mapping)),
                     None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise BackboneWeightsError(f"{source}: holds a {type(obj).__name__}, not a state dict of tensors")
    return {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a .safetensors, .pt/.pth/.bin (torch.save, weights_only) or TorchScript file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path), device="cpu")
    if _is_torchscript(path):
        with warnings.catch_warnings():   # torch.jit is deprecated, but it is how these files are written
            warnings.simplefilter("ignore", DeprecationWarning)
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # pickles of arbitrary objects are refused on purpose
        raise BackboneWeightsError(f"{path}: torch.load(weights_only=True) cannot read it ({e}); save only the "
                                   f"state dict (torch.save(model.state_dict(), ...)) or use .safetensors") from e
    return _unwrap(obj, path)


def build_backbone(kind: str, weights_path: str | Path | None, *, size: Size = "base", **options: Any) -> Backbone:
    """A frozen `kind` backbone with the weights of the local file `weights_path` (required).

    `options` go to the class, e.g. `act="gelu"` for CLIP weights trained without QuickGELU."""
    _check(kind, size)
    if not weights_path or not Path(weights_path).is_file():
        raise FileNotFoundError(f"{kind} backbone weights not found: {weights_path!r} (set {_spec_hint(kind)} to a "
                                f"local .pt/.pth/.bin/.safetensors file; they cannot be downloaded here)")
    model = _instantiate(kind, size, options)
    model.load_external(read_state_dict(weights_path), source=str(weights_path))
    return model.freeze_()


def save_random_backbone(kind: str, path: str | Path, *, size: Size = "tiny", seed: int = 0, **options: Any) -> Path:
    """Writes a randomly initialised backbone in the external layout (.safetensors or torch.save)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _instantiate(kind, size, options)
    sd = model.external_state_dict()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return path


def feature_dims(kind: str, size: Size = "base") -> list[int]:
    """Channels of each level of `kind`, without weights (for building the heads)."""
    with torch.device("meta"):   # no memory, no init work
        return list(_instantiate(kind, size, {}).level_dims)


def parameter_count(kind: str, size: Size = "base") -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in _instantiate(kind, size, {}).parameters())


def is_multilevel(kind: str) -> bool:
    """Whether `kind`'s levels are maps then an embedding (CLIP, DINO) rather than one map (Swin, VGG)."""
    return _check(kind, "base").multilevel
