"""Segmentation from area-ratio labels with a graph network (``arearatio-gcn``, seed 004).

Each training image carries only the *fraction of its area* the target covers (optionally ±
an absolute error margin), not a mask. The model turns that weak label into per-vertex
pseudo-labels on a superpixel graph:

1. a fully convolutional network gives a ``feature_dim`` feature per pixel: a small
   encoder-decoder trained from scratch (:class:`PixelFeatureNet`, stride 4 inside, full
   resolution out; ``encoder="plain"``), or a U-Net decoder over the frozen ImageNet
   EfficientNet-Lite0 (:class:`Lite0PixelFeatureNet`, ``encoder="lite0"``: on magnetic tile
   it doubles the Dice of the plain FCN; the README has the numbers);
2. :func:`superpixels` clusters the pixels on (standardised feature, position) — a batched,
   vectorised SLIC: grid-seeded centres, each pixel compares only the 3 × 3 grid cells
   around its own, a fixed number of iterations, so the result is deterministic. Superpixels
   need not be spatially connected (SLIC's connectivity clean-up is left out);
3. :func:`build_graph`: every superpixel is a vertex whose feature is the scatter-mean of its
   pixels' features (the gradient reaches the FCN through this mean); edges join superpixels
   that touch in the 4-neighbourhood (symmetric, no self-loops), with weight
   ``exp(-‖f_i − f_j‖² / σ²)`` from the Euclidean distance of the vertex features (σ² =
   ``edge_sigma``², or the batch's mean squared edge distance when ``edge_sigma`` is 0; the
   weights are computed from detached features). All images of a batch form one
   block-diagonal graph;
4. :class:`GraphConvNet`, 2–3 Kipf–Welling layers ``D^-1/2 (A + I) D^-1/2 H W`` written in
   plain torch (``index_add``) — PyTorch Geometric would do, but the core package stays light
   — gives one logit per vertex;
5. :func:`pseudo_labels` re-derives vertex labels at every step (the seed's "repeat"): with
   ``pseudo_label_rule="area"`` (default) the top-ranked vertices whose cumulative area fits
   in (r − m) of the image are target, those lying wholly beyond (r + m) are background, the
   band in between (and any vertex straddling a cut) is ignored; ``"count"`` is the seed's
   literal rule on vertex counts, k = ratio × vertex count;
6. the loss is BCE on the pseudo-labelled vertices, weighted by vertex area
   (``area_weighted_loss``) with target and background given equal total weight
   (``balance_classes``: the target is often a few per cent of the image, and unbalanced BCE
   leaves it at low probability), plus the squared difference between the predicted
   foreground share (area-weighted mean vertex probability) and r (``area_loss_weight``).

Two additions to the seed, both switchable, make self-training from a random start reliable:
the ranking used for pseudo-labels is the vertex score *plus* a decaying **novelty prior**
(:func:`ranking_scores`: distance of the vertex's mean colour from the image's mean colour,
both standardised per image; weight ``novelty_prior`` fading to 0 over ``prior_steps``), and
the class balance above. Without the prior, the seed's rule locks in whatever ranking the
random initialisation gave — on the synthetic blobs of the tests, two of four seeds then
segment the background. ``novelty_prior=0`` restores the seed's rule exactly.

``novelty="memory"`` (an extension for training sets that hold normal images): in the first
epoch a ``patchmemory`` coreset of frozen Lite0 patch features is built from a seeded share
``memory_share`` of the normal training images (seed ``noise_seed``); from then on each
pixel's distance to it (its patch's nearest memory row, up-sampled) is the novelty of the
ranking prior (vertex mean) and a second input channel of the FCN, so the trained model
keeps it. The memory images are left out of the graph training: their own patches are in
the memory at distance zero, unlike any image at test time. On magnetic tile the colour
prior ranks defect pixels at chance (pixel AUROC 0.53), the memory distance at 0.83.

Training ratios come from ``batch["area_ratio"]`` (B,) when present; otherwise from
``batch["mask"].mean``. :meth:`AreaRatioGCN.derive_area_ratios` turns masks into ratios once
per image (the benchmark's ``--derive-area-from-masks``), with ``ratio_noise`` times one
U(1 − ``ratio_noise``, 1 + ``ratio_noise``) factor per image (clipped to [0, 1]) to mimic human
estimates: a person's error on an image stays the same however often the image is seen, so
the noise is drawn once, never per batch (a fresh draw every epoch would average out).
Margins come from ``batch["area_margin"]`` or ``area_margin``.

Prediction paints each vertex's probability back onto its pixels; the image score is the
map's maximum or the mean of its top ``score_top_fraction`` (= area-weighted top mean of the
vertices). The model fixes its own thresholds (``decision_thresholds``, the API's calibration
``"model"``, its default): a pixel is target when its vertex's probability is at least 0.5, the
point the class-balanced BCE trains around. The image threshold stays a quantile of normal
validation scores: on magnetic tile the top 1% of a normal image's map averaged 0.99, so the
image score separates by rank, not at 0.5.
``calibration.method=area`` instead matches the flagged area of the training images to their
ratios; on magnetic tile that threshold came out too high (0.85–0.95), as the training maps fit
their own pseudo-labels more confidently than new images' maps.

:func:`read_area_ratio_csv` reads the ``path,area_ratio[,margin]`` label files.
"""

