"""The graph convolution network of ``arearatio-gcn``: one logit per superpixel vertex.

Kipf–Welling layers written in plain torch (``index_add``), so the core package needs no
PyTorch Geometric.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn


def gcn_propagate(
    x: torch.Tensor, edge_index: torch.Tensor, edge_weight: torch.Tensor
) -> torch.Tensor:
    """Kipf–Welling propagation ``D^-1/2 (A + I) D^-1/2 x`` with weighted A (self-loop
    weight 1), D the degree of A + I.

    Rows are gathered with ``index_select``, not ``x[src]``: the backward of tensor indexing
    accumulates with ``index_put_``, which on the CPU sums duplicate indices in a varying
    order, so two runs of the same seed drifted apart; ``index_select``'s backward
    (``index_add``) is deterministic."""
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
