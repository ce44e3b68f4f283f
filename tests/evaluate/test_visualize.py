"""Image helpers used by the HTML report."""

from __future__ import annotations

import base64

import cv2
import numpy as np
import pytest

from defectlab.evaluate.visualize import (
    heatmap_overlay,
    mask_outline,
    png_base64,
    tile_grid,
    to_rgb_uint8,
)

RED = (255, 0, 0)


def grey(size: int = 32, value: float = 0.5, channels: int = 1) -> np.ndarray:
    return np.full((size, size, channels), value, dtype=np.float32)


def coloured(out: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    return np.all(out == np.array(color, dtype=np.uint8), axis=2)


def blob_mask(size: int = 40) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, (15, 18), 8, 1, -1)
    mask[26:34, 24:37] = 1  # a second, rectangular region
    mask[28:31, 28:32] = 0  # with a hole
    return mask.astype(bool)


def erode(mask: np.ndarray, size: int, shape: int = cv2.MORPH_RECT) -> np.ndarray:
    kernel = cv2.getStructuringElement(shape, (size, size))
    return cv2.erode(mask.astype(np.uint8), kernel).astype(bool)


def dilate(mask: np.ndarray, size: int) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (size, size))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (np.full((5, 7), 0.5, np.float32), 128),
        (np.full((5, 7, 1), 1.0, np.float64), 255),
        (np.full((5, 7, 3), 2.0, np.float32), 255),  # clipped
        (np.full((5, 7, 3), -1.0, np.float32), 0),
        (np.full((5, 7), 77, np.uint8), 77),
        (np.ones((5, 7), bool), 255),
    ],
)
def test_to_rgb_uint8_shapes_and_values(image: np.ndarray, expected: int) -> None:
    out = to_rgb_uint8(image)
    assert out.dtype == np.uint8
    assert out.shape == (5, 7, 3)
    assert out.flags.c_contiguous
    assert np.all(out == expected)


def test_to_rgb_uint8_keeps_channel_order_and_copies() -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    image[..., 0] = 200
    out = to_rgb_uint8(image)
    assert np.all(out[..., 0] == 200) and np.all(out[..., 1:] == 0)
    out[...] = 0
    assert np.all(image[..., 0] == 200), "to_rgb_uint8 must not return a view of its input"


def test_to_rgb_uint8_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        to_rgb_uint8(np.zeros((3, 8, 8)))


@pytest.mark.parametrize("channels", [1, 3])
def test_heatmap_overlay_shape_dtype_and_colours(channels: int) -> None:
    image = grey(channels=channels)
    heat = np.zeros((32, 32), np.float32)
    heat[:, 16:] = 1.0
    out = heatmap_overlay(image, heat, 0.0, 1.0, alpha=1.0)
    assert out.dtype == np.uint8
    assert out.shape == (32, 32, 3)
    low = out[0, 0].astype(int)
    high = out[0, 31].astype(int)
    # Perceptual maps go from blue (low) to red (high); checks the BGR → RGB conversion.
    assert low[2] > low[0], f"low heat should be bluish in RGB, got {low}"
    assert high[0] > high[2], f"high heat should be reddish in RGB, got {high}"


def test_heatmap_overlay_alpha_and_range() -> None:
    image = grey(value=0.25, channels=3)
    heat = np.linspace(-5, 5, 32 * 32).reshape(32, 32)
    assert np.array_equal(heatmap_overlay(image, heat, 0, 1, alpha=0.0), to_rgb_uint8(image))
    full = heatmap_overlay(image, heat, 0.0, 1.0, alpha=1.0)
    half = heatmap_overlay(image, heat, 0.0, 1.0, alpha=0.5)
    expected = np.rint(0.5 * to_rgb_uint8(image) + 0.5 * full.astype(float))
    assert np.abs(half.astype(float) - expected).max() <= 1
    # values outside [vmin, vmax] are clipped to the ends of the colormap
    below = heat < 0
    above = heat > 1
    assert len({tuple(p) for p in full[below]}) == 1
    assert len({tuple(p) for p in full[above]}) == 1
    assert not np.array_equal(full[below][0], full[above][0])
    # the range matters: the same heat under a wider range maps lower
    wider = heatmap_overlay(image, heat, -5.0, 5.0, alpha=1.0)
    assert len({tuple(p) for p in wider.reshape(-1, 3)}) > 50


