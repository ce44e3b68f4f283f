"""Fusion of trained detectors by their normal-score statistics (the seed's S2 toolbox).

Detectors score on unrelated scales (a z-score, a reconstruction error, a negative
log-likelihood). The ensemble loads already trained runs, measures each member's image-score
and map-value mean and standard deviation on the normal training images, and combines the
members' z-scores (weighted mean, or max for "any detector fires"). Training it is one pass
of inference over normal images; no defect labels are needed.

``combine="route"`` is the seed's router for lines that inspect several product types, one
detector per type: an image-type classifier (nearest centroid of a thumbnail + histogram
descriptor, fitted on each member's own training images) sends every image to the member
trained on its type, and that member's z-scores are the output. Normal statistics are then
measured per member on the images routed to it.

``combine="vote"`` is the segmenter-style majority vote: each member votes "defect" for an
image (pixel) at its own calibrated threshold; the output is the share of members voting so,
and the run's decision threshold is ``vote_threshold`` (0.5 majority, 1.0 unanimity).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from defectlab.base import ModelConfig, Prediction
from defectlab.components.fusion import adapt_batch, resize_maps, vote_ensemble
from defectlab.data.loading import load_samples
from defectlab.data.splits import Split
from defectlab.detect.base import Detector
from defectlab.errors import DataError
from defectlab.registry import register

COMBINE = ("mean", "max", "route", "vote")
THUMBNAIL = 16
HISTOGRAM_BINS = 16


@dataclass
class EnsembleConfig(ModelConfig):
    #: run directories of trained detectors (at least two)
    runs: tuple[str, ...] = ()
    #: one non-negative weight per run; empty = equal weights
    weights: tuple[float, ...] = ()
    #: "mean": weighted mean of z-scores; "max": the most alarmed member decides;
    #: "route": an image-type classifier picks one member per image
    combine: str = "mean"
    #: route: at most this many of each member's training images fit the router
    router_images: int = 64
    #: vote: share of members that must vote "defect"
    vote_threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.epochs != 1:
            raise ValueError("ensemble measures its members in one pass: epochs must be 1")
        if self.combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {self.combine!r}")
        if self.weights and len(self.weights) != len(self.runs):
            raise ValueError(f"{len(self.weights)} weights for {len(self.runs)} runs")
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) == 0):
            raise ValueError(f"weights must be non-negative and not all zero: {self.weights}")
        if not 0 < self.vote_threshold <= 1:
            raise ValueError(f"vote_threshold must be in (0, 1], got {self.vote_threshold}")
        if self.router_images < 1:
            raise ValueError(f"router_images must be positive, got {self.router_images}")


def image_type_descriptor(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) in [0, 1] → (B, 16·16 + 16): a grey thumbnail (layout) and an intensity
    histogram (material), enough to tell product types apart, cheap enough for every image."""
    grey = images.mean(dim=1, keepdim=True)
    thumbnail = F.adaptive_avg_pool2d(grey, THUMBNAIL).flatten(1)
    bins = (grey.flatten(1).clamp(0, 1) * (HISTOGRAM_BINS - 1e-6)).long()
    histogram = F.one_hot(bins, HISTOGRAM_BINS).float().mean(dim=1)
    return torch.cat([thumbnail, histogram], dim=1)


