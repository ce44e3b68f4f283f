"""MaskGAN's losses: the boundary-aware loss that keeps generated masks on the part, the
mode-seeking term that keeps the mask generator from ignoring its noise, and the adversarial
loss with MaskGAN's extra ``hinge`` form.

**Boundary-aware loss** (:func:`boundary_loss`): the mean over masks of each mask's share
outside the object region (:func:`~defectlab.synth.maskgan.masks.object_region`),
``Σ m · (1 − object) / (Σ m + 1)``: zero when the generated masks lie inside the object, near
1 when a mask lies outside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from defectlab.components.gan_losses import adversarial_loss

#: the ``gan_loss`` values MaskGAN implements
MASKGAN_LOSSES = ("bce", "hinge", "lsgan")


def boundary_loss(masks: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Mean over masks of the share of each mask's mass outside the object:
    ``Σ m · (1 − object) / (Σ m + 1)``.

    ``masks`` (B, K, H, W) soft masks, ``regions`` (B, 1, H, W) object masks (0/1). Zero when
    every mask lies inside its object; it pulls masks onto the part, not the background.
    A share, not a mean over all pixels: a mean over pixels makes a small mask entirely on
    the background cost almost nothing (on magnetic tile a thin strip along the border
    cost next to nothing against the adversarial loss, and the generator parked every mask
    there). The +1 pixel keeps an empty mask at zero instead of 0/0."""
    outside = (masks * (1.0 - regions)).sum(dim=(2, 3))
    return (outside / (masks.sum(dim=(2, 3)) + 1.0)).mean()


def mode_seeking_loss(
    masks: torch.Tensor,
    other_masks: torch.Tensor,
    noise: torch.Tensor,
    other_noise: torch.Tensor,
    eps: float = 1e-2,
) -> torch.Tensor:
    """MSGAN's mode-seeking term: ``1 / (mean|m − m'| / mean|z − z'| + eps)`` for the masks
    ``m``, ``m'`` one generator gave the same images under the noises ``z``, ``z'``. Small when
    different noise gives different masks, ``1 / eps`` when it gives the same mask (a
    collapsed generator); ``eps`` (MSGAN: 1e-5) bounds the penalty so that a collapsed start
    cannot blow up the step."""
    ratio = (masks - other_masks).abs().mean() / (noise - other_noise).abs().mean()
    return 1.0 / (ratio + eps)


def gan_loss(
    logits: torch.Tensor | Sequence[torch.Tensor], real: bool, kind: str, discriminator: bool
) -> torch.Tensor:
    """Adversarial loss, mean over discriminator scales. ``hinge``: the discriminator takes
    ``relu(1 − D)`` on real and ``relu(1 + D)`` on fake, the generator ``−D``; ``bce``
    (non-saturating) and ``lsgan`` are :func:`~defectlab.components.gan_losses.adversarial_loss`
    with target 1 (real) or 0 (fake)."""
    if kind != "hinge":
        return adversarial_loss(logits, 1.0 if real else 0.0, kind)
    maps = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    if not discriminator:
        return torch.stack([-m.mean() for m in maps]).mean()
    sign = -1.0 if real else 1.0
    return torch.stack([F.relu(1.0 + sign * m).mean() for m in maps]).mean()
