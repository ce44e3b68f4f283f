"""Graph convolutions: the normalised propagation, its deterministic backward, fitting."""

from __future__ import annotations

import pytest
import torch

from defectlab.segment.arearatio.gcn import GraphConvNet, gcn_propagate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_gcn_propagation_is_the_normalised_adjacency_product() -> None:
    edge_index = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])
    weights = torch.tensor([0.5, 0.5, 2.0, 2.0])
    x = torch.randn(3, 2)
    dense = torch.eye(3)
    dense[edge_index[0], edge_index[1]] = weights
    d = dense.sum(1).rsqrt()
    expected = d[:, None] * dense * d[None, :] @ x
    assert torch.allclose(gcn_propagate(x, edge_index, weights), expected, atol=1e-6)


def test_gcn_gradients_are_bit_identical_on_several_threads() -> None:
    """Same seed, same numbers: the propagation's backward must not depend on the order in
    which threads sum duplicate indices (tensor indexing's backward did, on 2 threads)."""
    generator = torch.Generator().manual_seed(0)
    n, edges = 512, 6000
    edge_index = torch.randint(0, n, (2, edges), generator=generator)
    weights = torch.rand(edges, generator=generator)
    x = torch.randn(n, 32, generator=generator, requires_grad=True)
    upstream = torch.randn(n, 32, generator=generator)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(10):
            x.grad = None
            (gcn_propagate(x, edge_index, weights) * upstream).sum().backward()
            grads.append(x.grad.clone())
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_gcn_overfits_a_tiny_fixed_graph() -> None:
    torch.manual_seed(0)
    # a chain of 8 vertices, alternating blocks of labels
    src = torch.arange(7)
    edge_index = torch.cat([torch.stack([src, src + 1]), torch.stack([src + 1, src])], dim=1)
    weights = torch.ones(edge_index.shape[1])
    x = torch.randn(8, 4)
    target = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    net = GraphConvNet(4, 32, layers=2)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(300):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            net(x, edge_index, weights), target
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    assert torch.equal((net(x, edge_index, weights) > 0).float(), target)
