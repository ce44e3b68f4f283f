"""Resizing (the seeds' "scaling module") and overlapping tiles with stitched heat maps."""

from __future__ import annotations

import cv2
import numpy as np


def _size_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a float (H, W, C) image; area averaging when shrinking, bilinear when growing."""
    h, w = _size_hw(size)
    if image.shape[:2] == (h, w):
        return image
    shrink = h * w < image.shape[0] * image.shape[1]
    out = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return out[:, :, None] if out.ndim == 2 else out


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize a bool (H, W) mask with nearest neighbour, so it stays binary."""
    h, w = _size_hw(size)
    if mask.shape[:2] == (h, w):
        return mask
    return cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)


def resize_map(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a float (H, W) heat map back to an image's size (bilinear)."""
    h, w = size
    if heat.shape == (h, w):
        return heat
    return cv2.resize(heat.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering ``[0, length)`` with tiles of ``tile`` overlapping ≥ ``overlap``."""
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def extract_tiles(
    image: np.ndarray, tile: int, overlap: int
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Cut (H, W, C) into (N, tile, tile, C) overlapping tiles; images smaller than a tile are
    padded by edge replication. Returns the tiles and their (top, left) positions."""
    h, w = image.shape[:2]
    if h < tile or w < tile:
        image = np.pad(image, ((0, max(0, tile - h)), (0, max(0, tile - w)), (0, 0)), mode="edge")
    positions = [
        (top, left)
        for top in tile_starts(image.shape[0], tile, overlap)
        for left in tile_starts(image.shape[1], tile, overlap)
    ]
    tiles = np.stack([image[t : t + tile, left : left + tile] for t, left in positions])
    return tiles, positions


def stitch_tiles(
    tile_maps: np.ndarray, positions: list[tuple[int, int]], size: tuple[int, int]
) -> np.ndarray:
    """Average (N, t, t) tile heat maps back into one (H, W) map; overlaps are blended."""
    h, w = size
    tile = tile_maps.shape[1]
    full_h = max(h, max(p[0] for p in positions) + tile)
    full_w = max(w, max(p[1] for p in positions) + tile)
    total = np.zeros((full_h, full_w), np.float64)
    weight = np.zeros((full_h, full_w), np.float64)
    for heat, (top, left) in zip(tile_maps, positions, strict=True):
        total[top : top + tile, left : left + tile] += heat
        weight[top : top + tile, left : left + tile] += 1.0
    return (total / np.maximum(weight, 1.0))[:h, :w].astype(np.float32)
