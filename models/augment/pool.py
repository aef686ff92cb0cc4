"""The MineAug candidate pool: every augmentation the search may pick, as kornia transforms.

Each entry is applied with probability 1 and draws its own random parameters per image
(`same_on_batch=False`); geometric entries fill what they uncover by reflection, so no black
borders appear that the original images never have. `build_augmentation(name, channels)` returns a
module on float NCHW images in [0, 1]; `apply_uint8` is the search's Execute step on uint8 images
and `mse_pm1` the pixel distance of its Select step.
"""
from __future__ import annotations

from typing import Callable

import kornia.augmentation as K
import torch
from kornia.geometry.transform import affine
from torch import Tensor, nn

REFLECT = "reflection"

# kornia reads shear in degrees: 0.15-0.2° moves pixels by well under one pixel at 256², so this
# entry is near-identity, as it was in the original pool (the MSE > 0.02 gate of Select drops it).
SHEAR_DEGREES = (0.15, 0.2, 0.15, 0.2)


class ReflectRotation(K.RandomRotation):
    """kornia's RandomRotation, whose corners it always fills with zeros, filled by reflection."""

    def apply_transform(self, input: Tensor, params: dict, flags: dict, transform: Tensor | None = None) -> Tensor:
        return affine(input, transform[..., :2, :3], flags["resample"].name.lower(), REFLECT, flags["align_corners"])


class FullSizeResizedCrop(nn.Module):
    """kornia's RandomResizedCrop (default scale and ratio) resized back to the input's own size,
    which kornia needs up front; one kornia module per size seen."""

    def __init__(self) -> None:
        super().__init__()
        self.by_size: dict[tuple[int, int], nn.Module] = {}

    def forward(self, x: Tensor) -> Tensor:
        size = (x.shape[-2], x.shape[-1])
        if size not in self.by_size:
            self.by_size[size] = K.RandomResizedCrop(size, p=1.0, same_on_batch=False)
        crop = self.by_size[size]
        if x.device.type != "cpu" and getattr(crop, "device", None) != x.device:
            crop.set_rng_device_and_dtype(x.device, torch.float32)
        return crop(x)


def draw_on(module: nn.Module, device: torch.device) -> nn.Module:
    """Makes the kornia transforms in `module` draw their random parameters on `device`, where
    the images are: kornia draws on the CPU by default and copies each draw over, a blocking
    transfer per transform per batch on a GPU. A no-op on the CPU (its draws stay what they were)."""
    if device.type == "cpu":
        return module
    for m in module.modules():
        if hasattr(m, "set_rng_device_and_dtype"):
            m.set_rng_device_and_dtype(device, torch.float32)
    return module.to(device)


def _affine(**kw) -> nn.Module:
    return K.RandomAffine(degrees=kw.pop("degrees", 0.0), padding_mode=REFLECT, p=1.0, same_on_batch=False, **kw)


def _rotate() -> nn.Module:
    return ReflectRotation(15.0, p=1.0, same_on_batch=False)


def _flip(vertical: bool) -> nn.Module:
    return (K.RandomVerticalFlip if vertical else K.RandomHorizontalFlip)(p=1.0, same_on_batch=False)


ONE = {"p": 1.0, "same_on_batch": False}

# Name -> factory, in the order of the MineAug table (MINEAUG.md §1).
_POOL: dict[str, Callable[[], nn.Module]] = {
    "Translation_x": lambda: _affine(translate=(0.25, 0.0)),
    "Translation_y": lambda: _affine(translate=(0.0, 0.25)),
    "Translation_both": lambda: _affine(translate=(0.25, 0.25)),
    # 4-tuple scale: kornia draws sx and sy independently.
    "Zoom_in": lambda: _affine(scale=(1.0, 1.2, 1.0, 1.2)),
    "Zoom_in2": lambda: _affine(scale=(1.0, 1.25, 1.0, 1.25)),
    "Zoom_out": lambda: _affine(scale=(0.8, 1.0, 0.8, 1.0)),
    "Shear": lambda: _affine(shear=SHEAR_DEGREES),
    "Rotate": _rotate,
    "RandomAffine": lambda: _affine(degrees=15.0),
    "HorizontalFlip": lambda: _flip(vertical=False),
    "VerticalFlip": lambda: _flip(vertical=True),
    # Both steps run (the original kept only the last element of such a composite).
    "FlipRot_Horizontal": lambda: nn.Sequential(_flip(vertical=False), _rotate()),
    "FlipRot_Vertical": lambda: nn.Sequential(_flip(vertical=True), _rotate()),
    "PlasmaBrightness": lambda: K.RandomPlasmaBrightness(roughness=(0.1, 0.7), **ONE),
    "PlasmaContrast": lambda: K.RandomPlasmaContrast(roughness=(0.1, 0.7), **ONE),
    "BoxBlur": lambda: K.RandomBoxBlur(kernel_size=(7, 7), **ONE),
    "GaussianBlur": lambda: K.RandomGaussianBlur((3, 3), (0.1, 2.0), **ONE),
    "MotionBlur": lambda: K.RandomMotionBlur(3, 35.0, 0.5, **ONE),
    "GaussianNoise": lambda: K.RandomGaussianNoise(mean=0.0, std=0.015, **ONE),
    "Posterize": lambda: K.RandomPosterize(3, **ONE),
    "Sharpness": lambda: K.RandomSharpness(1.0, **ONE),
    "Solarize": lambda: K.RandomSolarize(0.1, 0.1, **ONE),
    "Invert": lambda: K.RandomInvert(**ONE),
    "ElasticTransform": lambda: K.RandomElasticTransform(padding_mode=REFLECT, **ONE),
    "ThinPlateSpline": lambda: K.RandomThinPlateSpline(padding_mode=REFLECT, **ONE),
    "ResizedCrop": FullSizeResizedCrop,
    "PlanckianJitter": lambda: K.RandomPlanckianJitter(**ONE),
    "PlasmaShadow": lambda: K.RandomPlasmaShadow(**ONE),
    "ColorJiggle": lambda: K.ColorJiggle(0.1, 0.1, 0.1, 0.1, **ONE),
    "ChannelShuffle": lambda: K.RandomChannelShuffle(**ONE),
    "RGBShift": lambda: K.RandomRGBShift(**ONE),
}

