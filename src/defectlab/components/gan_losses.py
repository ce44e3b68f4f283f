"""The adversarial loss the GAN synthesizers share (BCE with logits or least squares, over one
or several discriminator scales)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: the ``gan_loss`` values of :func:`adversarial_loss`
GAN_LOSSES = ("bce", "lsgan")


def adversarial_loss(logits: torch.Tensor | Sequence[torch.Tensor], target: float, kind: str):
    """Mean over scales of BCE-with-logits (``kind="bce"``, cross-entropy as in the seed) or
    least squares (``"lsgan"``) against the constant ``target`` (1 real, 0 fake, 0.5 confused)."""
    maps = [logits] if isinstance(logits, torch.Tensor) else list(logits)
    losses = []
    for m in maps:
        t = torch.full_like(m, target)
        if kind == "lsgan":
            losses.append(F.mse_loss(m, t))
        else:
            losses.append(F.binary_cross_entropy_with_logits(m, t))
    return torch.stack(losses).mean()