@register
class Ensemble(Detector):
    name: ClassVar[str] = "ensemble"
    description: ClassVar[str] = (
        "fusion of trained detector runs by their normal-score statistics (z-scores)"
    )
    Config = EnsembleConfig
    config: EnsembleConfig
    state_version: ClassVar[int] = 2

    def __init__(self, config: EnsembleConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        if len(self.config.runs) < 2:
            raise ValueError("an ensemble needs at least two trained runs: --set runs=RUN1,RUN2")
        from defectlab.runs import load_run  # runs load through the registry, which imports us

        runs = [load_run(run, str(self.device)) for run in self.config.runs]
        self.members = [run.model for run in runs]
        self.member_thresholds = [(run.image_threshold, run.pixel_threshold) for run in runs]
        self.member_data = [run.config.data for run in runs]  # what each member was fed
        weights = self.config.weights or (1.0,) * len(self.members)
        self.weights = torch.tensor(weights, device=self.device) / sum(weights)
        count = len(self.members)
        #: per member: score sum, sum of squares, map sum, sum of squares, image count
        self._sums = torch.zeros(count, 5, dtype=torch.float64, device=self.device)
        self._pixels = torch.zeros(count, dtype=torch.float64, device=self.device)
        self.stats: torch.Tensor | None = None  # (members, 4): score mean, std, map mean, std
        #: route: per-member descriptor centroids and the per-dimension scale
        self.centroids: torch.Tensor | None = None
        self.descriptor_scale: torch.Tensor | None = None

    @property
    def decision_thresholds(self) -> tuple[float, float] | None:
        """Vote mode decides at the vote threshold, not at a quantile of normal vote shares
        (which take only M + 1 values); the API's quantile calibration defers to this."""
        if self.config.combine != "vote":
            return None
        level = self.config.vote_threshold - 1e-6  # shares are k / M, compared with >=
        return level, level

    def setup_training(self, n_train: int) -> None:
        if self.config.combine == "route" and self.centroids is None:
            self._fit_router()

    def _fit_router(self) -> None:
        """Nearest-centroid image-type classifier from each member's own training images."""
        descriptors = []
        for run, data in zip(self.config.runs, self.member_data, strict=True):
            train = Split.load(Path(run) / "split.json")["train"]
            step = max(1, len(train) // self.config.router_images)
            loaded = load_samples(
                train[::step][: self.config.router_images],
                data.image_size,
                data.channels,
                data.mask_threshold,
                workers=data.workers,
                desc=f"{run}: router images",
                progress=False,
            )
            if not len(loaded.samples):
                raise DataError(f"{run}: none of its training images can be read to fit the router")
            images = torch.from_numpy(loaded.images.transpose(0, 3, 1, 2)).to(self.device)
            descriptors.append(image_type_descriptor(images))
        pooled = torch.cat(descriptors)
        self.descriptor_scale = pooled.std(dim=0).clamp_min(1e-3)
        self.centroids = torch.stack([d.mean(dim=0) for d in descriptors]) / self.descriptor_scale

    def route(self, images: torch.Tensor) -> torch.Tensor:
        """Index of the member each image goes to (route mode)."""
        self.check_fitted(
            self.centroids is not None and self.descriptor_scale is not None,
            "no member centroids",
            action="route",
        )
        descriptor = image_type_descriptor(images.to(self.device)) / self.descriptor_scale
        return torch.cdist(descriptor, self.centroids).argmin(dim=1)

    def export_blocker(self) -> str | None:
        for run, member in zip(self.config.runs, self.members, strict=True):
            reason = member.export_blocker()
            if reason:
                return f"member {run} ({member.name}): {reason}"
        return None

    def _member_outputs(self, images: torch.Tensor) -> list[Prediction]:
        return [
            member.predict(adapt_batch(images, member.image_size, member.channels))
            for member in self.members
        ]

    @torch.no_grad()
    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        images = batch["image"].to(self.device)
        n = images.shape[0]
        routed = self.route(images) if self.config.combine == "route" else None
        for i, out in enumerate(self._member_outputs(images)):
            take = torch.ones(n, dtype=torch.bool, device=self.device)
            if routed is not None:
                take = routed == i
            scores, maps = out.scores.double()[take], out.maps.double()[take]
            self._sums[i] += torch.stack(
                [scores.sum(), (scores**2).sum(), maps.sum(), (maps**2).sum(), take.sum()]
            )
            self._pixels[i] += maps.numel()
        return {}

    def finish_training(self) -> None:
        count = self._sums[:, 4]
        if bool((count == 0).any()):
            idle = [run for run, c in zip(self.config.runs, count, strict=True) if c == 0]
            raise DataError(
                f"no training image was routed to {', '.join(idle)}: the ensemble's data "
                "must hold normal images of every member's type"
            )
        score_mean = self._sums[:, 0] / count
        score_var = self._sums[:, 1] / count - score_mean**2
        map_mean = self._sums[:, 2] / self._pixels
        map_var = self._sums[:, 3] / self._pixels - map_mean**2
        score_std = score_var.clamp_min(0).sqrt().clamp_min(1e-8)
        map_std = map_var.clamp_min(0).sqrt().clamp_min(1e-8)
        self.stats = torch.stack([score_mean, score_std, map_mean, map_std], dim=1).float()

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        self.check_fitted(self.stats is not None, "no member score statistics")
        size = (images.shape[-2], images.shape[-1])
        outputs = [
            Prediction(out.scores, resize_maps(out.maps, size))
            for out in self._member_outputs(images.to(self.device))
        ]
        if self.config.combine == "vote":
            return vote_ensemble(
                outputs,
                image_thresholds=[t[0] for t in self.member_thresholds],
                pixel_thresholds=[t[1] for t in self.member_thresholds],
                vote_threshold=self.config.vote_threshold,
            ).shares
        mean, std, map_mean, map_std = self.stats.T
        scores = torch.stack([o.scores for o in outputs])
        maps = torch.stack([o.maps for o in outputs])
        scores = (scores - mean[:, None]) / std[:, None]
        maps = (maps - map_mean.view(-1, 1, 1, 1)) / map_std.view(-1, 1, 1, 1)
        if self.config.combine == "route":
            member = self.route(images)
            pick = torch.arange(images.shape[0], device=self.device)
            return Prediction(scores[member, pick], maps[member, pick])
        if self.config.combine == "max":
            return Prediction(scores.max(dim=0).values, maps.max(dim=0).values)
        w = self.weights
        return Prediction((w[:, None] * scores).sum(0), (w[:, None, None, None] * maps).sum(0))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "runs": list(self.config.runs),
            "sums": self._sums,
            "pixels": self._pixels,
        }
        if self.stats is not None:
            state["stats"] = self.stats
        if self.centroids is not None and self.descriptor_scale is not None:
            state["centroids"] = self.centroids
            state["descriptor_scale"] = self.descriptor_scale
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["runs"]) != list(self.config.runs):
            raise ValueError(f"statistics were measured for runs {state['runs']}")
        self._sums = state["sums"].to(self.device)
        self._pixels = state["pixels"].to(self.device)
        if "stats" in state:
            self.stats = state["stats"].to(self.device)
        if "centroids" in state:
            self.centroids = state["centroids"].to(self.device)
            self.descriptor_scale = state["descriptor_scale"].to(self.device)
