"""Superpixels and the superpixel graph of ``arearatio-gcn``.

A batched, vectorised SLIC on (standardised pixel feature, position) cuts each image into
superpixels: grid-seeded centres and a fixed number of iterations, so the result is
deterministic; SLIC's connectivity clean-up is left out, so a superpixel need not be
connected. Each superpixel becomes a vertex (the mean of its pixels' features, which carries
the gradient to the FCN, and its area), joined to the superpixels it touches by edges weighted
by the similarity of detached vertex features. All images of a batch form one block-diagonal
graph. Written in plain torch so the core package needs no SLIC or graph library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
