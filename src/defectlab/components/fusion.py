"""Fusion of several trained runs' predictions: majority vote (``ensemble`` detector's
``combine="vote"`` and the segmentation benchmarks), and a detector's anomaly map with a
segmenter's defect probability (the ``fused`` model the workbench's retrain builds).

A detector's map is on its own scale (a patch distance, a z-score); a segmenter's is a
probability. :func:`detector_probability` puts the detector's map on [0, 1] with the
detector's own calibration (its normal map median and its pixel threshold), so the two can
be multiplied or averaged; :func:`fuse_maps` does it the way :data:`MAP_FUSIONS` names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

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


#: how a detector's map and a segmenter's probability become one map: the segmenter's
#: probability alone; the probability gated by the detector (their product: defect where
#: both agree); their mean (either may find it); the detector's map alone (on [0, 1])
MAP_FUSIONS = ("segmenter", "product", "mean", "detector")


def detector_probability(maps: torch.Tensor, median: float, threshold: float) -> torch.Tensor:
    """A detector's map on [0, 1]: the logistic of its excess over the detector's calibrated
    pixel ``threshold``, in units of that threshold's distance from the normal map
    ``median`` (0.5 at the threshold, about 0.27 at the median). Monotone, so the pixel
    ranking (and pixel AUROC) of the detector is kept."""
    scale = max(float(threshold) - float(median), 1e-6)
    return torch.sigmoid((maps - float(threshold)) / scale)


def fuse_maps(
    detector_maps: torch.Tensor,
    probabilities: torch.Tensor,
    fusion: str,
    median: float,
    threshold: float,
) -> torch.Tensor:
    """One map from a detector's maps and a segmenter's probabilities (same shape), as
    ``fusion`` (one of :data:`MAP_FUSIONS`) says; ``median`` and ``threshold`` are the
    detector's calibration (:func:`detector_probability`)."""
    if fusion == "segmenter":
        return probabilities
    level = detector_probability(detector_maps, median, threshold)
    if fusion == "detector":
        return level
    if fusion == "product":
        return probabilities * level
    if fusion == "mean":
        return 0.5 * (probabilities + level)
    raise ValueError(f"fusion must be one of {', '.join(MAP_FUSIONS)}; got {fusion!r}")


def adapt_batch(images: torch.Tensor, size: int, channels: int) -> torch.Tensor:
    """A batch (B, C, H, W) resized and converted to what one member run was trained on
    (grey by luminance, colour by replication; bilinear resize)."""
    if images.shape[1] != channels:
        if channels == 1:
            luminance = torch.tensor([0.299, 0.587, 0.114], device=images.device)
            images = (images * luminance.view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
        else:
            images = images.expand(-1, 3, -1, -1)
    if images.shape[-1] != size or images.shape[-2] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Maps (B, H, W) resized bilinearly to ``size`` (unchanged when already that size)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
