"""Detectors learn from normal images only and return an image score and an anomaly map."""

from __future__ import annotations

from typing import ClassVar

from defectlab.base import Scorer


class Detector(Scorer):
    """A :class:`~defectlab.base.Scorer` whose training batches hold normal images only.

    ``predict`` returns higher scores and map values for more anomalous images/pixels; the
    scale is the detector's own, and thresholds are calibrated on normal validation images.
    """

    family: ClassVar[str] = "detector"
