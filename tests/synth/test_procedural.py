"""The registered ``procedural`` synthesizer (the painting itself is tested in
``tests/components/test_painting.py``)."""

from __future__ import annotations

import numpy as np

from defectlab import registry
from defectlab.components.painting import ProceduralPainter
from defectlab.synth.procedural import ProceduralConfig, ProceduralSynthesizer


def test_registered_under_its_name() -> None:
    cls = registry.get("procedural", "synthesizer")
    assert cls is ProceduralSynthesizer
    assert cls.family == "synthesizer" and not cls.needs_training
    entry = next(e for e in registry.available("synthesizer") if e.name == "procedural")
    assert entry.description and "\n" not in entry.description


def test_paints_what_the_painter_paints() -> None:
    image = np.full((48, 48, 1), 0.5, np.float32)
    config = ProceduralConfig(roi="none")
    ours = ProceduralSynthesizer(config).synthesize(image, np.random.default_rng(3))
    engine = ProceduralPainter(config).synthesize(image, np.random.default_rng(3))
    assert np.array_equal(ours.image, engine.image) and np.array_equal(ours.mask, engine.mask)
    assert ours.record == engine.record
