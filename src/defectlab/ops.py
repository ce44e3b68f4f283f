"""Small tensor operations shared by models (kept here so no model depends on another)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float, device: torch.device | None = None) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflect padding; ``sigma <= 0`` is identity."""
    if sigma <= 0:
        return images
    kernel = gaussian_kernel1d(sigma, images.device).to(images.dtype)
    radius = kernel.numel() // 2
    channels = int(images.shape[1])  # a constant when traced for ONNX export
    padded = F.pad(images, (radius, radius, radius, radius), mode="reflect")
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    out = F.conv2d(padded, horizontal, groups=channels)
    return F.conv2d(out, vertical, groups=channels)


def top_fraction_mean(maps: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the highest ``fraction`` of each map's values: a score robust to single hot
    pixels yet sensitive to small defects. (B, H, W) → (B,)."""
    flat = maps.flatten(1)
    k = max(1, round(int(flat.shape[1]) * fraction))
    return flat.topk(k, dim=1).values.mean(dim=1)
