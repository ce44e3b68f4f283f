"""Fusion of trained detectors by their normal-score statistics (MISSION.md S2).

Detectors score on unrelated scales (a z-score, a reconstruction error, a negative
log-likelihood). The ensemble loads already trained runs, measures each member's image-score
and map-value mean and standard deviation on the normal training images, and combines the
members' z-scores (weighted mean, or max for "any detector fires"). Training it is one pass
of inference over normal images; no defect labels are needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from defectlab.base import ModelConfig, Prediction
from defectlab.detect.base import Detector
from defectlab.registry import register

COMBINE = ("mean", "max")


@dataclass
class EnsembleConfig(ModelConfig):
    #: run directories of trained detectors (at least two)
    runs: tuple[str, ...] = ()
    #: one non-negative weight per run; empty = equal weights
    weights: tuple[float, ...] = ()
    #: "mean": weighted mean of z-scores; "max": the most alarmed member decides
    combine: str = "mean"

    def __post_init__(self) -> None:
        if self.epochs != 1:
            raise ValueError("ensemble measures its members in one pass: epochs must be 1")
        if self.combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {self.combine!r}")
        if self.weights and len(self.weights) != len(self.runs):
            raise ValueError(f"{len(self.weights)} weights for {len(self.runs)} runs")
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) == 0):
            raise ValueError(f"weights must be non-negative and not all zero: {self.weights}")


def _adapt(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """Resize/convert an ensemble batch to what one member was trained on."""
    if images.shape[1] != channels:
        if channels == 1:
            luminance = torch.tensor([0.299, 0.587, 0.114], device=images.device)
            images = (images * luminance.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        else:
            images = images.expand(-1, 3, -1, -1)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images


@register
class Ensemble(Detector):
    name: ClassVar[str] = "ensemble"
    description: ClassVar[str] = (
        "fusion of trained detector runs by their normal-score statistics (z-scores)"
    )
    Config = EnsembleConfig
    config: EnsembleConfig

    def __init__(self, config: EnsembleConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if len(self.config.runs) < 2:
            raise ValueError("an ensemble needs at least two trained runs: --set runs=RUN1,RUN2")
        from defectlab.api import load_run  # the API loads runs; it imports this registry

        self.members = [load_run(run, str(self.device)).model for run in self.config.runs]
        weights = self.config.weights or (1.0,) * len(self.members)
        self.weights = torch.tensor(weights, device=self.device) / sum(weights)
        count = len(self.members)
        self._sums = torch.zeros(count, 4, dtype=torch.float64, device=self.device)
        self._pixels = torch.zeros(count, dtype=torch.float64, device=self.device)
        self._count = 0
        self.stats: torch.Tensor | None = None  # (members, 4): score mean, std, map mean, std

    def _member_outputs(self, images: torch.Tensor) -> list[Prediction]:
        return [
            member.predict(_adapt(images, member.image_size, member.channels))
            for member in self.members
        ]

    @torch.no_grad()
    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        for i, out in enumerate(self._member_outputs(batch["image"])):
            scores, maps = out.scores.double(), out.maps.double()
            self._sums[i] += torch.stack(
                [scores.sum(), (scores**2).sum(), maps.sum(), (maps**2).sum()]
            )
            self._pixels[i] += maps.numel()
        self._count += batch["image"].shape[0]
        return {}

    def finish_training(self) -> None:
        score_mean = self._sums[:, 0] / self._count
        score_var = self._sums[:, 1] / self._count - score_mean**2
        map_mean = self._sums[:, 2] / self._pixels
        map_var = self._sums[:, 3] / self._pixels - map_mean**2
        score_std = score_var.clamp_min(0).sqrt().clamp_min(1e-8)
        map_std = map_var.clamp_min(0).sqrt().clamp_min(1e-8)
        self.stats = torch.stack([score_mean, score_std, map_mean, map_std], dim=1).float()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        if self.stats is None:
            raise RuntimeError("ensemble: predict before fit")
        size = (images.shape[-2], images.shape[-1])
        z_scores, z_maps = [], []
        for i, out in enumerate(self._member_outputs(images.to(self.device))):
            mean, std, map_mean, map_std = self.stats[i]
            z_scores.append((out.scores - mean) / std)
            maps = F.interpolate(
                out.maps[:, None], size=size, mode="bilinear", align_corners=False
            )[:, 0]
            z_maps.append((maps - map_mean) / map_std)
        scores, maps = torch.stack(z_scores), torch.stack(z_maps)
        if self.config.combine == "max":
            return Prediction(scores.max(dim=0).values, maps.max(dim=0).values)
        w = self.weights
        return Prediction((w[:, None] * scores).sum(0), (w[:, None, None, None] * maps).sum(0))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "runs": list(self.config.runs),
            "sums": self._sums,
            "pixels": self._pixels,
            "count": self._count,
        }
        if self.stats is not None:
            state["stats"] = self.stats
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["runs"]) != list(self.config.runs):
            raise ValueError(f"statistics were measured for runs {state['runs']}")
        self._sums = state["sums"].to(self.device)
        self._pixels = state["pixels"].to(self.device)
        self._count = int(state["count"])
        if "stats" in state:
            self.stats = state["stats"].to(self.device)
