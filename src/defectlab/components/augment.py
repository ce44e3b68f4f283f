"""Batched tensor augmentation for segmentation training, and test-time augmentation (TTA).

Training (:func:`augment_pairs`): each image of a batch gets its own random horizontal and
vertical flip and integer shift (reflect-padded), applied identically to its mask so the
label stays exact, then photometric changes to the image only: brightness offset, contrast
scaling around the image mean, Gaussian blur (for a random share of the batch) and Gaussian
noise. Random numbers come from torch's global CPU generator, which the trainer checkpoints:
a resumed run draws the same augmentations as an uninterrupted one, on any device.

TTA (:func:`tta_views`, :func:`undo_view`): the image as is plus flipped copies (horizontal,
vertical, both: a closed group, so the mean over them is exactly flip-equivariant) and
optionally a noisy and a brighter/darker copy (fixed seeds: predictions are deterministic).
Maps of flipped views are flipped back before they are combined.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from defectlab.ops import gaussian_blur

TTA_TRANSFORMS = ("hflip", "vflip", "hvflip", "noise", "brighter", "darker")
TTA_COMBINE = ("mean", "vote")
#: seed of the fixed noise pattern of the "noise" TTA view
TTA_NOISE_SEED = 1234


@dataclass(frozen=True)
class AugmentSettings:
    """Strengths of the training augmentation; 0 turns a transform off."""

    flip: bool = True
    #: brightness offset drawn from U(−b, b)
    brightness: float = 0.1
    #: contrast factor drawn from U(1 − c, 1 + c), around each image's mean
    contrast: float = 0.2
    #: Gaussian noise std drawn from U(0, n)
    noise: float = 0.02
    #: share of the batch blurred, with sigma drawn from U(0.5, 1.5) per batch
    blur_probability: float = 0.2
    #: integer shift up to this fraction of the side, in each direction
    shift: float = 0.05


def _uniform(n: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * torch.rand(n)


def shift_batch(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Shift each image of (B, C, H, W) by integer (dy, dx) pixels, reflecting at the border."""
    pad = int(max(dy.abs().max().item(), dx.abs().max().item(), 0))
    if pad == 0:
        return x
    h, w = x.shape[-2:]
    pad = min(pad, h - 1, w - 1)
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    out = torch.empty_like(x)
    for i in range(x.shape[0]):
        top, left = pad - int(dy[i]), pad - int(dx[i])
        out[i] = padded[i, :, top : top + h, left : left + w]
    return out


def augment_pairs(
    images: torch.Tensor, masks: torch.Tensor, settings: AugmentSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly augment images (B, C, H, W) in [0, 1] and masks (B, H, W) alike (geometry)."""
    b, _, h, w = images.shape
    device = images.device
    masks = masks[:, None].to(images.dtype)
    if settings.flip:
        flips = (torch.rand(b, 2) < 0.5).to(device)
        for dim, column in ((3, 0), (2, 1)):
            chosen = flips[:, column].view(b, 1, 1, 1)
            images = torch.where(chosen, images.flip(dim), images)
            masks = torch.where(chosen, masks.flip(dim), masks)
    if settings.shift > 0:
        limit = int(settings.shift * min(h, w))
        if limit > 0:
            dy = torch.randint(-limit, limit + 1, (b,))
            dx = torch.randint(-limit, limit + 1, (b,))
            images, masks = shift_batch(images, dy, dx), shift_batch(masks, dy, dx)
    if settings.contrast > 0:
        factor = _uniform(b, 1 - settings.contrast, 1 + settings.contrast).to(device)
        mean = images.mean(dim=(1, 2, 3), keepdim=True)
        images = mean + factor.view(b, 1, 1, 1) * (images - mean)
    if settings.brightness > 0:
        offset = _uniform(b, -settings.brightness, settings.brightness).to(device)
        images = images + offset.view(b, 1, 1, 1)
    if settings.blur_probability > 0:
        chosen = (torch.rand(b) < settings.blur_probability).to(device).view(b, 1, 1, 1)
        sigma = float(_uniform(1, 0.5, 1.5))
        images = torch.where(chosen, gaussian_blur(images, sigma), images)
    if settings.noise > 0:
        std = _uniform(b, 0.0, settings.noise).to(device).view(b, 1, 1, 1)
        images = images + std * torch.randn(images.shape).to(device, images.dtype)
    return images.clamp(0.0, 1.0), masks[:, 0]


# --- test-time augmentation ------------------------------------------------------------------


def tta_views(
    images: torch.Tensor, transforms: tuple[str, ...], noise: float, brightness: float
) -> list[tuple[str, torch.Tensor]]:
    """The identity view and one view per transform name in ``transforms``."""
    views = [("identity", images)]
    for name in transforms:
        if name == "hflip":
            views.append((name, images.flip(-1)))
        elif name == "vflip":
            views.append((name, images.flip(-2)))
        elif name == "hvflip":
            views.append((name, images.flip(-1).flip(-2)))
        elif name == "noise":
            generator = torch.Generator().manual_seed(TTA_NOISE_SEED)
            pattern = torch.randn(images.shape, generator=generator).to(images.device)
            views.append((name, (images + noise * pattern).clamp(0.0, 1.0)))
        elif name == "brighter":
            views.append((name, (images + brightness).clamp(0.0, 1.0)))
        elif name == "darker":
            views.append((name, (images - brightness).clamp(0.0, 1.0)))
        else:
            raise ValueError(f"unknown TTA transform {name!r}; available: {TTA_TRANSFORMS}")
    return views


def undo_view(name: str, maps: torch.Tensor) -> torch.Tensor:
    """Bring maps (B, H, W) of a view back to the geometry of the original image."""
    if name == "hflip":
        return maps.flip(-1)
    if name == "vflip":
        return maps.flip(-2)
    if name == "hvflip":
        return maps.flip(-1).flip(-2)
    return maps


def combine_views(stacked: torch.Tensor, combine: str, threshold: float) -> torch.Tensor:
    """Combine (V, ...) per-view probabilities: their ``mean``, or for ``vote`` the share of
    views above ``threshold`` (ties broken by the mean, so the result still ranks)."""
    mean = stacked.mean(dim=0)
    if combine == "mean":
        return mean
    votes = (stacked > threshold).to(stacked.dtype).mean(dim=0)
    views = stacked.shape[0]
    return (votes * views + mean) / (views + 1)
