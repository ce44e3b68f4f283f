"""The registered ``procedural`` synthesizer: defects painted on normal images, exact masks.

The painting engine (shapes, placement, blending) lives in
:mod:`defectlab.components.painting`, where the detectors that learn from painted defects
use it too; this module only registers it under its name, so ``defectlab synth --method
procedural`` and those detectors paint the same defects for the same seed.
"""

from __future__ import annotations

from defectlab.components.painting import (
    PATCH_SHAPES,
    SHAPES,
    ProceduralConfig,
    ProceduralPainter,
    ShapeGenerator,
    blend_defect,
    object_roi,
    sample_centre,
    shape_generator,
)
from defectlab.registry import register

__all__ = [
    "PATCH_SHAPES",
    "SHAPES",
    "ProceduralConfig",
    "ProceduralSynthesizer",
    "ShapeGenerator",
    "blend_defect",
    "object_roi",
    "sample_centre",
    "shape_generator",
]


@register
class ProceduralSynthesizer(ProceduralPainter):
    """The procedural painter (:class:`~defectlab.components.painting.ProceduralPainter`)
    under its registered name ``procedural``; it adds nothing to it."""
