"""Fusion of several trained runs' predictions by majority vote (``ensemble`` detector's
``combine="vote"`` and the segmentation benchmarks)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from defectlab.base import Prediction


@dataclass
class Vote:
    """Result of :func:`vote_ensemble`: vote shares as a :class:`Prediction` (scores (B,),
    maps (B, H, W), each the share of members voting "defect"), and the decisions at the
    vote threshold (image (B,) and pixel (B, H, W) bool)."""

    shares: Prediction
    images: torch.Tensor
    pixels: torch.Tensor


def _per_member(value: float | Sequence[float], count: int, name: str) -> torch.Tensor:
    values = [float(value)] * count if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) != count:
        raise ValueError(f"{name}: {len(values)} thresholds for {count} members")
    return torch.tensor(values)


def vote_ensemble(
    predictions: Sequence[Prediction],
    *,
    image_thresholds: float | Sequence[float] = 0.5,
    pixel_thresholds: float | Sequence[float] = 0.5,
    vote_threshold: float = 0.5,
) -> Vote:
    """Majority vote of several trained runs' predictions (maps at one size).

    Member m votes "defect" for an image whose score is at least ``image_thresholds[m]``
    and for a pixel whose map value is at least ``pixel_thresholds[m]`` (one number for all
    members: 0.5 suits probability outputs such as the segmenters here; per member: e.g. each
    run's calibrated thresholds). An image (pixel) is defective when the share of members
    voting so is at least ``vote_threshold`` (0.5: majority, 1.0: unanimity, 1/M: any).
    """
    if not predictions:
        raise ValueError("vote_ensemble needs at least one prediction")
    if not 0 < vote_threshold <= 1:
        raise ValueError(f"vote_threshold must be in (0, 1], got {vote_threshold}")
    count = len(predictions)
    scores = torch.stack([p.scores for p in predictions])
    maps = torch.stack([p.maps for p in predictions])
    image_levels = _per_member(image_thresholds, count, "image_thresholds").to(scores)
    pixel_levels = _per_member(pixel_thresholds, count, "pixel_thresholds").to(maps)
    score_share = (scores >= image_levels[:, None]).float().mean(dim=0)
    map_share = (maps >= pixel_levels.view(-1, 1, 1, 1)).float().mean(dim=0)
    # shares are k / M: a tolerance keeps 2/3 >= 0.6667-style thresholds from rounding away
    return Vote(
        Prediction(score_share, map_share),
        score_share >= vote_threshold - 1e-6,
        map_share >= vote_threshold - 1e-6,
    )
