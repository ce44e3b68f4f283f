import itertools

import numpy as np
import pytest

from defectlab.data.transforms import (
    extract_tiles,
    resize_image,
    resize_mask,
    stitch_tiles,
    tile_starts,
)


def test_resize_keeps_range_and_channels() -> None:
    image = np.random.default_rng(0).random((50, 70, 3), dtype=np.float32)
    out = resize_image(image, 32)
    assert out.shape == (32, 32, 3) and out.min() >= 0 and out.max() <= 1
    assert resize_image(image[:, :, :1], (20, 10)).shape == (20, 10, 1)


def test_mask_resize_stays_binary() -> None:
    mask = np.zeros((40, 40), bool)
    mask[10:20, 10:30] = True
    out = resize_mask(mask, 20)
    assert out.dtype == bool and out.sum() == 50


@pytest.mark.parametrize(("length", "tile", "overlap"), [(100, 32, 8), (32, 32, 0), (65, 32, 16)])
def test_tiles_cover_everything(length: int, tile: int, overlap: int) -> None:
    starts = tile_starts(length, tile, overlap)
    covered = np.zeros(length, bool)
    for s in starts:
        covered[s : s + tile] = True
    assert covered.all() and starts[-1] + tile == max(length, tile)
    assert all(b - a <= tile - overlap for a, b in itertools.pairwise(starts))


def test_stitching_reconstructs_a_map_seen_through_tiles() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((90, 130, 1), dtype=np.float32)
    tiles, positions = extract_tiles(image, 32, 8)
    stitched = stitch_tiles(tiles[..., 0], positions, image.shape[:2])
    np.testing.assert_allclose(stitched, image[:, :, 0], atol=1e-6)


def test_small_image_is_padded_then_cropped_back() -> None:
    image = np.ones((20, 25, 1), np.float32)
    tiles, positions = extract_tiles(image, 32, 8)
    assert tiles.shape == (1, 32, 32, 1)
    assert stitch_tiles(tiles[..., 0], positions, (20, 25)).shape == (20, 25)


def test_bad_overlap() -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_starts(100, 32, 32)