POOL_NAMES: tuple[str, ...] = tuple(_POOL)
COLOUR_ONLY: tuple[str, ...] = ("PlanckianJitter", "PlasmaShadow", "ColorJiggle", "ChannelShuffle", "RGBShift")


def names_for(channels: int) -> list[str]:
    """The pool for images with `channels` channels: colour-only entries need RGB."""
    return [n for n in POOL_NAMES if channels == 3 or n not in COLOUR_ONLY]


class PoolAugmentation(nn.Module):
    """One pool entry on float NCHW images in [0, 1] -> same shape, clamped to [0, 1]."""

    def __init__(self, name: str, channels: int):
        super().__init__()
        self.name, self.channels = name, channels
        self.transform = _POOL[name]()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"{self.name} was built for {self.channels}-channel NCHW images, got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return x
        # kornia's samplers and kernels expect float32 (or float64); half precision is computed in float32.
        work = x if x.dtype in (torch.float32, torch.float64) else x.float()
        return self.transform(work).clamp_(0.0, 1.0).to(x.dtype)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, channels={self.channels}"


def build_augmentation(name: str, channels: int) -> PoolAugmentation:
    if name not in _POOL:
        raise ValueError(f"unknown augmentation {name!r}; allowed: {', '.join(POOL_NAMES)}")
    if name in COLOUR_ONLY and channels != 3:
        raise ValueError(f"{name} is a colour transform and needs 3-channel (RGB) images, not {channels}; "
                         f"allowed for {channels} channel(s): {', '.join(names_for(channels))}")
    return PoolAugmentation(name, channels)


@torch.no_grad()
def apply_uint8(name: str, images_uint8: Tensor, channels: int, generator_seed: int, chunk: int = 256) -> Tensor:
    """Execute step: uint8 NCHW -> [0, 1] -> augment -> uint8 (rounded), the same for the same
    seed (and chunk). Whole data sets go through in chunks of `chunk` images, so the float copies
    kornia makes stay small.

    The global RNGs (kornia draws from them) are seeded inside a fork, so the caller's random
    state is left as it was.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
        raise TypeError(f"expected uint8 NCHW images, got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    aug = build_augmentation(name, channels)
    device = images_uint8.device
    out = torch.empty_like(images_uint8)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(generator_seed)
        for s in range(0, images_uint8.shape[0], chunk):
            y = aug(images_uint8[s:s + chunk].float() / 255.0)
            out[s:s + chunk] = (y * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return out


@torch.no_grad()
def mse_pm1(a_uint8: Tensor, b_uint8: Tensor, chunk: int = 256) -> float:
    """Mean over images of the per-image mean squared difference, pixels read in [-1, 1]; image i
    of `a` is compared with image i of `b` (chunked so whole data sets fit in memory)."""
    if a_uint8.shape != b_uint8.shape or a_uint8.dtype != torch.uint8 or b_uint8.dtype != torch.uint8:
        raise ValueError(f"expected two uint8 image sets of one shape, got {a_uint8.dtype} {tuple(a_uint8.shape)} "
                         f"and {b_uint8.dtype} {tuple(b_uint8.shape)}")
    if a_uint8.shape[0] == 0:
        raise ValueError("mse_pm1 of empty image sets")
    per_image = []
    for s in range(0, a_uint8.shape[0], chunk):
        # [0, 255] -> [-1, 1] scales differences by 2/255.
        d = (a_uint8[s:s + chunk].float() - b_uint8[s:s + chunk].float()) * (2.0 / 255.0)
        per_image.append(d.square().flatten(1).mean(dim=1, dtype=torch.float64))
    return float(torch.cat(per_image).mean())
