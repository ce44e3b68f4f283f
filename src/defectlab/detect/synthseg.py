"""Detectors that learn from normal images by segmenting procedurally painted defects.

``synth-unet`` and ``synth-unet3plus`` are the segmenters of :mod:`defectlab.segment.unet`
(same network, loss, augmentation, TTA and scores) trained on normal images only: at every
training step a share ``synth_share`` of the batch gets defects painted by the
:class:`~defectlab.components.painting.ProceduralPainter`, with their exact masks, and the
network learns to find them; untouched images teach it that normal surfaces hold no defect.
The anomaly map is the defect probability, the image score the combination of the
classification head and the map of :class:`~defectlab.segment.unet.SegmenterConfig`.

Reproducibility: which images get defects, and the defects themselves, come from a NumPy
generator seeded by ``(synth_seed, step)`` where ``step`` counts the training steps taken
(stored in the training state). A resumed run, or a rerun, paints the same defects.

Curriculum: large, high-contrast defects are easy to find and give the network a foothold;
subtle ones are what real inspection needs. Training progress ``p`` runs from 0 at the first
step to 1 at the last (``step / (total_steps − 1)``, total_steps = epochs × batches per
epoch). The level ``ℓ = min(1, p / curriculum_share)`` moves the synthesizer's ranges
linearly, end point by end point, from ``easy_size_fraction`` / ``easy_contrast`` (ℓ = 0) to
``size_fraction`` / ``contrast`` (ℓ = 1); the last ``1 − curriculum_share`` of training
uses the final, subtle ranges. ``curriculum=False`` uses the final ranges throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from defectlab import distributed
from defectlab.base import ModelConfig
from defectlab.components.painting import ProceduralConfig, ProceduralPainter
from defectlab.components.segmentation import SegmentationModel, SegmenterConfig
from defectlab.detect.base import Detector
from defectlab.registry import register


def _lerp(a: tuple[float, float], b: tuple[float, float], t: float) -> tuple[float, float]:
    # (1 − t)·a + t·b rather than a + t·(b − a): exact at both ends
    return ((1 - t) * a[0] + t * b[0], (1 - t) * a[1] + t * b[1])


@dataclass
class PaintingConfig(ModelConfig):
    """How defects are painted on normal training images, and the curriculum that moves
    them from easy to subtle; shared by every detector that learns from painted defects."""

    #: share of each batch that gets painted defects (the rest stays normal)
    synth_share: float = 0.5
    #: seed of the defect painting; step s uses numpy default_rng((synth_seed, s))
    synth_seed: int = 0
    #: procedural shapes to draw from (default: every family of the procedural synthesizer),
    #: and defects per painted image
    shapes: tuple[str, ...] = field(default_factory=lambda: ProceduralConfig().shapes)
    defects_per_image: tuple[int, int] = (1, 2)
    #: final (hardest) defect diameter range, relative to the image's short side
    size_fraction: tuple[float, float] = (0.04, 0.2)
    #: final (hardest) contrast range, relative to the local background
    contrast: tuple[float, float] = (0.15, 0.45)
    #: curriculum start: larger, higher-contrast defects
    easy_size_fraction: tuple[float, float] = (0.12, 0.3)
    easy_contrast: tuple[float, float] = (0.4, 0.8)
    #: move from the easy to the final ranges during training (see the module docstring)
    curriculum: bool = True
    #: share of training over which the ranges move; the rest uses the final ranges
    curriculum_share: float = 0.6
    #: where defects go: "otsu" (inside the object) or "none" (anywhere)
    roi: str = "otsu"

    def __post_init__(self) -> None:
        if not 0 < self.synth_share <= 1:
            raise ValueError(f"synth_share must be in (0, 1], got {self.synth_share}")
        if not 0 < self.curriculum_share <= 1:
            raise ValueError(f"curriculum_share must be in (0, 1], got {self.curriculum_share}")
        for name in ("size_fraction", "contrast", "easy_size_fraction", "easy_contrast"):
            value = getattr(self, name)
            if not isinstance(value, tuple | list) or len(value) != 2:
                raise ValueError(f"{name} must be a (low, high) pair, got {value!r}")
            setattr(self, name, tuple(float(v) for v in value))
        self.shapes = tuple(self.shapes)
        self.defects_per_image = tuple(self.defects_per_image)
        # the synthesizer validates shapes and ranges; its messages name the field, which
        # for the curriculum start is the easy_ one
        for level in (0.0, 1.0):
            try:
                self.procedural_config(level)
            except ValueError as exc:
                message = str(exc)
                if level == 0 and message.startswith(("size_fraction", "contrast")):
                    message = "easy_" + message
                raise ValueError(message) from exc

    def procedural_config(self, level: float) -> ProceduralConfig:
        """Synthesizer settings at curriculum level ``level`` (0 easy … 1 final)."""
        level = level if self.curriculum else 1.0
        return ProceduralConfig(
            shapes=self.shapes,
            defects_per_image=self.defects_per_image,
            size_fraction=_lerp(self.easy_size_fraction, self.size_fraction, level),
            contrast=_lerp(self.easy_contrast, self.contrast, level),
            roi=self.roi,
        )

    def curriculum_level(self, step: int, total_steps: int) -> float:
        """0 (easy defects) … 1 (final, subtle ones) at training step ``step`` of
        ``total_steps`` (0 when the total is not known yet)."""
        if not self.curriculum:
            return 1.0
        if total_steps <= 0:
            return 0.0
        progress = step / max(1, total_steps - 1)
        return min(1.0, progress / self.curriculum_share)


def paint_defects(
    images: torch.Tensor, config: PaintingConfig, step: int, level: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paint defects on a share of ``images`` (B, C, H, W); return images and masks (B, H, W).

    Which images get defects, and the defects, come from ``default_rng((synth_seed, step))``.
    """
    rng = np.random.default_rng([config.synth_seed, step])
    chosen = np.flatnonzero(rng.random(len(images)) < config.synth_share)
    masks = torch.zeros(images.shape[0], *images.shape[-2:])
    if len(chosen) == 0:
        return images, masks.to(images.device)
    synthesizer = ProceduralPainter(config.procedural_config(level))
    painted = images.detach().cpu().float().clone()
    for i in chosen:
        source = painted[i].permute(1, 2, 0).numpy()
        sample = synthesizer.synthesize(np.ascontiguousarray(source), rng)
        painted[i] = torch.from_numpy(sample.image).permute(2, 0, 1)
        masks[i] = torch.from_numpy(sample.mask.astype(np.float32))
    return painted.to(images.device), masks.to(images.device)


