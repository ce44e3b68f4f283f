"""Per-pixel Gaussian statistics of normal images: the honest baseline.

For aligned parts (solar cells, fixed-position X-ray views) each pixel of a normal image has
a typical grey value. We learn its mean and standard deviation over the (slightly blurred)
normal training images in one streaming pass; the anomaly map is the smoothed absolute
z-score and the image score the mean of the top ``score_top_fraction`` of the map. It has no
learned features, so it is the floor every other detector must clear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from defectlab.base import ModelConfig, Prediction
from defectlab.detect.base import Detector
from defectlab.ops import gaussian_blur, top_fraction_mean
from defectlab.registry import register


@dataclass
class PixelStatsConfig(ModelConfig):
    #: blur before statistics, in pixels at model resolution: tolerates small misalignment
    blur_sigma: float = 1.0
    #: added in quadrature to each pixel's std, so flat regions do not explode the z-score
    min_std: float = 0.02
    #: smoothing of the z-score map, in pixels
    map_sigma: float = 2.0
    #: image score = mean of this top share of map values
    score_top_fraction: float = 0.01

    def __post_init__(self) -> None:
        if self.epochs != 1:
            raise ValueError("pixelstats makes a single pass over the data: epochs must be 1")
        if self.min_std <= 0:
            raise ValueError(f"min_std must be positive, got {self.min_std}")
        if not 0 < self.score_top_fraction <= 1:
            raise ValueError(f"score_top_fraction must be in (0, 1], got {self.score_top_fraction}")


@register
class PixelStats(Detector):
    name: ClassVar[str] = "pixelstats"
    description: ClassVar[str] = (
        "per-pixel mean/std of normal images; map = smoothed |z|, score = top-1% mean (baseline)"
    )
    Config = PixelStatsConfig
    config: PixelStatsConfig

    def __init__(self, config: PixelStatsConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        shape = (self.channels, self.image_size, self.image_size)
        self._sum = torch.zeros(shape, dtype=torch.float64, device=self.device)
        self._sum_sq = torch.zeros(shape, dtype=torch.float64, device=self.device)
        self._count = 0
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        images = gaussian_blur(batch["image"], self.config.blur_sigma).double()
        self._sum += images.sum(dim=0)
        self._sum_sq += (images**2).sum(dim=0)
        self._count += images.shape[0]
        return {}

    def finish_training(self) -> None:
        mean = self._sum / self._count
        variance = (self._sum_sq / self._count - mean**2).clamp_min(0.0)
        self.mean = mean.float()
        self.std = torch.sqrt(variance + self.config.min_std**2).float()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        self.check_fitted(self.mean is not None and self.std is not None, "no pixel statistics")
        images = gaussian_blur(images.to(self.device), self.config.blur_sigma)
        z = ((images - self.mean) / self.std).abs().mean(dim=1, keepdim=True)
        maps = gaussian_blur(z, self.config.map_sigma)[:, 0]
        return Prediction(top_fraction_mean(maps, self.config.score_top_fraction), maps)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"sum": self._sum, "sum_sq": self._sum_sq, "count": self._count}
        if self.mean is not None:
            state |= {"mean": self.mean, "std": self.std}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = self._sum.shape
        if tuple(state["sum"].shape) != tuple(expected):
            raise ValueError(f"statistics have shape {tuple(state['sum'].shape)}, need {expected}")
        self._sum = state["sum"].to(self.device)
        self._sum_sq = state["sum_sq"].to(self.device)
        self._count = int(state["count"])
        if "mean" in state:
            self.mean = state["mean"].to(self.device)
            self.std = state["std"].to(self.device)