from __future__ import annotations

import csv
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from defectlab.base import ModelConfig, Prediction
from defectlab.detect.patchmemory import PatchMemory, PatchMemoryConfig, seeded_fold
from defectlab.errors import DataError, TrainingError
from defectlab.ops import top_fraction_mean
from defectlab.registry import register
from defectlab.segment.base import Segmenter
from defectlab.segment.networks import (
    ENCODERS,
    Lite0Encoder,
    TrainableState,
    UNetDecoder,
    check_encoder_input,
    load_network_state,
    network_state,
)

PSEUDO_LABEL_RULES = ("area", "count")
NOVELTY = ("colour", "memory")
SCORES = ("top_mean", "max")
#: total down-sampling inside the FCN: image sides must be multiples of it
FCN_STRIDE = 4
#: slack on cumulative-area and count comparisons, against float rounding of ratio × total
_TOLERANCE = 1e-9


# --- labels --------------------------------------------------------------------------------
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


# --- superpixels and graph -------------------------------------------------------------------
def _grid_shape(n_segments: int, height: int, width: int) -> tuple[int, int]:
    rows = min(height, max(1, round(math.sqrt(n_segments * height / width))))
    cols = min(width, max(1, round(n_segments / rows)))
    return rows, cols


def superpixels(
    features: torch.Tensor,
    n_segments: int,
    position_weight: float = 1.0,
    iterations: int = 5,
) -> torch.Tensor:
    """SLIC-style clustering of pixels on (feature, position): (B, D, H, W) → labels (B, H, W)
    long, ids 0 … n_b − 1 contiguous per image, about ``n_segments`` per image.

    Features are standardised per image (zero mean, unit mean channel variance) so that
    ``position_weight`` has one meaning whatever the feature scale: the distance is the mean
    squared feature difference plus ``position_weight``² × (pixel distance / grid spacing)².
    Centres start on a regular grid; each pixel only considers the centres of the 3 × 3 grid
    cells around its own (SLIC's 2S window), so memory is O(B·D·H·W). An empty cluster dies.
    """
    if n_segments < 1:
        raise ValueError(f"n_segments must be >= 1, got {n_segments}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    b, d, h, w = features.shape
    device = features.device
    rows, cols = _grid_shape(n_segments, h, w)
    k, p = rows * cols, h * w
    with torch.no_grad():
        f = features.detach().float().flatten(2)
        f = f - f.mean(dim=2, keepdim=True)
        f = f / f.pow(2).mean(dim=(1, 2), keepdim=True).sqrt().clamp_min(1e-6)
        yy, xx = torch.meshgrid(
            torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
        )
        yy, xx = yy.flatten(), xx.flatten()
        cell_y, cell_x = yy * rows // h, xx * cols // w
        spacing = math.sqrt(p / k)
        pos = torch.stack([yy, xx]).float().div(spacing).unsqueeze(0).expand(b, 2, p)
        candidates = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                cy, cx = cell_y + dy, cell_x + dx
                valid = (cy >= 0) & (cy < rows) & (cx >= 0) & (cx < cols)
                candidates.append((cy.clamp(0, rows - 1) * cols + cx.clamp(0, cols - 1), valid))
        labels = (cell_y * cols + cell_x).unsqueeze(0).expand(b, p).contiguous()
        weight2 = float(position_weight) ** 2
        for _ in range(iterations):
            counts = torch.zeros(b, k, device=device).scatter_add_(
                1, labels, torch.ones(b, p, device=device)
            )
            denom = counts.clamp_min(1.0).unsqueeze(1)
            f_centre = torch.zeros(b, d, k, device=device)
            f_centre.scatter_add_(2, labels.unsqueeze(1).expand(b, d, p), f)
            p_centre = torch.zeros(b, 2, k, device=device)
            p_centre.scatter_add_(2, labels.unsqueeze(1).expand(b, 2, p), pos)
            f_centre, p_centre = f_centre / denom, p_centre / denom
            best = torch.full((b, p), math.inf, device=device)
            best_label = labels.clone()
            for index, valid in candidates:
                dist = (f - f_centre[:, :, index]).pow(2).mean(dim=1)
                dist = dist + weight2 * (pos - p_centre[:, :, index]).pow(2).sum(dim=1)
                alive = valid.unsqueeze(0) & (counts[:, index] > 0)
                dist = torch.where(alive, dist, torch.full_like(dist, math.inf))
                better = dist < best
                best = torch.where(better, dist, best)
                best_label = torch.where(better, index.unsqueeze(0).expand(b, p), best_label)
            labels = best_label
        present = torch.zeros(b, k, dtype=torch.long, device=device)
        present.scatter_(1, labels, 1)
        new_ids = present.cumsum(1) - 1
        return new_ids.gather(1, labels).view(b, h, w)


def superpixel_adjacency(superpixel_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Edges of the batch's block-diagonal superpixel graph and the vertex count per image.

    Vertex ids are global: image b's superpixel j is ``offsets[b] + j``. Two vertices are
    joined when some 4-neighbour pixel pair carries their labels; the edge list (2, E) is
    symmetric, without duplicates or self-loops, sorted by (source, target).
    """
    b = superpixel_labels.shape[0]
    counts = superpixel_labels.flatten(1).amax(dim=1) + 1
    offsets = counts.cumsum(0) - counts
    g = superpixel_labels + offsets.view(b, 1, 1)
    a = torch.cat([g[:, :, :-1].flatten(), g[:, :-1, :].flatten()])
    c = torch.cat([g[:, :, 1:].flatten(), g[:, 1:, :].flatten()])
    keep = a != c
    src = torch.cat([a[keep], c[keep]])
    dst = torch.cat([c[keep], a[keep]])
    n = int(counts.sum())
    keys = torch.unique(src * n + dst)
    return torch.stack([keys // n, keys % n]), counts


@dataclass
class SuperpixelGraph:
    """One block-diagonal graph for a batch: vertices of image b are
    ``offsets[b] … offsets[b] + counts[b] − 1``."""

    superpixel_labels: torch.Tensor  # (B, H, W) per-image ids
    counts: torch.Tensor  # (B,) vertices per image
    offsets: torch.Tensor  # (B,) first global vertex id of each image
    vertex_features: torch.Tensor  # (N, D) scatter-mean of pixel features (with gradient)
    vertex_areas: torch.Tensor  # (N,) pixels per vertex
    edge_index: torch.Tensor  # (2, E) symmetric, no self-loops
    edge_weight: torch.Tensor  # (E,)

    def global_labels(self) -> torch.Tensor:
        return self.superpixel_labels + self.offsets.view(-1, 1, 1)

    def vertex_mean(self, pixels: torch.Tensor) -> torch.Tensor:
        """Mean of pixel values (B, C, H, W) per vertex → (N, C)."""
        flat = self.global_labels().flatten()
        values = pixels.permute(0, 2, 3, 1).reshape(-1, pixels.shape[1])
        sums = torch.zeros(len(self.vertex_areas), pixels.shape[1], device=pixels.device)
        return sums.index_add(0, flat, values.float()) / self.vertex_areas.clamp_min(1)[:, None]

    def paint(self, vertex_values: torch.Tensor) -> torch.Tensor:
        """Vertex values (N,) → pixel map (B, H, W)."""
        return vertex_values[self.global_labels()]


def edge_weights(
    vertex_features: torch.Tensor, edge_index: torch.Tensor, sigma: float = 0.0
) -> torch.Tensor:
    """``exp(-‖f_i − f_j‖² / σ²)`` per edge; σ² is the mean squared edge distance when
    ``sigma`` is 0, so weights stay informative whatever the feature scale."""
    f = vertex_features.detach()
    dist2 = (f[edge_index[0]] - f[edge_index[1]]).pow(2).sum(dim=1)
    scale = float(dist2.mean()) if dist2.numel() else 1.0
    if sigma > 0:
        scale = sigma**2
    return torch.exp(-dist2 / max(scale, 1e-12))


def build_graph(
    superpixel_labels: torch.Tensor, features: torch.Tensor, edge_sigma: float = 0.0
) -> SuperpixelGraph:
    """Vertices (mean features, areas) and weighted edges from labels (B, H, W) and pixel
    features (B, D, H, W)."""
    b, d = features.shape[:2]
    edge_index, counts = superpixel_adjacency(superpixel_labels)
    offsets = counts.cumsum(0) - counts
    n = int(counts.sum())
    flat = (superpixel_labels + offsets.view(b, 1, 1)).flatten()
    pixel_features = features.permute(0, 2, 3, 1).reshape(-1, d)
    areas = torch.zeros(n, device=features.device).index_add_(
        0, flat, torch.ones(flat.numel(), device=features.device)
    )
    sums = torch.zeros(n, d, device=features.device, dtype=features.dtype)
    vertex_features = sums.index_add(0, flat, pixel_features) / areas.clamp_min(1).unsqueeze(1)
    weights = edge_weights(vertex_features, edge_index, edge_sigma)
    return SuperpixelGraph(
        superpixel_labels, counts, offsets, vertex_features, areas, edge_index, weights
    )


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


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum() / weights.sum().clamp_min(1e-12)


def _standardise(x: torch.Tensor) -> torch.Tensor:
    if x.numel() < 2:
        return torch.zeros_like(x)
    return (x - x.mean()) / x.std().clamp_min(1e-12)


# --- networks ------------------------------------------------------------------------------
def gcn_propagate(
    x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor
) -> torch.Tensor:
    """Kipf–Welling propagation ``D^-1/2 (A + I) D^-1/2 x`` with weighted A (self-loop
    weight 1), D the degree of A + I.

    Rows are gathered with ``index_select``, not ``x[src]``: the backward of tensor indexing
    accumulates with ``index_put_``, which on the CPU sums duplicate indices in a varying
    order, so two runs of the same seed drifted apart (the gradients differed in the last
    bit on 49 of 50 tries); ``index_select``'s backward (``index_add``) is deterministic."""
    src, dst = edge_index
    weight = edge_weight.to(x.dtype)
    degree = torch.ones(x.shape[0], device=x.device, dtype=x.dtype).index_add(0, src, weight)
    inv_sqrt = degree.rsqrt()
    norm = inv_sqrt.index_select(0, src) * weight * inv_sqrt.index_select(0, dst)
    out = x * (inv_sqrt * inv_sqrt).unsqueeze(1)
    return out.index_add(0, dst, x.index_select(0, src) * norm.unsqueeze(1))


class GraphConvNet(nn.Module):
    """``layers`` graph convolutions (ReLU between) from ``in_dim`` features to one logit."""

    def __init__(self, in_dim: int, hidden: int, layers: int = 2) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (layers - 1) + [1]
        self.linears = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(
        self, x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor
    ) -> torch.Tensor:
        for i, linear in enumerate(self.linears):
            x = gcn_propagate(linear(x), edge_index, edge_weight)
            if i < len(self.linears) - 1:
                x = F.relu(x)
        return x[:, 0]


def _block(c_in: int, c_out: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(2):
        layers += [
            nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False),
            nn.GroupNorm(math.gcd(8, c_out), c_out),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*layers)


class PixelFeatureNet(nn.Module):
    """Three-stage encoder-decoder (widths w, 2w, 4w; two 2× poolings, skip connections) with
    a 1×1 head to ``feature_dim``: one feature per input pixel. GroupNorm, not BatchNorm, so
    training and inference compute the same thing on small batches. w = 24: about 0.27 M
    parameters."""

    def __init__(self, channels: int, width: int, feature_dim: int) -> None:
        super().__init__()
        w = width
        self.enc1, self.enc2, self.enc3 = (
            _block(channels, w),
            _block(w, 2 * w),
            _block(2 * w, 4 * w),
        )
        self.dec2, self.dec1 = _block(6 * w, 2 * w), _block(3 * w, w)
        self.head = nn.Conv2d(w, feature_dim, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(images)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(e3, scale_factor=2.0), e2], dim=1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], dim=1))
        return self.head(d1)