@dataclass
class SynthSegConfig(SegmenterConfig, PaintingConfig):
    def __post_init__(self) -> None:
        SegmenterConfig.__post_init__(self)
        PaintingConfig.__post_init__(self)


@register
class SynthUNet(SegmentationModel, Detector):
    """U-Net trained on normal images with procedurally painted defects (curriculum)."""

    name: ClassVar[str] = "synth-unet"
    description: ClassVar[str] = (
        "U-Net trained on procedural defects painted on normal images (curriculum easy→subtle)"
    )
    architecture: ClassVar[str] = "unet"
    Config = SynthSegConfig
    config: SynthSegConfig

    def __init__(self, config: SynthSegConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        #: training steps taken (seeds the painting and drives the curriculum)
        self.step = 0
        self.batch_size: int | None = None
        self.n_train = 0

    def setup_training(self, n_train: int) -> None:
        super().setup_training(n_train)
        self.n_train = n_train

    def curriculum_level(self) -> float:
        """0 (easy defects) … 1 (final, subtle ones) at the current step."""
        if not self.batch_size or not self.n_train:
            return self.config.curriculum_level(self.step, 0)
        total = self.config.epochs * math.ceil(self.n_train / self.batch_size)
        return self.config.curriculum_level(self.step, total)

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        images = batch["image"]
        if self.batch_size is None:  # of the global batch: a distributed rank sees a share
            self.batch_size = round(distributed.all_sum(images.shape[0]))
        level = self.curriculum_level()
        images, masks = paint_defects(images, self.config, self.step, level)
        losses = self.train_on_pairs(images, masks)
        self.step += 1
        return {**losses, "curriculum": level}

    def training_state(self) -> dict[str, Any]:
        return {**super().training_state(), "step": self.step, "batch_size": self.batch_size}

    def load_training_state(self, state: dict[str, Any]) -> None:
        super().load_training_state(state)
        self.step = int(state.get("step", 0))
        size = state.get("batch_size")
        self.batch_size = None if size is None else int(size)


@register
class SynthUNet3Plus(SynthUNet):
    """UNet3+ trained on normal images with procedurally painted defects (curriculum)."""

    name: ClassVar[str] = "synth-unet3plus"
    description: ClassVar[str] = (
        "UNet3+ trained on procedural defects painted on normal images (curriculum easy→subtle)"
    )
    architecture: ClassVar[str] = "unet3plus"
