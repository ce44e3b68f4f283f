"""Supervised segmenters ``unet`` and ``unet3plus``: the shared
:class:`~defectlab.components.segmentation.SegmentationModel` trained on image/mask pairs.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from defectlab.components.segmentation import SegmentationModel
from defectlab.registry import register
from defectlab.segment.base import Segmenter


@register
class UNetSegmenter(SegmentationModel, Segmenter):
    """U-Net trained on image/mask pairs; map = defect probability."""

    name: ClassVar[str] = "unet"
    description: ClassVar[str] = (
        "U-Net (plain or Lite0 encoder) + classification head; Dice+BCE/focal on masks"
    )
    architecture: ClassVar[str] = "unet"

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        return self.train_on_pairs(batch["image"], batch["mask"])


@register
class UNet3PlusSegmenter(UNetSegmenter):
    """UNet3+ (full-scale skip connections) trained on image/mask pairs."""

    name: ClassVar[str] = "unet3plus"
    description: ClassVar[str] = (
        "UNet3+ full-scale skips (plain or Lite0 encoder) + classification head; Dice+BCE/focal"
    )
    architecture: ClassVar[str] = "unet3plus"
