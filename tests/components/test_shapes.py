"""Shape generators on their own: locality, thinness, Perlin noise."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from defectlab.components.shapes import PATCH_SHAPES, SHAPES, perlin_noise


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("radius", [6.0, 20.0])
def test_generators_are_local_non_empty_and_seeded(name: str, radius: float) -> None:
    generator = SHAPES[name]
    for seed in range(5):
        mask = generator(np.random.default_rng(seed), 64, 80, (30.4, 41.7), radius)
        assert mask.dtype == bool and mask.shape == (64, 80)
        ys, xs = np.nonzero(mask)
        assert ys.size >= 5
        assert np.hypot(ys - 30.4, xs - 41.7).max() <= 1.3 * radius + 2
        again = generator(np.random.default_rng(seed), 64, 80, (30.4, 41.7), radius)
        assert np.array_equal(mask, again)
    other = generator(np.random.default_rng(99), 64, 80, (30.4, 41.7), radius)
    assert not np.array_equal(other, mask)


def test_generators_clip_at_the_image_edge() -> None:
    for name, generator in SHAPES.items():
        masks = [generator(np.random.default_rng(s), 40, 40, (1.0, 38.5), 12.0) for s in range(5)]
        assert all(m.shape == (40, 40) for m in masks), name
        assert sum(m.any() for m in masks) >= 3, name  # a curve may miss a corner entirely


@pytest.mark.parametrize("name", ["crack", "scar", "elastic_line"])
def test_line_like_shapes_are_thin(name: str) -> None:
    # 90th percentile of the distance to the edge: about half the width in px
    limit = {"crack": 1.4, "scar": 0.15 * 30 + 1, "elastic_line": 3.0}[name]
    for seed in range(8):
        mask = SHAPES[name](np.random.default_rng(seed), 96, 96, (48.0, 48.0), 30.0)
        depth = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 3)
        assert np.percentile(depth[mask], 90) <= limit, (name, seed)


def test_crack_branches() -> None:
    """Some cracks have more than two end points (branches), none is a filled blob."""
    ends = []
    for seed in range(10):
        mask = SHAPES["crack"](np.random.default_rng(seed), 96, 96, (48.0, 48.0), 30.0)
        neighbours = cv2.filter2D(mask.astype(np.uint8), -1, np.ones((3, 3), np.float32))
        ends.append(int((mask & (neighbours == 2)).sum()))
    assert max(ends) > 2


def test_patch_shapes_are_registered() -> None:
    assert set(SHAPES) >= PATCH_SHAPES


def test_perlin_noise_is_smooth_seeded_multi_octave() -> None:
    a = perlin_noise(np.random.default_rng(0), 48, 2, 3)
    b = perlin_noise(np.random.default_rng(0), 48, 2, 3)
    c = perlin_noise(np.random.default_rng(1), 48, 2, 3)
    assert a.shape == (48, 48) and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.std() > 0.05
    # neighbouring pixels are correlated (noise, not white noise)
    assert np.corrcoef(a[:, :-1].ravel(), a[:, 1:].ravel())[0, 1] > 0.8
    one = perlin_noise(np.random.default_rng(0), 48, 2, 1)
    rough = np.abs(np.diff(a, axis=1)).mean() / a.std()
    smooth = np.abs(np.diff(one, axis=1)).mean() / one.std()
    assert rough > smooth  # more octaves add finer detail


def _mean_pixels(name: str, **params: object) -> float:
    generator = SHAPES[name]
    sizes = [
        generator(np.random.default_rng(s), 96, 96, (48.0, 48.0), 30.0, **params).sum()
        for s in range(10)
    ]
    return float(np.mean(sizes))


def test_crack_branches_add_to_the_trunk() -> None:
    for seed in range(6):
        make = SHAPES["crack"]
        trunk = make(np.random.default_rng(seed), 96, 96, (48.0, 48.0), 30.0, branches=(0, 0))
        full = make(np.random.default_rng(seed), 96, 96, (48.0, 48.0), 30.0, branches=(3, 3))
        assert not (trunk & ~full).any() and full.sum() > trunk.sum()


def test_perlin_coverage_sets_the_area() -> None:
    small = _mean_pixels("perlin_region", coverage=(0.2, 0.2))
    large = _mean_pixels("perlin_region", coverage=(0.7, 0.7))
    assert large > 2 * small


def _bend(mask: np.ndarray) -> float:
    """Std of the pixels across their main axis: ~thickness/3 for a straight line."""
    points = np.argwhere(mask).astype(float)
    return float(np.linalg.svd(points - points.mean(0), compute_uv=False)[1] / np.sqrt(len(points)))


def test_elastic_strength_bends_the_line() -> None:
    straight = [
        _bend(
            SHAPES["elastic_line"](
                np.random.default_rng(s), 96, 96, (48.0, 48.0), 30.0, strength=(0.0, 0.0)
            )
        )
        for s in range(6)
    ]
    bent = [
        _bend(
            SHAPES["elastic_line"](
                np.random.default_rng(s), 96, 96, (48.0, 48.0), 30.0, strength=(0.3, 0.3)
            )
        )
        for s in range(6)
    ]
    assert max(straight) < 1.6
    assert np.mean(bent) > np.mean(straight) + 0.5
