"""Small image helpers for reports: heat-map overlays, mask outlines, PNG data URIs, grids.

Every function returns (or takes) RGB ``uint8`` arrays of shape ``(H, W, 3)``. OpenCV works in
BGR, so conversions happen at the boundary (colormaps, PNG encoding) and nowhere else.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence

import cv2
import numpy as np

__all__ = [
    "COLORMAP",
    "colormap_rgb",
    "heatmap_overlay",
    "mask_outline",
    "png_base64",
    "tile_grid",
    "to_rgb_uint8",
]

# Turbo is perceptually ordered (dark blue → red) and readable on grey images.
COLORMAP: int = getattr(cv2, "COLORMAP_TURBO", cv2.COLORMAP_JET)


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """Convert an image to a contiguous RGB ``uint8`` array of shape ``(H, W, 3)``.

    Accepts ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` (alpha dropped) arrays.
    Floats are read as ``[0, 1]`` and clipped (NaN becomes 0), ``bool`` as 0/255, ``uint16``
    is scaled down to 8 bits, other integer types are clipped to ``[0, 255]``. ``uint8``
    RGB input is returned as a copy.
    """
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W), (H, W, 1|3|4) image, got shape {array.shape}")
    if array.shape[2] == 4:
        array = array[:, :, :3]

    if array.dtype == np.uint8:
        out = array
    elif array.dtype == np.bool_:
        out = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        out = (array >> 8).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.integer):
        out = np.clip(array, 0, 255).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        values = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0)
        out = np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise TypeError(f"unsupported image dtype {array.dtype}")

    if out.shape[2] == 1:
        out = np.repeat(out, 3, axis=2)
    return np.array(out, dtype=np.uint8, order="C", copy=True)


def colormap_rgb(values: np.ndarray) -> np.ndarray:
    """Map values in ``[0, 1]`` (any shape ``(H, W)``) to RGB ``uint8`` with :data:`COLORMAP`."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=1.0, neginf=0.0)
    if v.ndim == 1:
        v = v[None, :]
    if v.ndim != 2:
        raise ValueError(f"expected 1-D or 2-D values, got shape {v.shape}")
    index = np.rint(np.clip(v, 0.0, 1.0) * 255.0).astype(np.uint8)
    bgr = cv2.applyColorMap(np.ascontiguousarray(index), COLORMAP)
    return np.ascontiguousarray(bgr[:, :, ::-1])


def heatmap_overlay(
    image: np.ndarray,
    heat: np.ndarray,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blend a colour-mapped heat map over an image.

    ``heat`` (H, W) is normalised linearly so that ``vmin`` maps to the low end of the colormap
    and ``vmax`` to the high end (values outside are clipped; NaN counts as ``vmin``).
    ``alpha`` is the weight of the heat map: 0 returns the image, 1 the colour-mapped heat.
    Returns RGB ``uint8`` ``(H, W, 3)``.
    """
    rgb = to_rgb_uint8(image)
    heat = np.asarray(heat, dtype=np.float64)
    if heat.ndim == 3 and heat.shape[2] == 1:
        heat = heat[:, :, 0]
    if heat.shape != rgb.shape[:2]:
        raise ValueError(f"heat shape {heat.shape} does not match image shape {rgb.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    vmin, vmax = float(vmin), float(vmax)
    span = vmax - vmin
    if not np.isfinite(span):
        raise ValueError(f"heat range must be finite, got ({vmin}, {vmax})")
    normalised = (heat - vmin) / span if span > 0 else np.zeros_like(heat)
    normalised = np.where(np.isnan(heat), 0.0, normalised)
    coloured = colormap_rgb(normalised)
    blended = (1.0 - alpha) * rgb.astype(np.float64) + alpha * coloured.astype(np.float64)
    return np.rint(np.clip(blended, 0, 255)).astype(np.uint8)


def mask_outline(
    image: np.ndarray,
    mask: np.ndarray,
    color: tuple[int, int, int] = (255, 0, 0),
    thickness: int = 1,
) -> np.ndarray:
    """Draw the contours (outer borders and holes) of a boolean mask onto a copy of the image.

    ``color`` is RGB. With ``thickness=1`` exactly the mask's border pixels are coloured;
    thicker lines straddle the border. ``image`` may be RGB ``uint8`` or float ``(H, W, C)``.
    Returns RGB ``uint8`` ``(H, W, 3)``.
    """
    out = to_rgb_uint8(image)
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.shape != out.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} does not match image shape {out.shape[:2]}")
    if thickness < 1:
        raise ValueError(f"thickness must be >= 1, got {thickness}")
    binary = (mask > 0).astype(np.uint8)
    if not binary.any():
        return out
    # Pad so that regions touching the image edge get a border along the edge too.
    padded = cv2.copyMakeBorder(binary, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    contours, _ = cv2.findContours(padded, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE, offset=(-1, -1))
    rgb_color = tuple(int(c) for c in color)
    cv2.drawContours(out, contours, -1, rgb_color, thickness=int(thickness))
    return out


def png_base64(rgb_uint8: np.ndarray) -> str:
    """Encode an RGB ``uint8`` image as a ``data:image/png;base64,...`` URI."""
    rgb = np.asarray(rgb_uint8)
    if rgb.dtype != np.uint8:
        raise TypeError(f"expected uint8, got {rgb.dtype}")
    if rgb.ndim == 2 or (rgb.ndim == 3 and rgb.shape[2] == 1):
        bgr = np.ascontiguousarray(rgb.reshape(rgb.shape[:2]))
    elif rgb.ndim == 3 and rgb.shape[2] == 3:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    else:
        raise ValueError(f"expected (H, W) or (H, W, 3) image, got shape {rgb.shape}")
    ok, buffer = cv2.imencode(".png", bgr)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(buffer.tobytes()).decode("ascii")


def tile_grid(
    images: Sequence[np.ndarray],
    columns: int,
    pad: int = 2,
    background: int = 255,
) -> np.ndarray:
    """Arrange RGB ``uint8`` images in a grid, row by row.

    Every cell has the size of the largest image; smaller images sit in the top-left corner of
    their cell. ``pad`` pixels of ``background`` separate the cells and surround the grid.
    """
    if not images:
        raise ValueError("tile_grid needs at least one image")
    if columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    tiles = [to_rgb_uint8(image) for image in images]
    cell_h = max(tile.shape[0] for tile in tiles)
    cell_w = max(tile.shape[1] for tile in tiles)
    columns = min(columns, len(tiles))
    rows = -(-len(tiles) // columns)
    height = rows * cell_h + (rows + 1) * pad
    width = columns * cell_w + (columns + 1) * pad
    grid = np.full((height, width, 3), background, dtype=np.uint8)
    for index, tile in enumerate(tiles):
        row, col = divmod(index, columns)
        y = pad + row * (cell_h + pad)
        x = pad + col * (cell_w + pad)
        grid[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
    return grid
