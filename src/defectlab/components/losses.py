"""Losses of the segmentation networks: region overlap + per-pixel term + image label.

Defects cover a few percent of an image at most, so a per-pixel loss alone is dominated by the
background and learns to predict "no defect" everywhere. The soft Dice term scores the overlap
of the predicted and true defect regions and does not care how large the background is; the
per-pixel term (BCE, or focal loss, which down-weights the many easy background pixels) keeps
gradients well-behaved early in training, when the Dice term is flat. Dice is computed over
the whole batch, not per image: images without a defect then neither explode nor vanish.

The classification head gets BCE on the image label ``mask.any()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("dice_bce", "dice_focal")


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 − soft Dice between sigmoid(logits) and target, summed over the whole batch."""
    probabilities = torch.sigmoid(logits)
    intersection = (probabilities * target).sum()
    total = probabilities.sum() + target.sum()
    return 1.0 - (2.0 * intersection + smooth) / (total + smooth)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Mean focal loss (Lin et al. 2017): BCE × (1 − p_t)^γ, so easy pixels count little."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_true = torch.exp(-bce)
    return ((1.0 - p_true) ** gamma * bce).mean()


def segmentation_loss(
    pixel_logits: torch.Tensor,
    image_logits: torch.Tensor,
    masks: torch.Tensor,
    *,
    kind: str = "dice_bce",
    dice_weight: float = 1.0,
    pixel_weight: float = 1.0,
    classification_weight: float = 0.5,
    focal_gamma: float = 2.0,
) -> dict[str, torch.Tensor]:
    """Weighted loss terms by name, and their sum as ``"loss"``.

    ``pixel_logits`` (B, 1, H, W) or (B, H, W), ``image_logits`` (B,), ``masks`` (B, H, W) in
    {0, 1}; the image label is ``mask.any()``.
    """
    if kind not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")
    logits = pixel_logits.reshape(masks.shape)
    target = masks.to(logits.dtype)
    terms: dict[str, torch.Tensor] = {}
    if dice_weight > 0:
        terms["dice"] = dice_weight * soft_dice_loss(logits, target)
    if pixel_weight > 0:
        if kind == "dice_bce":
            terms["bce"] = pixel_weight * F.binary_cross_entropy_with_logits(logits, target)
        else:
            terms["focal"] = pixel_weight * focal_loss(logits, target, focal_gamma)
    if classification_weight > 0:
        labels = (target.flatten(1) > 0.5).any(dim=1).to(image_logits.dtype)
        terms["classification"] = classification_weight * F.binary_cross_entropy_with_logits(
            image_logits, labels
        )
    terms["loss"] = torch.stack(list(terms.values())).sum()
    return terms
