"""``patchmemory``: the PatchCore-style memory bank of :mod:`defectlab.components.memory` as a
detector (normal images in, nearest-patch distance maps out)."""

from __future__ import annotations

from typing import ClassVar

from defectlab.components.memory import PatchMemoryBank
from defectlab.detect.base import Detector
from defectlab.registry import register


@register
class PatchMemory(PatchMemoryBank, Detector):
    name: ClassVar[str] = "patchmemory"
    description: ClassVar[str] = (
        "PatchCore-style coreset memory of EfficientNet-Lite patch features; "
        "map = nearest-patch distance"
    )
