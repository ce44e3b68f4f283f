"""Segmenters learn from image/mask pairs and return a defect probability map per image."""

from __future__ import annotations

from typing import ClassVar

from defectlab.base import Model


class Segmenter(Model):
    """A :class:`~defectlab.base.Model` whose training batches carry ``mask`` (B, H, W) float
    {0, 1} next to ``image``. ``predict`` maps are defect probabilities in [0, 1]; scores
    are the image-level defect probability."""

    family: ClassVar[str] = "segmenter"
