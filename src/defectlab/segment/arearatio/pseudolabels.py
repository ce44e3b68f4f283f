"""Pseudo-labels for ``arearatio-gcn``: which superpixels an image's area ratio makes target.

Vertices are ranked by the GCN's score; the top-ranked vertices whose area fits in the
labelled ratio (minus its margin) become target, those wholly beyond it (plus the margin)
background, the band between ignored (``rule="count"`` cuts on vertex counts instead).
Without help, self-training locks in whatever ranking the random initialisation gave, so the
ranking adds a novelty prior that fades over training (:func:`ranking_scores`);
``novelty_prior=0`` ranks by score alone.
"""

from __future__ import annotations

import math

import torch

from defectlab.segment.arearatio.superpixels import SuperpixelGraph

PSEUDO_LABEL_RULES = ("area", "count")
#: slack on cumulative-area and count comparisons, against float rounding of ratio × total
_TOLERANCE = 1e-9


def pseudo_labels(
    scores: torch.Tensor,
    areas: torch.Tensor,
    ratio: float,
    margin: float = 0.0,
    rule: str = "area",
) -> torch.Tensor:
    """Vertex pseudo-labels of one graph: 1 target, 0 background, -1 ignored.

    Vertices are ranked by ``scores`` (descending; ties keep vertex order). With ``"area"``
    and A the total area: a vertex is target when the cumulative area up to and including it
    is ≤ (r − m)·A, background when the cumulative area *before* it is ≥ (r + m)·A, else
    ignored — so a vertex straddling a cut is never labelled. With ``"count"`` and n
    vertices: the first ⌊(r − m)·n⌋ are target, those from rank ⌈(r + m)·n⌉ on background.
    """
    if rule not in PSEUDO_LABEL_RULES:
        raise ValueError(f"pseudo_label_rule must be one of {PSEUDO_LABEL_RULES}, got {rule!r}")
    ratio, margin = float(ratio), float(margin)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"area_ratio must be in [0, 1], got {ratio}")
    if not 0.0 <= margin < 0.5:
        raise ValueError(f"area_margin must be in [0, 0.5), got {margin}")
    n = scores.numel()
    order = torch.sort(scores.detach().flatten(), descending=True, stable=True).indices
    ranked = torch.full((n,), -1, dtype=torch.long, device=scores.device)
    if rule == "area":
        sorted_areas = areas.detach().flatten()[order].double()
        total = float(sorted_areas.sum())
        inclusive = sorted_areas.cumsum(0)
        exclusive = inclusive - sorted_areas
        tolerance = _TOLERANCE * max(total, 1.0)
        ranked[inclusive <= (ratio - margin) * total + tolerance] = 1
        ranked[exclusive >= (ratio + margin) * total - tolerance] = 0
    else:
        k_target = max(0, min(n, math.floor((ratio - margin) * n + _TOLERANCE)))
        k_background = max(0, min(n, math.ceil((ratio + margin) * n - _TOLERANCE)))
        ranked[:k_target] = 1
        ranked[k_background:] = 0
    labels = torch.empty_like(ranked)
    labels[order] = ranked
    return labels


def ranking_scores(
    graph: SuperpixelGraph,
    vertex_scores: torch.Tensor,
    prior_weight: float,
    images: torch.Tensor | None = None,
    novelty: torch.Tensor | None = None,
) -> torch.Tensor:
    """What pseudo-labels rank vertices by: the vertex scores, plus — while
    ``prior_weight`` > 0 — ``prior_weight`` × the vertex novelty, both standardised per image.
    Novelty is ``novelty`` (N,) when given (e.g. the distance to a memory of normal
    patches), else the squared distance of the vertex's mean colour in ``images`` (B, C, H,
    W) (or, without images, its mean feature) from the image's mean: the target is usually
    the odd region out, and the prior stops self-training from locking in a random initial
    ranking."""
    scores = vertex_scores.detach()
    if prior_weight <= 0:
        return scores
    features = graph.vertex_features.detach() if images is None else graph.vertex_mean(images)
    out = torch.empty_like(scores)
    for start, count in zip(graph.offsets.tolist(), graph.counts.tolist(), strict=True):
        part = slice(start, start + count)
        if novelty is not None:
            vertex_novelty = novelty[part]
        else:
            areas = graph.vertex_areas[part].unsqueeze(1)
            mean = (features[part] * areas).sum(0) / areas.sum()
            vertex_novelty = (features[part] - mean).pow(2).sum(1)
        out[part] = _standardise(scores[part]) + prior_weight * _standardise(vertex_novelty)
    return out


def _standardise(x: torch.Tensor) -> torch.Tensor:
    if x.numel() < 2:
        return torch.zeros_like(x)
    return (x - x.mean()) / x.std().clamp_min(1e-12)