def test_heatmap_overlay_rejects_mismatched_heat() -> None:
    with pytest.raises(ValueError):
        heatmap_overlay(grey(32), np.zeros((16, 16)), 0.0, 1.0)


@pytest.mark.parametrize("as_float", [True, False])
def test_mask_outline_thin_lies_exactly_on_the_boundary(as_float: bool) -> None:
    mask = blob_mask()
    image = grey(40, 0.5, 3) if as_float else np.full((40, 40, 3), 128, np.uint8)
    out = mask_outline(image, mask, color=RED, thickness=1)
    assert out.dtype == np.uint8 and out.shape == (40, 40, 3)
    drawn = coloured(out, RED)
    boundary = mask & ~erode(mask, 3, cv2.MORPH_CROSS)  # mask pixels 4-adjacent to background
    assert drawn.any()
    assert not (drawn & ~mask).any(), "outline leaks outside the mask"
    assert not (drawn & erode(mask, 3)).any(), "outline reaches the interior"
    assert (boundary & ~drawn).sum() == 0, "some boundary pixels (incl. the hole) are not drawn"
    # everything else is untouched
    assert np.all(out[~drawn] == 128)


def test_mask_outline_thick_stays_near_the_boundary() -> None:
    mask = blob_mask()
    out = mask_outline(grey(40, 0.5, 3), mask, color=(0, 255, 0), thickness=3)
    drawn = coloured(out, (0, 255, 0))
    assert drawn.sum() > (mask & ~erode(mask, 3)).sum()
    assert not (drawn & ~dilate(mask, 5)).any(), "thick outline strays far outside the mask"
    # a 3-px line straddles the border: at most ~2 px either side of it
    assert not (drawn & erode(mask, 7)).any(), "thick outline reaches deep inside the mask"


def test_mask_outline_edges_and_empty_mask() -> None:
    image = grey(16, 0.5, 1)
    empty = mask_outline(image, np.zeros((16, 16), bool))
    assert np.array_equal(empty, to_rgb_uint8(image))
    full = mask_outline(image, np.ones((16, 16), bool), color=RED)
    frame = np.ones((16, 16), bool)
    frame[1:-1, 1:-1] = False
    assert np.array_equal(coloured(full, RED), frame), "a region touching the edge gets a frame"


def test_mask_outline_does_not_modify_input() -> None:
    image = np.full((16, 16, 3), 128, np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[4:10, 4:10] = True
    mask_outline(image, mask)
    assert np.all(image == 128)


def test_png_base64_round_trip_keeps_rgb() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    rgb[0, 0] = (255, 0, 0)
    uri = png_base64(rgb)
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    data = np.frombuffer(base64.b64decode(uri[len(prefix) :]), np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    assert bgr is not None
    assert np.array_equal(bgr[:, :, ::-1], rgb)


def test_png_base64_rejects_float() -> None:
    with pytest.raises(TypeError):
        png_base64(np.zeros((4, 4, 3), np.float32))


def test_tile_grid_places_images_in_padded_cells() -> None:
    a = np.full((10, 12, 3), 10, np.uint8)
    b = np.full((6, 8, 3), 20, np.uint8)
    c = np.full((14, 5, 3), 30, np.uint8)
    grid = tile_grid([a, b, c], columns=2, pad=2)
    cell_h, cell_w = 14, 12
    assert grid.dtype == np.uint8
    assert grid.shape == (2 * cell_h + 3 * 2, 2 * cell_w + 3 * 2, 3)
    assert np.all(grid[2:12, 2:14] == 10)
    assert np.all(grid[2:8, 16:24] == 20)
    assert np.all(grid[18:32, 2:7] == 30)
    # padding and the unused cell are background
    assert np.all(grid[0:2] == 255) and np.all(grid[:, 0:2] == 255)
    assert np.all(grid[18:32, 16:28] == 255)
    # exactly the image pixels are non-background
    assert (grid[..., 0] != 255).sum() == 10 * 12 + 6 * 8 + 14 * 5


def test_tile_grid_single_row_and_errors() -> None:
    images = [np.zeros((4, 4, 3), np.uint8)] * 3
    assert tile_grid(images, columns=5, pad=0).shape == (4, 12, 3)
    with pytest.raises(ValueError):
        tile_grid([], columns=2)
