"""The synthesizer interface: normal images (+ optional defect examples) → defect images with
exact masks and a record of how each was made."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from defectlab.errors import ConfigError


@dataclass
class SynthSample:
    """A synthetic defect image (H, W, C) float32 in [0, 1], its bool (H, W) mask, and the
    parameters that made it (written to ``manifest.csv``)."""

    image: np.ndarray
    mask: np.ndarray
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class SynthConfig:
    """Base of every synthesizer's config dataclass."""


class Synthesizer(ABC):
    """Paints or generates defects. Procedural synthesizers need no :meth:`fit`; learned
    ones (GANs) train first and are loaded from a run directory."""

    name: ClassVar[str]
    family: ClassVar[str] = "synthesizer"
    description: ClassVar[str]
    Config: ClassVar[type[SynthConfig]] = SynthConfig
    needs_training: ClassVar[bool] = False

    def __init__(self, config: SynthConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{self.name} needs a {self.Config.__name__}, got {type(config)}")

    @classmethod
    def from_run(cls, run_dir: Path) -> Synthesizer:
        """Load a trained synthesizer from its run directory (learned synthesizers only)."""
        raise ConfigError(f"{cls.name} is procedural and has no trained run to load")

    def configure_synthesis(self, overrides: dict[str, str]) -> None:
        """Learned synthesizers accept ``--set`` sampling settings after training (e.g. the
        detail mode); the networks themselves stay as trained."""
        raise ConfigError(f"{self.name}: no settings can change after training")

    def use_defect_examples(self, images: Sequence[np.ndarray]) -> None:
        """Learned synthesizers that take their defect appearance from real examples (e.g.
        CrossGAN's ``detail=encode``) override this; the others take none."""
        raise ConfigError(f"{self.name} takes no --defects examples")

    @abstractmethod
    def synthesize(self, image: np.ndarray, rng: np.random.Generator) -> SynthSample:
        """One defect image from one normal image (H, W, C) float32 in [0, 1]."""

    def generate(
        self, images: Sequence[np.ndarray], n: int, seed: int = 0
    ) -> Iterator[tuple[int, SynthSample]]:
        """``n`` samples cycling over ``images``; sample ``i`` uses its own generator seeded by
        ``(seed, i)``, so any sample can be reproduced alone. Yields (source index, sample)."""
        if not images:
            raise ValueError("no normal images to synthesize defects on")
        for i in range(n):
            source = i % len(images)
            rng = np.random.default_rng([seed, i])
            yield source, self.synthesize(images[source], rng)
