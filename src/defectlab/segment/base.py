"""Segmenters learn from image/mask pairs and return a defect probability map per image."""

from __future__ import annotations

from typing import ClassVar

from defectlab.base import Scorer


class Segmenter(Scorer):
    """A :class:`~defectlab.base.Scorer` whose training batches carry ``mask`` (B, H, W) float
    {0, 1} next to ``image``. ``predict`` maps are defect probabilities in [0, 1]; scores
    are the image-level defect probability."""

    family: ClassVar[str] = "segmenter"
