"""Graded-difficulty data: every image given a corruption and a severity 0-5 (0 = clean), drawn from a seed.

The families follow MNIST-C / ImageNet-C (Mu & Gilmer 2019; Hendrycks & Dietterich 2019) and are written
with torchvision's functional transforms, so no extra dependency is needed and 8x8 images work too:

=================  =====================================================================================
``gaussian_noise`` additive N(0, sigma) on [0, 1] pixels, sigma 0.08 / 0.14 / 0.22 / 0.32 / 0.45
``impulse_noise``  3 / 6 / 10 / 15 / 22 % of the pixels (at least one) flipped to the opposite extreme
``gaussian_blur``  sigma 0.5 / 0.8 / 1.1 / 1.5 / 2.0 pixels
``contrast``       pixels pulled to their mean by a factor 0.55 / 0.4 / 0.28 / 0.18 / 0.1
``occlusion``      a black square of side 20 / 28 / 36 / 44 / 52 % of the image, centred on a stroke
``affine``         rotation of 10 / 20 / 30 / 40 / 50 degrees and half that shear, random signs, bilinear
=================  =====================================================================================

Each image's family is drawn uniformly, its severity uniformly from 0 to 5 (a sixth of the images stay
clean), and its random parameters (noise, positions, signs) from a generator seeded with the data
set's seed and the image's index, so every run, split and machine sees the same images. The severity
is kept per image (``TensorImageDataset.difficulty``) and is what the evaluation buckets by
(``evaluation.difficulty.kind=severity``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torchvision.transforms.v2 import functional as TF

SEVERITIES = 5  # 1..5; 0 is clean
_NOISE = (0.08, 0.14, 0.22, 0.32, 0.45)
_IMPULSE = (0.03, 0.06, 0.10, 0.15, 0.22)
_BLUR = (0.5, 0.8, 1.1, 1.5, 2.0)
_CONTRAST = (0.55, 0.4, 0.28, 0.18, 0.1)
_OCCLUDE = (0.20, 0.28, 0.36, 0.44, 0.52)
_ROTATE = (10.0, 20.0, 30.0, 40.0, 50.0)


def _gaussian_noise(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    return x + _NOISE[s - 1] * torch.randn(x.shape, generator=g)


def _impulse_noise(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    # A fixed count of pixels (at least one, so 8x8 images change too) flipped to the opposite extreme.
    flat = x.flatten().clone()
    k = max(1, int(round(_IMPULSE[s - 1] * flat.numel())))
    idx = torch.randperm(flat.numel(), generator=g)[:k]
    flat[idx] = (flat[idx] < 0.5).to(flat.dtype)
    return flat.view_as(x)


def _gaussian_blur(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    sigma = _BLUR[s - 1]  # in pixels at every size: scaled down, a blur would vanish on 8x8 digits
    k = 2 * max(1, int(round(3 * sigma))) + 1
    return TF.gaussian_blur(x, kernel_size=[k, k], sigma=[sigma, sigma])


def _contrast(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    mean = x.mean()
    return mean + _CONTRAST[s - 1] * (x - mean)


def _occlusion(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    h, w = x.shape[-2:]
    side = max(1, int(round(_OCCLUDE[s - 1] * min(h, w))))
    # Centred on a random stroke pixel, so the square always hides part of the digit (one dropped on the
    # background would leave a "corrupted" image unchanged).
    ink = (x.amax(0) >= 0.5 * x.max()).nonzero()
    cy, cx = ink[int(torch.randint(0, len(ink), (1,), generator=g))].tolist()
    top, left = min(max(cy - side // 2, 0), h - side), min(max(cx - side // 2, 0), w - side)
    out = x.clone()
    out[..., top:top + side, left:left + side] = 0.0
    return out


def _affine(x: torch.Tensor, s: int, g: torch.Generator) -> torch.Tensor:
    signs = torch.randint(0, 2, (2,), generator=g) * 2 - 1
    angle = float(signs[0]) * _ROTATE[s - 1]
    shear = float(signs[1]) * _ROTATE[s - 1] / 2
    return TF.affine(x, angle=angle, translate=[0, 0], scale=1.0, shear=[shear, 0.0],
                     interpolation=TF.InterpolationMode.BILINEAR)


CORRUPTIONS: dict[str, Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "impulse_noise": _impulse_noise,
    "gaussian_blur": _gaussian_blur,
    "contrast": _contrast,
    "occlusion": _occlusion,
    "affine": _affine,
}


def draw_corruptions(n: int, seed: int, families: tuple[str, ...] = tuple(CORRUPTIONS)) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """Per image: the family index into ``families`` and the severity 0..5, both ``[n]`` int64, from ``seed``."""
    unknown = sorted(set(families) - set(CORRUPTIONS))
    if unknown or not families:
        raise ValueError(f"unknown corruption families {unknown or '(none given)'}; choose from {list(CORRUPTIONS)}")
    g = torch.Generator().manual_seed(seed)
    severity = torch.randint(0, SEVERITIES + 1, (n,), generator=g)
    family = torch.randint(0, len(families), (n,), generator=g)
    return family, severity


def corrupt(images: torch.Tensor, family: torch.Tensor, severity: torch.Tensor, seed: int,
            families: tuple[str, ...] = tuple(CORRUPTIONS)) -> torch.Tensor:
    """``images`` (uint8 ``[N, C, H, W]``) with image ``i`` corrupted by ``families[family[i]]`` at
    ``severity[i]`` (0 leaves it as it is); each image's randomness comes from ``(seed, i)``."""
    out = images.clone()
    for i in range(len(images)):
        s = int(severity[i])
        if s == 0:
            continue
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        x = images[i].float() / 255.0
        y = CORRUPTIONS[families[int(family[i])]](x, s, g)
        out[i] = (y.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return out
