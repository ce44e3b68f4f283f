"""Resizing (the seeds' "scaling module") and overlapping tiles with stitched heat maps."""

from __future__ import annotations

from collections.abc import Callable

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


def tile_overlap(tile: int) -> int:
    """Pixels that neighbouring tiles share: a quarter of the tile, so a defect cut by one
    tile's border lies well inside another."""
    return tile // 4


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


def pad_to_tile(image: np.ndarray, tile: int) -> np.ndarray:
    """An (H, W, C) image with a side shorter than ``tile`` mirrored out (bottom, right) to
    ``tile``: the model sees it at native scale, as it saw its training tiles, and the padding
    repeats the image's texture instead of smearing its border."""
    h, w = image.shape[:2]
    if h >= tile and w >= tile:
        return image
    pad = ((0, max(0, tile - h)), (0, max(0, tile - w))) + ((0, 0),) * (image.ndim - 2)
    return np.pad(image, pad, mode="symmetric")


def tile_grid(shape: tuple[int, int], tile: int) -> list[tuple[int, int]]:
    """(top, left) of the overlapping tiles that cover an image of ``shape`` (after
    :func:`pad_to_tile`), row by row."""
    overlap = tile_overlap(tile)
    h, w = max(shape[0], tile), max(shape[1], tile)
    return [
        (top, left)
        for top in tile_starts(h, tile, overlap)
        for left in tile_starts(w, tile, overlap)
    ]


def extract_tiles(
    image: np.ndarray, tile: int, overlap: int | None = None
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Cut (H, W, C) into (N, tile, tile, C) overlapping tiles (``overlap`` defaults to
    :func:`tile_overlap`); an image smaller than a tile is mirrored out (:func:`pad_to_tile`).
    Returns the tiles and their (top, left) positions. Holds every tile: for whole-image
    scoring use :func:`score_tiled`, which streams them."""
    overlap = tile_overlap(tile) if overlap is None else overlap
    image = pad_to_tile(image, tile)
    positions = [
        (top, left)
        for top in tile_starts(image.shape[0], tile, overlap)
        for left in tile_starts(image.shape[1], tile, overlap)
    ]
    tiles = np.stack([image[t : t + tile, left : left + tile] for t, left in positions])
    return tiles, positions


class TileStitcher:
    """Blends tile heat maps into one map of an image, tile batch by tile batch: the one
    stitching loop of evaluate, predict, serve and the report. It holds one float32 sum the
    size of the (padded) image and per-row / per-column coverage counts (the tiles form a
    grid, so the overlap weight of a pixel is their product), never the tiles themselves."""

    def __init__(self, size: tuple[int, int], tile: int) -> None:
        self.size = (int(size[0]), int(size[1]))
        self.tile = tile
        self.total = np.zeros((max(self.size[0], tile), max(self.size[1], tile)), np.float32)
        self.rows = np.zeros(self.total.shape[0], np.float32)
        self.cols = np.zeros(self.total.shape[1], np.float32)
        self._seen_rows: set[int] = set()
        self._seen_cols: set[int] = set()

    def add(self, maps: np.ndarray, positions: list[tuple[int, int]]) -> None:
        """Add (n, h, w) tile maps at their (top, left) positions; maps not at tile size (a
        model whose map is coarser than its input) are resized to it first."""
        t = self.tile
        for heat, (top, left) in zip(maps, positions, strict=True):
            if heat.shape != (t, t):
                heat = resize_map(heat, (t, t))
            self.total[top : top + t, left : left + t] += heat
            if top not in self._seen_rows:
                self._seen_rows.add(top)
                self.rows[top : top + t] += 1.0
            if left not in self._seen_cols:
                self._seen_cols.add(left)
                self.cols[left : left + t] += 1.0

    def result(self) -> np.ndarray:
        """The blended (H, W) map at the image's own size (padding cropped off)."""
        weight = np.maximum(np.outer(self.rows, self.cols), 1.0)
        h, w = self.size
        return (self.total[:h, :w] / weight[:h, :w]).astype(np.float32)


def stitch_tiles(
    tile_maps: np.ndarray, positions: list[tuple[int, int]], size: tuple[int, int]
) -> np.ndarray:
    """Average (N, t, t) tile heat maps of a full grid (:func:`extract_tiles`) back into one
    (H, W) map; overlaps are blended."""
    stitcher = TileStitcher(size, tile_maps.shape[1])
    stitcher.add(tile_maps, positions)
    return stitcher.result()


#: scores a batch of tiles (n, t, t, C) → scores (n,), maps (n, h, w)
TileScorer = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def score_tiled(
    score: TileScorer, image: np.ndarray, tile: int, batch_size: int = 32
) -> tuple[float, np.ndarray]:
    """Score a full-resolution (H, W, C) image as overlapping native-resolution tiles of
    ``tile`` px, ``batch_size`` tiles per model call: its score is the highest tile score (the
    model's own rule on each tile) and its map the stitched tile maps at (H, W). Memory is one
    batch of tiles and their maps plus the stitched map, whatever the image's size."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    padded = pad_to_tile(image, tile)
    positions = tile_grid(image.shape[:2], tile)
    stitcher = TileStitcher(image.shape[:2], tile)
    best = -np.inf
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        tiles = np.stack([padded[t : t + tile, left : left + tile] for t, left in chunk])
        scores, maps = score(tiles)
        best = max(best, float(np.max(scores)))
        stitcher.add(maps, chunk)
    return best, stitcher.result()
