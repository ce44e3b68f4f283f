"""MaskGAN's masks and the region they belong in: the object region of a normal image
(:func:`object_region`, used by the boundary-aware loss) and the sampling mask rule
(:func:`binarize_mask`).

The object of a normal image is found by the rule ``object_rule``:

* ``otsu``: grey (mean over channels) thresholded at Otsu's level; ``fixed``: at
  ``object_threshold`` (grey in [0, 1]). ``object_polarity`` says which side is the object:
  ``bright``, ``dark``, or ``auto`` — the side covering less of the 1-px image border (a part
  lies inside its background). A 3×3 opening then closing removes threshold speckle;
* ``frame``: the whole image — for images with no clear object, such as magnetic-tile crops
  that fill the frame;
* ``auto`` (default): ``otsu`` when Otsu's separability η = σ²_between / σ²_total is at least
  ``object_min_separation`` (a clearly two-level image: part and background), else
  ``frame``. η is about 0.64 for a unimodal Gaussian texture and 0.75 for a uniform one,
  near 1 for a part on a plain background (default threshold 0.85).

Every rule then removes a border margin of ``object_margin`` px.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from defectlab.data.io import to_uint8

OBJECT_RULES = ("auto", "otsu", "fixed", "frame")
POLARITIES = ("auto", "bright", "dark")


@dataclass(frozen=True)
class ObjectRule:
    """How :func:`object_region` finds the part in a normal image (module docstring)."""

    rule: str = "auto"
    threshold: float = 0.5
    polarity: str = "auto"
    margin: int = 4
    min_separation: float = 0.85

    def describe(self) -> str:
        core = {
            "auto": f"otsu if eta>={self.min_separation:g} else frame",
            "otsu": "otsu",
            "fixed": f"grey>{self.threshold:g}",
            "frame": "frame",
        }[self.rule]
        return f"{core} polarity={self.polarity} margin={self.margin}"


def _otsu(grey: np.ndarray) -> tuple[int, float]:
    """Otsu's threshold of a uint8 image and its separability η = σ²_between / σ²_total."""
    hist = np.bincount(grey.ravel(), minlength=256).astype(np.float64) / grey.size
    levels = np.arange(256, dtype=np.float64)
    total_var = float(((levels - (levels * hist).sum()) ** 2 * hist).sum())
    if total_var <= 0:
        return 0, 0.0
    w0 = np.cumsum(hist)
    m0 = np.cumsum(levels * hist)
    mean = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean * w0 - m0) ** 2 / (w0 * (1 - w0))
    between = np.nan_to_num(between, nan=0.0, posinf=0.0)
    level = int(np.argmax(between))
    return level, float(between[level] / total_var)


def object_region(image: np.ndarray, rule: ObjectRule) -> np.ndarray:
    """Bool (H, W) object mask of a normal image (H, W[, C]) in [0, 1]: where defects may go."""
    array = np.nan_to_num(np.asarray(image, np.float32))
    grey = array.mean(axis=2) if array.ndim == 3 else array
    kind = rule.rule
    level = rule.threshold
    if kind in ("auto", "otsu"):
        otsu_level, separation = _otsu(to_uint8(np.clip(grey, 0, 1)))
        level = (otsu_level + 0.5) / 255.0  # grey > level ⇔ uint8 grey > Otsu's level
        if kind == "auto":
            kind = "otsu" if separation >= rule.min_separation else "frame"
    if kind == "frame":
        region = np.ones(grey.shape, bool)
    else:
        bright = grey > level
        polarity = rule.polarity
        if polarity == "auto":
            border = np.concatenate([bright[0], bright[-1], bright[1:-1, 0], bright[1:-1, -1]])
            polarity = "dark" if border.mean() > 0.5 else "bright"
        region = (bright if polarity == "bright" else ~bright).astype(np.uint8)
        kernel = np.ones((3, 3), np.uint8)
        region = cv2.morphologyEx(region, cv2.MORPH_OPEN, kernel)
        region = cv2.morphologyEx(region, cv2.MORPH_CLOSE, kernel).astype(bool)
    if rule.margin > 0:
        region[: rule.margin] = region[-rule.margin :] = False
        region[:, : rule.margin] = region[:, -rule.margin :] = False
    return region


def binarize_mask(soft: np.ndarray, threshold: float, min_area: int) -> np.ndarray:
    """The sampling mask rule: ``soft ≥ threshold``, then 8-connected components smaller
    than ``min_area`` pixels removed (a few stray pixels are not a defect)."""
    mask = (np.asarray(soft) >= threshold).astype(np.uint8)
    if min_area > 1 and mask.any():
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
        keep = np.zeros(n, bool)
        keep[1:] = stats[1:, cv2.CC_STAT_AREA] >= min_area
        mask = keep[labels].astype(np.uint8)
    return mask.astype(bool)
