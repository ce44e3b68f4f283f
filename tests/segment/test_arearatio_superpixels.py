"""Superpixels and the superpixel graph: adjacency, edge weights, SLIC determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from defectlab.segment.arearatio.superpixels import (
    build_graph,
    superpixel_adjacency,
    superpixels,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_adjacency_joins_only_touching_superpixels() -> None:
    quads = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
    ring = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 2]])
    labels = torch.stack([quads, ring])
    edge_index, counts = superpixel_adjacency(labels)
    assert counts.tolist() == [4, 3]
    edges = set(map(tuple, edge_index.t().tolist()))
    # quadrants touch along sides, not across the diagonal; in the second image (ids + 4)
    # the corner pixel 2 touches the ring 0 but only diagonally the centre 1
    undirected = {(0, 1), (0, 2), (1, 3), (2, 3), (4, 5), (4, 6)}
    assert edges == undirected | {(b, a) for a, b in undirected}
    assert edge_index.shape[1] == len(edges)  # no duplicates
    assert all(a != b for a, b in edges)  # no self-loops

    features = torch.stack([labels.float(), torch.ones_like(labels).float()], dim=1)
    graph = build_graph(labels, features)
    assert graph.vertex_areas.tolist() == [4, 4, 4, 4, 11, 4, 1]
    assert graph.vertex_features[:, 0].tolist() == [0, 1, 2, 3, 0, 1, 2]
    assert torch.equal(graph.edge_index, edge_index)
    weights = dict(
        zip(map(tuple, edge_index.t().tolist()), graph.edge_weight.tolist(), strict=True)
    )
    assert all(0 < w <= 1 and w == weights[(b, a)] for (a, b), w in weights.items())
    # exp(-d² / σ²), σ² = mean squared edge distance: close features weigh more
    assert weights[(0, 1)] > weights[(0, 2)]
    sigma2 = np.mean([(a - b) ** 2 for a, b in [(0, 1), (0, 2), (1, 3), (2, 3), (0, 1), (0, 2)]])
    assert weights[(0, 2)] == pytest.approx(np.exp(-4 / sigma2), rel=1e-5)
    assert torch.equal(graph.paint(torch.arange(7.0)), graph.global_labels().float())


def test_superpixels_are_deterministic_contiguous_and_follow_features() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 4, 24, 20, generator=generator)
    a = superpixels(features, 12, 1.0, 4)
    b = superpixels(features.clone(), 12, 1.0, 4)
    assert a.shape == (2, 24, 20) and a.dtype == torch.long
    assert torch.equal(a, b)
    for image in a:  # every pixel labelled, ids 0 … n − 1 all used
        assert torch.equal(image.unique(), torch.arange(int(image.max()) + 1))
        assert 2 <= int(image.max()) + 1 <= 12

    # no iterations: the seed grid (4 rows × 3 columns on 24 × 20)
    grid = superpixels(features, 12, 1.0, 0)[0]
    assert grid[0, 0] == 0 and grid[0, 19] == 2 and grid[23, 0] == 9 and grid[23, 19] == 11
    assert grid[5, 6] == 0 and grid[5, 7] == 1 and grid[6, 6] == 3 and grid[6, 7] == 4

    # two flat regions split at a column that cuts through the middle grid cells: after a
    # few iterations no superpixel straddles the boundary
    halves = torch.zeros(1, 1, 24, 24)
    halves[..., 11:] = 1.0
    labels = superpixels(halves + 0.01 * torch.randn(1, 1, 24, 24, generator=generator), 9, 0.5, 5)
    for sp in labels[0].unique():
        assert halves[0, 0][labels[0] == sp].unique().numel() == 1
