"""Fusing a detector's map with a segmenter's probability (``components.fusion``)."""

from __future__ import annotations

import math

import pytest
import torch

from defectlab.components.fusion import (
    MAP_FUSIONS,
    adapt_batch,
    detector_probability,
    fuse_maps,
    resize_maps,
)


def test_detector_map_on_the_unit_scale_keeps_its_order() -> None:
    maps = torch.tensor([[[0.0, 1.0], [2.0, 5.0]]])
    level = detector_probability(maps, median=1.0, threshold=2.0)
    assert level[0, 1, 0].item() == pytest.approx(0.5)  # at the detector's threshold
    assert level[0, 0, 1].item() == pytest.approx(1 / (1 + math.e))  # at the normal median
    assert torch.equal(torch.argsort(level.ravel()), torch.argsort(maps.ravel()))
    assert float(level.min()) > 0 and float(level.max()) < 1


def test_each_fusion() -> None:
    detector = torch.tensor([[[1.0, 3.0]]])
    probability = torch.tensor([[[0.8, 0.2]]])
    level = detector_probability(detector, 1.0, 2.0)
    fused = {f: fuse_maps(detector, probability, f, 1.0, 2.0) for f in MAP_FUSIONS}
    assert torch.equal(fused["segmenter"], probability)
    assert torch.equal(fused["detector"], level)
    assert torch.allclose(fused["product"], probability * level)
    assert torch.allclose(fused["mean"], (probability + level) / 2)
    with pytest.raises(ValueError, match="fusion must be one of"):
        fuse_maps(detector, probability, "max", 1.0, 2.0)


def test_members_get_their_own_size_and_channels() -> None:
    colour = torch.rand(2, 3, 16, 16)
    grey = adapt_batch(colour, 8, 1)
    assert grey.shape == (2, 1, 8, 8)
    luminance = (colour * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, True)
    assert torch.allclose(adapt_batch(colour, 16, 1), luminance)
    assert adapt_batch(grey, 8, 3).shape == (2, 3, 8, 8)
    maps = torch.rand(2, 8, 8)
    assert resize_maps(maps, (8, 8)) is maps
    assert resize_maps(maps, (16, 12)).shape == (2, 16, 12)