class Lite0PixelFeatureNet(TrainableState):
    """Per-pixel features on the frozen ImageNet EfficientNet-Lite0 (``encoder="lite0"``):
    a U-Net decoder (GroupNorm stages, widths mirroring Lite0's) over its stride-2 to
    stride-32 stages — the network of the ``unet-lite0`` upper bound — then, at full
    resolution, the up-sampled decoder output concatenated with the raw input channels
    (the image, and the memory distance when there is one) through one ``_block`` of
    ``width`` and a 1×1 head to ``feature_dim``. Only the decoder and head learn (about
    0.65 M parameters); the first ``image_channels`` input channels go to Lite0."""

    def __init__(
        self,
        image_channels: int,
        extra_channels: int,
        width: int,
        feature_dim: int,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.image_channels = image_channels
        self.encoder = Lite0Encoder(freeze=True, device=device)
        self.decoder = UNetDecoder(self.encoder.channels, block=_block)
        self.refine = _block(self.decoder.out_channels + image_channels + extra_channels, width)
        self.head = nn.Conv2d(width, feature_dim, 1)
        self.to(device)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        decoded = self.decoder(self.encoder(inputs[:, : self.image_channels]))
        decoded = F.interpolate(
            decoded, size=inputs.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.head(self.refine(torch.cat([decoded, inputs], dim=1)))


# --- model ---------------------------------------------------------------------------------
@dataclass
class AreaRatioConfig(ModelConfig):
    epochs: int = 30
    #: the FCN: "plain" (:class:`PixelFeatureNet`, trained from scratch) or "lite0"
    #: (:class:`Lite0PixelFeatureNet`, a decoder over the frozen ImageNet Lite0)
    encoder: str = "plain"
    #: FCN width: w of the plain FCN's stages w, 2w, 4w; the full-resolution stage of lite0's
    width: int = 24
    #: per-pixel feature dimension (FCN output, GCN input)
    feature_dim: int = 16
    #: superpixels per image (about; the seed grid is rows × cols ≈ n_segments)
    n_segments: int = 64
    #: weight of the position term in the superpixel distance (larger = more compact)
    position_weight: float = 1.0
    #: SLIC iterations
    superpixel_iterations: int = 5
    #: σ of the edge weight exp(-d² / σ²); 0 = the batch's mean squared edge distance
    edge_sigma: float = 0.0
    #: GCN hidden width and number of graph convolutions (2 or 3)
    gcn_hidden: int = 32
    gcn_layers: int = 2
    #: "area" (cumulative vertex area vs ratio × image area) or "count" (ratio × vertex count)
    pseudo_label_rule: str = "area"
    #: absolute margin on the ratio when the batch has no ``area_margin``; the band
    #: [r − m, r + m] is ignored
    area_margin: float = 0.02
    #: multiplicative noise on mask-derived ratios: r × U(1 − n, 1 + n), clipped to [0, 1],
    #: one draw per image (:meth:`AreaRatioGCN.derive_area_ratios`)
    ratio_noise: float = 0.0
    #: seed of the ratio-noise draws
    noise_seed: int = 0
    #: weight each pseudo-labelled vertex's BCE by its area
    area_weighted_loss: bool = True
    #: give target and background pseudo-labels equal total weight in the BCE (targets are
    #: usually a small share of the image)
    balance_classes: bool = True
    #: weight of (predicted foreground share − ratio)²; 0 = pseudo-label BCE only
    area_loss_weight: float = 1.0
    #: weight of the vertex novelty (feature distance from the image mean) in the
    #: pseudo-label ranking at the first step; 0 = rank by score alone (the seed's rule)
    novelty_prior: float = 1.0
    #: training steps over which the novelty prior decays linearly to 0
    prior_steps: int = 200
    #: what "novel" means: "colour" (distance of a vertex's mean colour from the image's) or
    #: "memory" (distance of its Lite0 patches to a memory of normal training patches, which
    #: is then also an input channel of the FCN; needs normal images in the training set)
    novelty: str = "colour"
    #: "memory": seeded share of the normal training images that form the memory (they
    #: build it in the first epoch and are left out of the graph training after it)
    memory_share: float = 0.5
    lr: float = 1e-3
    weight_decay: float = 0.0
    #: image score: "top_mean" (mean of the map's top share) or "max"
    score: str = "top_mean"
    score_top_fraction: float = 0.01

    def __post_init__(self) -> None:
        for name in ("epochs", "width", "feature_dim", "gcn_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {self.encoder!r}")
        if self.n_segments < 2:
            raise ValueError(f"n_segments must be >= 2, got {self.n_segments}")
        if self.gcn_layers not in (2, 3):
            raise ValueError(f"gcn_layers must be 2 or 3, got {self.gcn_layers}")
        if self.superpixel_iterations < 0:
            raise ValueError(
                f"superpixel_iterations must be >= 0, got {self.superpixel_iterations}"
            )
        if self.position_weight < 0:
            raise ValueError(f"position_weight must be >= 0, got {self.position_weight}")
        if self.edge_sigma < 0:
            raise ValueError(f"edge_sigma must be >= 0, got {self.edge_sigma}")
        if self.pseudo_label_rule not in PSEUDO_LABEL_RULES:
            raise ValueError(
                f"pseudo_label_rule must be one of {PSEUDO_LABEL_RULES}, "
                f"got {self.pseudo_label_rule!r}"
            )
        if not 0 <= self.area_margin < 0.5:
            raise ValueError(f"area_margin must be in [0, 0.5), got {self.area_margin}")
        if not 0 <= self.ratio_noise < 1:
            raise ValueError(f"ratio_noise must be in [0, 1), got {self.ratio_noise}")
        if self.novelty_prior < 0:
            raise ValueError(f"novelty_prior must be >= 0, got {self.novelty_prior}")
        if self.novelty not in NOVELTY:
            raise ValueError(f"novelty must be one of {NOVELTY}, got {self.novelty!r}")
        if not 0 < self.memory_share < 1:
            raise ValueError(f"memory_share must be in (0, 1), got {self.memory_share}")
        if self.novelty == "memory" and self.epochs < 2:
            raise ValueError("novelty='memory' needs at least 2 epochs (1 builds the memory)")
        if self.prior_steps < 0:
            raise ValueError(f"prior_steps must be >= 0, got {self.prior_steps}")
        if self.area_loss_weight < 0:
            raise ValueError(f"area_loss_weight must be >= 0, got {self.area_loss_weight}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        if not 0 < self.score_top_fraction <= 1:
            raise ValueError(f"score_top_fraction must be in (0, 1], got {self.score_top_fraction}")


@register
class AreaRatioGCN(Segmenter):
    name: ClassVar[str] = "arearatio-gcn"
    onnx_blocker: ClassVar[str | None] = (
        "superpixel clustering and graph construction are iterative and data-dependent per "
        "image (NumPy/SciPy), which a static graph cannot express"
    )
    #: the API passes per-image ``area_ratio``/``area_margin`` (from a CSV) in the batches
    learns_from_area_ratios: ClassVar[bool] = True
    description: ClassVar[str] = (
        "weak segmentation from area ratios: FCN features, superpixel graph, GCN pseudo-labels"
    )
    Config = AreaRatioConfig
    config: AreaRatioConfig

    def __init__(self, config: AreaRatioConfig | None = None, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        cfg = self.config
        if self.image_size < FCN_STRIDE or self.image_size % FCN_STRIDE:
            raise ValueError(
                f"{self.name}: image_size {self.image_size} must be a multiple of the FCN "
                f"stride {FCN_STRIDE}"
            )
        if cfg.n_segments > self.image_size**2:
            raise ValueError(
                f"n_segments {cfg.n_segments} exceeds the {self.image_size**2} pixels of an image"
            )
        #: novelty="memory": normal patches of the memory fold, and the typical distance that
        #: scales the distance channel (set at the first graph step)
        self.memory_bank: PatchMemory | None = None
        self.distance_scale = 1.0
        self.memory_fold: torch.Tensor | None = None
        if cfg.novelty == "memory":
            self.memory_bank = PatchMemory(
                PatchMemoryConfig(),
                image_size=self.image_size,
                channels=self.channels,
                device=self.device,
            )
        extra = 1 if self.memory_bank is not None else 0
        self.fcn: PixelFeatureNet | Lite0PixelFeatureNet
        if cfg.encoder == "lite0":
            check_encoder_input(self.name, cfg.encoder, self.image_size, self.channels)
            self.fcn = Lite0PixelFeatureNet(
                self.channels, extra, cfg.width, cfg.feature_dim, self.device
            )
        else:
            self.fcn = PixelFeatureNet(self.channels + extra, cfg.width, cfg.feature_dim).to(
                self.device
            )
        self.gcn = GraphConvNet(cfg.feature_dim, cfg.gcn_hidden, cfg.gcn_layers).to(self.device)
        self.optimizer: torch.optim.Optimizer | None = None
        self._steps_done = 0

    def prior_weight(self) -> float:
        """Weight of the novelty prior in the pseudo-label ranking now: ``novelty_prior``,
        decaying linearly to 0 over ``prior_steps`` training steps."""
        cfg = self.config
        if cfg.prior_steps == 0:
            return 0.0
        return cfg.novelty_prior * max(0.0, 1.0 - self._steps_done / cfg.prior_steps)

    # --- graph forward ---------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(
                f"{self.name}: expected images (B, {self.channels}, H, W), got "
                f"{tuple(images.shape)}"
            )
        h, w = images.shape[-2:]
        if h % FCN_STRIDE or w % FCN_STRIDE:
            raise ValueError(
                f"{self.name}: image size {h}×{w} is not divisible by the FCN stride {FCN_STRIDE}"
            )
        return images.to(self.device).float()

    def raw_distance(self, images: torch.Tensor) -> torch.Tensor:
        """novelty="memory": each pixel's (bilinearly up-sampled) distance of its Lite0 patch
        to the nearest normal memory patch (B, 1, H, W); fixed, so no gradients."""
        if self.memory_bank is None:
            raise RuntimeError(f"{self.name}: raw_distance needs novelty='memory'")
        distance = self.memory_bank.patch_distances(images)
        return F.interpolate(distance, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def graph_forward(
        self, images: torch.Tensor
    ) -> tuple[SuperpixelGraph, torch.Tensor, torch.Tensor | None]:
        """Images → superpixel graph, vertex logits (N,) (grad-enabled if the caller is) and,
        with novelty="memory", the scaled distance map (B, 1, H, W) the FCN also saw."""
        cfg = self.config
        distance = None
        if self.memory_bank is not None:
            distance = self.raw_distance(images) / self.distance_scale
            images = torch.cat([images, distance], dim=1)
        features = self.fcn(images)
        labels = superpixels(
            features, cfg.n_segments, cfg.position_weight, cfg.superpixel_iterations
        )
        graph = build_graph(labels, features, cfg.edge_sigma)
        vertex_scores = self.gcn(graph.vertex_features, graph.edge_index, graph.edge_weight)
        return graph, vertex_scores, distance

    # --- training --------------------------------------------------------------------------
    def setup_training(self, n_train: int) -> None:
        if self.memory_bank is not None:
            count = round(self.config.memory_share * n_train)
            self.memory_fold = seeded_fold(n_train, count, self.config.noise_seed)
        trainable = [p for p in (*self.fcn.parameters(), *self.gcn.parameters()) if p.requires_grad]
        self.optimizer = torch.optim.Adam(
            trainable,
            lr=self.config.lr,
            weight_decay=self.config.weight_decay,
        )

    def derive_area_ratios(self, masks: Any) -> np.ndarray:
        """Area ratios (N,) float32 of masks (N, H, W), each times its own fixed
        U(1 − ``ratio_noise``, 1 + ``ratio_noise``) factor (clipped to [0, 1]) drawn from
        ``noise_seed``: the same masks in the same order always get the same labels."""
        masks = np.asarray(masks)
        if masks.ndim != 3:
            raise ValueError(f"{self.name}: expected masks (N, H, W), got {masks.shape}")
        ratios = masks.reshape(len(masks), -1).astype(np.float64).mean(axis=1)
        if self.config.ratio_noise > 0:
            n, rng = self.config.ratio_noise, np.random.default_rng(self.config.noise_seed)
            factor = rng.uniform(1 - n, 1 + n, len(ratios))
            ratios = np.clip(ratios * factor, 0.0, 1.0)
        return ratios.astype(np.float32)

    def training_ratios(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Area ratios and margins (B,) on the CPU, float64: ``area_ratio`` as given, else the
        exact share of ``mask``. Noisy ratios must come in as ``area_ratio`` (from
        :meth:`derive_area_ratios`, as :func:`defectlab.api.train` does), fixed per image."""
        b = batch["image"].shape[0]
        if "area_ratio" in batch:
            ratios = torch.as_tensor(batch["area_ratio"]).detach().double().cpu().flatten()
        elif "mask" in batch:
            if self.config.ratio_noise > 0:
                raise ValueError(
                    f"{self.name}: ratio_noise is drawn once per image: pass "
                    "area_ratio=model.derive_area_ratios(masks) with the training data "
                    "instead of masks (defectlab.api.train does this)"
                )
            ratios = batch["mask"].detach().double().cpu().flatten(1).mean(dim=1)
        else:
            raise ValueError(f"{self.name}: a training batch needs 'area_ratio' or 'mask'")
        if ratios.numel() != b:
            raise ValueError(f"area_ratio has {ratios.numel()} values for {b} images")
        bad = ratios[~((ratios >= 0) & (ratios <= 1))]
        if bad.numel():
            raise ValueError(f"area_ratio must be in [0, 1], got {float(bad[0])}")
        if "area_margin" in batch:
            margins = torch.as_tensor(batch["area_margin"]).detach().double().cpu().flatten()
        else:
            margins = torch.full((b,), float(self.config.area_margin), dtype=torch.float64)
        bad = margins[~((margins >= 0) & (margins < 0.5))]
        if margins.numel() != b or bad.numel():
            raise ValueError(f"area_margin must be {b} values in [0, 0.5), got {margins.tolist()}")
        return ratios, margins

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        if self.optimizer is None:
            self.setup_training(0)
        assert self.optimizer is not None
        cfg = self.config
        images = self._check_images(batch["image"])
        ratios, margins = self.training_ratios(batch)
        if self.memory_bank is not None:
            kept = self._memory_step(batch, images)
            if kept is None:
                return {"memory_patches": float(self.memory_bank.patches_seen)}
            if not kept.any():
                return {}
            images, ratios, margins = images[kept.to(images.device)], ratios[kept], margins[kept]
            if self._steps_done == 0:  # the distance channel's scale, from the first batch
                self.distance_scale = float(self.raw_distance(images).median().clamp_min(1e-6))
        self.fcn.train()
        self.gcn.train()
        graph, vertex_scores, distance = self.graph_forward(images)
        novelty = graph.vertex_mean(distance)[:, 0] if distance is not None else None
        ranking = ranking_scores(graph, vertex_scores, self.prior_weight(), images, novelty)
        targets = torch.cat(
            [
                pseudo_labels(
                    ranking[start : start + count],
                    graph.vertex_areas[start : start + count],
                    float(ratios[i]),
                    float(margins[i]),
                    cfg.pseudo_label_rule,
                )
                for i, (start, count) in enumerate(
                    zip(graph.offsets.tolist(), graph.counts.tolist(), strict=True)
                )
            ]
        )
        labelled = targets >= 0
        weights = graph.vertex_areas if cfg.area_weighted_loss else torch.ones_like(vertex_scores)
        weights = weights * labelled
        bce = F.binary_cross_entropy_with_logits(
            vertex_scores, targets.clamp_min(0).float(), reduction="none"
        )
        if cfg.balance_classes:
            positive, negative = targets == 1, targets == 0
            bce = 0.5 * _weighted_mean(bce, weights * positive) + 0.5 * _weighted_mean(
                bce, weights * negative
            )
        else:
            bce = _weighted_mean(bce, weights)
        loss = bce
        terms = {"bce": float(bce.detach())}
        if cfg.area_loss_weight > 0:
            image_index = torch.repeat_interleave(
                torch.arange(len(graph.counts), device=self.device), graph.counts
            )
            covered = torch.zeros(len(graph.counts), device=self.device).index_add(
                0, image_index, torch.sigmoid(vertex_scores) * graph.vertex_areas
            )
            share = covered / (images.shape[-2] * images.shape[-1])
            area_loss = (share - ratios.to(self.device, share.dtype)).pow(2).mean()
            loss = loss + cfg.area_loss_weight * area_loss
            terms["area_loss"] = float(area_loss.detach())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self._steps_done += 1
        return {
            "loss": float(loss.detach()),
            **terms,
            "labelled": float(labelled.float().mean()),
        }

    def _memory_step(
        self, batch: dict[str, torch.Tensor], images: torch.Tensor
    ) -> torch.Tensor | None:
        """novelty="memory": in the first epoch, add the batch's normal memory-fold images to
        the memory and return ``None`` (no graph step); later, the mask (B,) of the images the
        graph trains on: all but those memory images, whose own patches are in the memory
        at distance zero, unlike any image seen at test time."""
        assert self.memory_bank is not None
        if self.memory_fold is None:
            raise RuntimeError(f"{self.name}: training step before setup_training")
        normal = batch["label"].detach().cpu() == 0
        in_memory = normal & self.memory_fold[batch["index"].detach().cpu()]
        if self.memory_bank.memory is None:
            if in_memory.any():
                self.memory_bank.add_images(images[in_memory.to(images.device)])
            return None
        return ~in_memory

    def end_epoch(self, epoch: int) -> None:
        if self.memory_bank is not None and self.memory_bank.memory is None:
            if self.memory_bank.patches_seen == 0:
                raise TrainingError(
                    f"{self.name}: novelty='memory' needs normal (label 0) training images to "
                    "build the memory, and the first epoch saw none"
                )
            self.memory_bank.finish_training()

    # --- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> Prediction:
        images = self._check_images(images)
        if self.memory_bank is not None and self.memory_bank.memory is None:
            raise RuntimeError(f"{self.name}: predict before fit (no memory bank)")
        self.fcn.eval()
        self.gcn.eval()
        graph, vertex_scores, _ = self.graph_forward(images)
        maps = graph.paint(torch.sigmoid(vertex_scores))
        if self.config.score == "max":
            scores = maps.flatten(1).amax(dim=1)
        else:
            scores = top_fraction_mean(maps, self.config.score_top_fraction)
        return Prediction(scores, maps)

    @property
    def decision_thresholds(self) -> tuple[None, float]:
        """The vertex classifier's own pixel threshold, probability 0.5 (module docstring);
        the API's quantile and auto calibrations defer to it. The image threshold (None) stays
        a quantile of normal validation scores: normal images' maps peak high too."""
        return None, 0.5

    # --- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The FCN and GCN weights; a Lite0 FCN without its frozen backbone, whose identity
        (package versions, weight-file hash) is stored instead and checked on reload."""
        fcn = (
            network_state(self.fcn)
            if isinstance(self.fcn, Lite0PixelFeatureNet)
            else dict(self.fcn.state_dict())
        )
        state = {"fcn": fcn, "gcn": dict(self.gcn.state_dict())}
        if self.memory_bank is not None:
            state["memory_bank"] = self.memory_bank.state_dict()
            state["distance_scale"] = self.distance_scale
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, module in (("fcn", self.fcn), ("gcn", self.gcn)):
            try:
                if isinstance(module, Lite0PixelFeatureNet):
                    if "backbone" not in state[key]:
                        raise RuntimeError("the checkpoint's FCN is not on the Lite0 encoder")
                    load_network_state(self.name, module, dict(state[key]))
                else:
                    module.load_state_dict(state[key])
            except (KeyError, RuntimeError) as exc:
                raise ValueError(
                    f"{self.name}: {key} weights do not fit this configuration: {exc}"
                ) from exc
        if self.memory_bank is not None:
            if "memory_bank" not in state:
                raise ValueError(f"{self.name}: checkpoint has no memory bank (novelty='memory')")
            self.memory_bank.load_state_dict(dict(state["memory_bank"]))
            self.distance_scale = float(state["distance_scale"])

    def training_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"steps_done": self._steps_done}
        if self.memory_bank is not None:
            state["memory_pool"] = self.memory_bank.training_state()
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_training_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self._steps_done = int(state["steps_done"])
        if self.memory_bank is not None:
            self.memory_bank.load_training_state(state["memory_pool"])
        if "optimizer" in state:
            if self.optimizer is None:
                self.setup_training(0)
            assert self.optimizer is not None
            self.optimizer.load_state_dict(state["optimizer"])


# --- label files ---------------------------------------------------------------------------
def read_area_ratio_csv(
    path: str | Path, root: str | Path | None = None
) -> dict[Path, tuple[float, float | None]]:
    """Read ``path,area_ratio[,margin]`` lines (an optional header starting ``path``, blank
    lines and ``#`` comments skipped) into {image path: (ratio, margin or None)}. Relative
    image paths are taken from ``root`` (default: the CSV's folder). Every error names the
    CSV file and line, so a typo in a long label file is quick to find."""
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    if not path.is_file():
        raise DataError(f"{path}: area-ratio CSV not found")
    out: dict[Path, tuple[float, float | None]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for line_no, row in enumerate(csv.reader(handle), start=1):
            where = f"{path}, line {line_no}"
            fields = [field.strip() for field in row]
            if not fields or not any(fields) or fields[0].startswith("#"):
                continue
            if line_no == 1 and fields[0].lower() == "path":
                continue
            if len(fields) not in (2, 3) or not fields[0]:
                raise DataError(
                    f"{where}: expected 'path,area_ratio[,margin]', got {','.join(row)!r}"
                )
            try:
                ratio = float(fields[1])
                margin = float(fields[2]) if len(fields) == 3 and fields[2] else None
            except ValueError:
                raise DataError(
                    f"{where}: area ratio and margin must be numbers, got {row!r}"
                ) from None
            if not 0.0 <= ratio <= 1.0:
                raise DataError(f"{where}: area_ratio must be in [0, 1], got {ratio}")
            if margin is not None and not 0.0 <= margin < 0.5:
                raise DataError(f"{where}: margin must be in [0, 0.5), got {margin}")
            image = Path(fields[0])
            image = image if image.is_absolute() else base / image
            if not image.is_file():
                raise DataError(f"{where}: image file {image} not found")
            if image in out:
                raise DataError(f"{where}: {image} is listed twice")
            out[image] = (ratio, margin)
    return out
