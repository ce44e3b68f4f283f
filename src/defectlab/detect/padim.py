"""``padim``: one Gaussian per patch position of frozen EfficientNet-Lite features (PaDiM,
Defard et al., ICPR 2020).

* **Patch features**: the outputs of the ``backbone``'s ``feature_blocks`` (default its last
  stride-8 and stride-16 blocks), the coarser map bilinearly up-sampled to the stride-8 grid
  and concatenated (D = 152 for Lite0); ``feature_subset`` > 0 keeps a seeded random subset
  of that many channels (PaDiM's random dimension reduction), 0 keeps all.
* **Model**: at every grid position (i, j) the normal features follow N(μ_ij, Σ_ij), with
  Σ_ij the unbiased sample covariance plus ``covariance_ridge`` · I (PaDiM: 0.01) so it stays
  invertible with few images. Training is one streaming pass that accumulates per-position
  sums and outer-product sums in float64, so memory does not grow with the image count; the
  inverses are taken once at the end (Cholesky, float64).
* **Anomaly map**: the Mahalanobis distance of each position's feature to its Gaussian,
  bilinearly up-sampled to the image and smoothed with a Gaussian of ``map_sigma`` pixels.
* **Image score**: the maximum of the map (``score="max"``, PaDiM) or the mean of its top
  ``score_top_fraction`` (``"topk"``).

A Gaussian per *position* suits aligned parts (cells, tiles, one product view); for
unaligned textures ``patchmemory``'s position-free memory is the better model. Every image
must have the training grid: the model refuses another input size. The backbone weights are
not stored in checkpoints; their identity is, and a checkpoint made with other weights is
refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from defectlab.base import Prediction
from defectlab.components.features import (
    LiteFeatureConfig,
    check_identity,
    model_features,
    patch_embedding,
)
from defectlab.config import check_choice, check_fields
from defectlab.detect.base import Detector
from defectlab.ops import gaussian_blur, top_fraction_mean
from defectlab.registry import register

SCORES = ("max", "topk")
#: bytes the float64 outer-product sums of training may take (positions × D² × 8)
MAX_STATISTICS_BYTES = 2 * 2**30


@dataclass
class PadimConfig(LiteFeatureConfig):
    #: one streaming pass over the normal images
    epochs: int = 1
    #: channels kept: 0 = all; n > 0 = a random subset of n (fixed by ``seed``)
    feature_subset: int = 0
    #: added to every covariance's diagonal, so it stays invertible
    covariance_ridge: float = 0.01
    #: seed of the channel subset
    seed: int = 0
    #: Gaussian smoothing of the up-sampled map, in pixels (PaDiM: 4)
    map_sigma: float = 4.0
    #: image score from the map: "max" (PaDiM) or "topk" (mean of the top share)
    score: str = "max"
    score_top_fraction: float = 0.01

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.epochs != 1:
            raise ValueError("padim makes a single pass over the data: epochs must be 1")
        available = super().feature_dim
        if not 0 <= self.feature_subset <= available:
            raise ValueError(
                f"feature_subset must be in 0-{available} (0 = all channels), "
                f"got {self.feature_subset}"
            )
        check_fields(self, positive=("covariance_ridge",), nonnegative=("map_sigma",))
        check_choice("score", self.score, SCORES)
        if not 0 < self.score_top_fraction <= 1:
            raise ValueError(f"score_top_fraction must be in (0, 1], got {self.score_top_fraction}")

    @property
    def feature_dim(self) -> int:
        """Channels modelled: the subset's, or all the blocks'."""
        return self.feature_subset or super().feature_dim


@register
class Padim(Detector):
    name: ClassVar[str] = "padim"
    description: ClassVar[str] = (
        "PaDiM: a Gaussian per patch position of EfficientNet-Lite features; "
        "map = Mahalanobis distance (aligned parts)"
    )
    Config = PadimConfig
    config: PadimConfig

    def __init__(self, config: PadimConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        cfg = self.config
        self.features = model_features(self, cfg)
        stride = min(self.features.strides)
        self.grid = (self.image_size // stride, self.image_size // stride)
        positions, dim = self.grid[0] * self.grid[1], cfg.feature_dim
        if positions * dim * dim * 8 > MAX_STATISTICS_BYTES:
            raise ValueError(
                f"padim: {positions} positions × {dim}² covariance entries exceed "
                f"{MAX_STATISTICS_BYTES // 2**30} GiB; lower data.image_size, set "
                "feature_subset, or tile the images (data.tile=on)"
            )
        total = sum(self.features.channels)
        generator = torch.Generator().manual_seed(cfg.seed)
        subset = (
            torch.randperm(total, generator=generator)[: cfg.feature_subset].sort().values
            if cfg.feature_subset
            else torch.arange(total)
        )
        self.channel_subset = subset.to(self.device)
        # training statistics (float64): count, Σx (L, D), Σxxᵀ (L, D, D)
        self._count = 0
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None
        # the fitted model: means (L, D) and inverse covariances (L, D, D), float32
        self.mean: torch.Tensor | None = None
        self.precision: torch.Tensor | None = None

    # --- features ------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Per-position features (B, L, D), L = positions of the stride-8 grid, row-major."""
        embedding = patch_embedding(self.features(images.to(self.device)))
        embedding = embedding.index_select(1, self.channel_subset)
        if tuple(embedding.shape[-2:]) != self.grid:
            raise ValueError(
                f"padim: images of {tuple(images.shape[-2:])} px give a "
                f"{tuple(embedding.shape[-2:])} feature grid; this model was built for "
                f"{self.image_size} px ({self.grid} grid): a Gaussian per position needs "
                "the training size"
            )
        return embedding.flatten(2).transpose(1, 2)

    # --- training ------------------------------------------------------------------------------
    @torch.no_grad()
    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        if self.precision is not None:
            raise RuntimeError("padim: the Gaussians are final; make a new model to refit")
        rows = self.embed(batch["image"]).double()  # (B, L, D)
        if self._sum is None or self._outer is None:
            positions, dim = rows.shape[1:]
            self._sum = torch.zeros(positions, dim, dtype=torch.float64, device=self.device)
            self._outer = torch.zeros(positions, dim, dim, dtype=torch.float64, device=self.device)
        self._sum += rows.sum(dim=0)
        by_position = rows.transpose(0, 1)  # (L, B, D)
        self._outer += by_position.transpose(1, 2) @ by_position
        self._count += rows.shape[0]
        return {}

    def _finalize(self) -> None:
        if self.precision is not None:
            return
        if self._count < 2 or self._sum is None or self._outer is None:
            raise RuntimeError(
                f"padim: a covariance needs at least 2 training images, got {self._count}"
            )
        n = self._count
        mean = self._sum / n
        covariance = (self._outer - n * mean[:, :, None] * mean[:, None, :]) / (n - 1)
        covariance += self.config.covariance_ridge * torch.eye(
            mean.shape[1], dtype=torch.float64, device=self.device
        )
        self.mean = mean.float()
        self.precision = torch.cholesky_inverse(torch.linalg.cholesky(covariance)).float()
        self._sum = self._outer = None

    def end_epoch(self, epoch: int) -> None:
        # one epoch is all of training: invert now, so the epoch-end checkpoint is the model
        self._finalize()

    def finish_training(self) -> None:
        self._finalize()

    # --- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        self.check_fitted(self.precision is not None, "no Gaussians")
        assert self.mean is not None and self.precision is not None
        images = images.to(self.device)
        delta = (self.embed(images) - self.mean).transpose(0, 1)  # (L, B, D)
        squared = ((delta @ self.precision) * delta).sum(dim=2).clamp_min(0)  # (L, B)
        distance = squared.sqrt().transpose(0, 1).reshape(-1, 1, *self.grid)
        maps = F.interpolate(distance, size=images.shape[-2:], mode="bilinear", align_corners=False)
        maps = gaussian_blur(maps, self.config.map_sigma)[:, 0]
        if self.config.score == "max":
            scores = maps.flatten(1).amax(dim=1)
        else:
            scores = top_fraction_mean(maps, self.config.score_top_fraction)
        return Prediction(scores, maps)

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"backbone": self.features.identity(), "count": self._count}
        if self.mean is not None and self.precision is not None:
            state["mean"] = self.mean.cpu()
            state["precision"] = self.precision.cpu()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_identity(self.name, dict(state["backbone"]), self.features.identity())
        positions, dim = self.grid[0] * self.grid[1], self.config.feature_dim
        mean, precision = state.get("mean"), state.get("precision")
        if mean is not None and (
            tuple(mean.shape) != (positions, dim)
            or precision is None
            or tuple(precision.shape) != (positions, dim, dim)
        ):
            raise ValueError(
                f"padim: saved Gaussians have shape {tuple(mean.shape)}, need "
                f"({positions}, {dim}) for {self.image_size} px and these settings"
            )
        self._count = int(state["count"])
        self.mean = mean.float().to(self.device) if mean is not None else None
        self.precision = precision.float().to(self.device) if precision is not None else None

    def training_state(self) -> dict[str, Any]:
        if self._sum is None or self._outer is None:
            return {}
        return {"sum": self._sum.cpu().clone(), "outer": self._outer.cpu().clone()}

    def load_training_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        positions, dim = self.grid[0] * self.grid[1], self.config.feature_dim
        total, outer = state["sum"], state["outer"]
        if tuple(total.shape) != (positions, dim) or tuple(outer.shape) != (positions, dim, dim):
            raise ValueError(
                f"padim: saved statistics have shape {tuple(total.shape)}, need "
                f"({positions}, {dim})"
            )
        self._sum = total.double().to(self.device)
        self._outer = outer.double().to(self.device)
