"""Procedural defect synthesis: paint plausible defects on normal images, with exact masks.

Normal-only inspection needs defect examples to train segmenters and to sanity-check
detectors. Following the competition toolbox (MISSION S2), we draw random shapes (joined
Bezier curves, filled clouds of 2-D Gaussian points, thin open curves for scratches and
cracks), place them at a random position inside the object (Otsu region of interest) and off
the image border, and give them a grey value relative to the local background with an
optional linear grey-level gradient, faint noise matching the local texture and part of the
underlying surface texture kept (flat pasted patches look cartoonish). A Gaussian
alpha softens the edges; the returned mask is exactly where that alpha is at least 0.5, so the
label agrees with what is visible, and every pixel the alpha does not reach is left
bit-identical.

The module is built to be extended: every shape is one small function registered in
:data:`SHAPES` (``@shape_generator("name")``), the appearance is one function
(:func:`blend_defect`), and placement is separate (:func:`object_roi`, :func:`sample_centre`).
Later additions (Perlin noise, CutPaste, elastic warps, Poisson blending) plug in there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import cv2
import numpy as np

from defectlab.registry import register
from defectlab.synth.base import SynthConfig, Synthesizer, SynthSample

#: ``(rng, height, width, centre (y, x), radius) -> bool mask (height, width)``
ShapeGenerator = Callable[[np.random.Generator, int, int, tuple[float, float], float], np.ndarray]

#: shape name → generator; register new shapes with :func:`shape_generator`
SHAPES: dict[str, ShapeGenerator] = {}

#: images whose short side is below this cannot hold a defect off the border
MIN_IMAGE_SIDE = 16
#: a defect's radius is never below this many pixels (smaller ones are invisible noise)
MIN_RADIUS_PX = 2.5
#: attempts per defect before giving up on it (the first defect then uses a fallback disc)
MAX_TRIES = 12
#: Otsu is trusted only when it separates two classes this well (between/total variance);
#: a textured surface filling the frame scores below it and gets the whole image as ROI
MIN_OTSU_SEPARABILITY = 0.8
#: an Otsu object smaller than this share of the image falls back to the whole image
MIN_ROI_FRACTION = 0.1
#: alpha below this is set to 0 (a change < 1/1000 of the contrast, below one 8-bit step)
ALPHA_FLOOR = 1e-3
#: sub-pixel precision for cv2 drawing (coordinates are multiplied by 2**_SHIFT)
_SHIFT = 3


def shape_generator(name: str) -> Callable[[ShapeGenerator], ShapeGenerator]:
    """Decorator: register a shape generator under ``name`` in :data:`SHAPES`."""

    def decorate(fn: ShapeGenerator) -> ShapeGenerator:
        if name in SHAPES:
            raise ValueError(f"shape {name!r} is already registered")
        SHAPES[name] = fn
        return fn

    return decorate


def _fixed(points_yx: np.ndarray) -> np.ndarray:
    """(N, 2) float (y, x) points → cv2 fixed-point (N, 1, 2) int32 (x, y) at ``_SHIFT``."""
    xy = points_yx[:, ::-1] * (1 << _SHIFT)
    return np.round(xy).astype(np.int32).reshape(-1, 1, 2)


def _cubic_bezier(
    p0: np.ndarray, p1: np.ndarray, p2: np.ndarray, p3: np.ndarray, n: int
) -> np.ndarray:
    """Points of cubic Bezier segments; p* are (S, 2), returns (S * n, 2) (end points excluded)."""
    t = np.linspace(0.0, 1.0, n, endpoint=False)[None, :, None]
    u = 1.0 - t
    pts = (
        u**3 * p0[:, None]
        + 3 * u**2 * t * p1[:, None]
        + 3 * u * t**2 * p2[:, None]
        + t**3 * p3[:, None]
    )
    return pts.reshape(-1, 2)


@shape_generator("bezier_blob")
def bezier_blob(
    rng: np.random.Generator, height: int, width: int, centre: tuple[float, float], radius: float
) -> np.ndarray:
    """Closed irregular blob: cubic Bezier segments through 4–7 anchors at random radii."""
    n = int(rng.integers(4, 8))
    step = 2 * math.pi / n
    angles = rng.uniform(0, 2 * math.pi) + step * (np.arange(n) + rng.uniform(-0.3, 0.3, n))
    radii = radius * rng.uniform(0.45, 1.0, n)
    anchors = np.asarray(centre) + radii[:, None] * np.stack([np.sin(angles), np.cos(angles)], 1)
    # Catmull-Rom style tangents with random tension give smooth but irregular outlines
    tangents = np.roll(anchors, -1, axis=0) - np.roll(anchors, 1, axis=0)
    tension = rng.uniform(0.08, 0.25, n)[:, None]
    nxt = np.roll(np.arange(n), -1)
    p1 = anchors + tension * tangents
    p2 = anchors[nxt] - tension[nxt] * tangents[nxt]
    outline = _cubic_bezier(anchors, p1, p2, anchors[nxt], 16)
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [_fixed(outline)], 1, cv2.LINE_8, _SHIFT)
    return mask.astype(bool)


@shape_generator("gaussian_blob")
def gaussian_blob(
    rng: np.random.Generator, height: int, width: int, centre: tuple[float, float], radius: float
) -> np.ndarray:
    """Cloud of 2-D Gaussian points (random anisotropy and rotation), filled by closing."""
    n = int(rng.integers(25, 60))
    s1 = radius * rng.uniform(0.35, 0.5)
    s2 = s1 * rng.uniform(0.3, 1.0)
    theta = rng.uniform(0, math.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    offsets = (rng.standard_normal((n, 2)) * [s1, s2]) @ rot.T
    norm = np.linalg.norm(offsets, axis=1, keepdims=True)
    offsets *= np.minimum(1.0, radius / np.maximum(norm, 1e-9))  # stay within the radius
    # morphology on a local canvas at a capped scale: cost independent of the image size
    scale = min(1.0, 24.0 / radius)
    dot = max(1, round(radius * scale * 0.15))
    close = max(1, round(radius * scale * 0.4))
    half = math.ceil(radius * scale) + dot + close + 2
    local = np.zeros((2 * half + 1, 2 * half + 1), np.uint8)
    pts = np.round(offsets * scale).astype(int) + half
    local[pts[:, 0], pts[:, 1]] = 1
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dot + 1, 2 * dot + 1))
    local = cv2.dilate(local, disc)
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * close + 1, 2 * close + 1))
    local = cv2.morphologyEx(local, cv2.MORPH_CLOSE, disc)
    return _paste_local(local, scale, centre, height, width)


def _paste_local(
    local: np.ndarray, scale: float, centre: tuple[float, float], height: int, width: int
) -> np.ndarray:
    """Place a local canvas (centred on ``centre``, drawn at ``scale``) into a full mask."""
    half = local.shape[0] // 2
    cy, cx = centre
    # affine map from local canvas coordinates to image coordinates
    m = np.array([[1 / scale, 0, cx - half / scale], [0, 1 / scale, cy - half / scale]])
    size = local.shape[0] / scale
    x0, y0 = max(0, math.floor(cx - size / 2) - 1), max(0, math.floor(cy - size / 2) - 1)
    x1, y1 = min(width, math.ceil(cx + size / 2) + 2), min(height, math.ceil(cy + size / 2) + 2)
    mask = np.zeros((height, width), bool)
    if x1 <= x0 or y1 <= y0:
        return mask
    m[:, 2] -= (x0, y0)
    warped = cv2.warpAffine(local.astype(np.float32), m, (x1 - x0, y1 - y0), flags=cv2.INTER_LINEAR)
    mask[y0:y1, x0:x1] = warped >= 0.5
    return mask


@shape_generator("scratch")
def scratch(
    rng: np.random.Generator, height: int, width: int, centre: tuple[float, float], radius: float
) -> np.ndarray:
    """Thin open curve (scratch, crack): one cubic Bezier with a slight wobble, 1–4 px thick."""
    length = 2 * radius * rng.uniform(0.6, 1.0)
    theta = rng.uniform(0, math.pi)
    along = np.array([math.sin(theta), math.cos(theta)])
    across = np.array([along[1], -along[0]])
    c = np.asarray(centre)
    p0, p3 = c - along * length / 2, c + along * length / 2
    p1 = c - along * length / 6 + across * rng.uniform(-0.35, 0.35) * length
    p2 = c + along * length / 6 + across * rng.uniform(-0.35, 0.35) * length
    n = 48
    curve = _cubic_bezier(p0[None], p1[None], p2[None], p3[None], n)
    curve = np.vstack([curve, p3[None]])
    # crack-like wobble: smoothed random walk across the curve, pinned at both ends
    walk = np.cumsum(rng.standard_normal(n + 1))
    walk -= np.linspace(walk[0], walk[-1], n + 1)
    walk = np.convolve(walk, np.ones(5) / 5, mode="same")
    amplitude = rng.uniform(0.0, 0.04) * length / max(np.abs(walk).max(), 1e-9)
    curve += (walk * amplitude)[:, None] * across
    thickness = int(rng.integers(1, 5))
    mask = np.zeros((height, width), np.uint8)
    cv2.polylines(mask, [_fixed(curve)], False, 1, thickness, cv2.LINE_8, _SHIFT)
    return mask.astype(bool)


@dataclass
class ProceduralConfig(SynthConfig):
    #: shape generators to draw from, uniformly (names in ``SHAPES``)
    shapes: tuple[str, ...] = ("bezier_blob", "gaussian_blob", "scratch")
    #: number of defects per image, inclusive range
    defects_per_image: tuple[int, int] = (1, 2)
    #: defect extent (diameter) relative to the image's short side
    size_fraction: tuple[float, float] = (0.04, 0.2)
    #: intensity change relative to the local background (Weber); sign random: dark or bright
    contrast: tuple[float, float] = (0.15, 0.45)
    #: share of the underlying surface texture kept inside the defect (0: flat fill + noise)
    texture: tuple[float, float] = (0.2, 0.8)
    #: Gaussian sigma in px of the soft alpha at the defect edge (capped for thin shapes)
    edge_softness: tuple[float, float] = (0.5, 2.5)
    #: fraction of the image's short side kept free of defects at the border
    border_margin: float = 0.08
    #: "otsu": defects inside the object found by Otsu thresholding; "none": whole image
    roi: str = "otsu"
    #: a defect smaller than this (in px) is resampled
    min_mask_pixels: int = 12
    #: linear grey-level gradient across each defect (random direction and strength)
    gradient: bool = True

    def __post_init__(self) -> None:
        self.shapes = tuple(self.shapes)
        if not self.shapes:
            raise ValueError("shapes must name at least one shape")
        unknown = [s for s in self.shapes if s not in SHAPES]
        if unknown:
            raise ValueError(f"unknown shapes {unknown}; available: {', '.join(SHAPES)}")
        _check_range("defects_per_image", self.defects_per_image, 1, 50)
        if not all(float(v).is_integer() for v in self.defects_per_image):
            raise ValueError(f"defects_per_image must be integers, got {self.defects_per_image}")
        self.defects_per_image = tuple(int(v) for v in self.defects_per_image)
        _check_range("size_fraction", self.size_fraction, 0.0, 0.5, open_low=True)
        _check_range("contrast", self.contrast, 0.0, 1.0, open_low=True)
        _check_range("texture", self.texture, 0.0, 1.0)
        _check_range("edge_softness", self.edge_softness, 0.0, 20.0)
        if not 0.0 <= self.border_margin < 0.4:
            raise ValueError(f"border_margin must be in [0, 0.4), got {self.border_margin}")
        if self.roi not in ("otsu", "none"):
            raise ValueError(f"roi must be 'otsu' or 'none', got {self.roi!r}")
        if self.min_mask_pixels < 1:
            raise ValueError(f"min_mask_pixels must be at least 1, got {self.min_mask_pixels}")


def _check_range(name: str, value: Any, low: float, high: float, *, open_low: bool = False) -> None:
    """``value`` must be a (lo, hi) pair with low <= lo <= hi <= high (low < lo if open)."""
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ValueError(f"{name} must be a (low, high) pair, got {value!r}")
    lo, hi = value
    if lo > hi:
        raise ValueError(f"{name}: low {lo} is above high {hi}")
    if lo < low or (open_low and lo == low) or hi > high:
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must lie in {bracket}{low}, {high}], got {value!r}")


def object_roi(image: np.ndarray, mode: str = "otsu") -> tuple[np.ndarray, str]:
    """Where defects may go: bool (H, W) and how it was found ("otsu", "whole", "none").

    "otsu" thresholds the blurred grey image, keeps the class that touches the image border
    least (the object), takes its largest component with holes filled, and falls back to the
    whole image when the split is weak (a texture filling the frame) or the object is tiny.
    """
    height, width = image.shape[:2]
    whole = np.ones((height, width), bool)
    if mode == "none":
        return whole, "none"
    grey = image.mean(axis=2) if image.ndim == 3 else image
    sigma = max(1.0, 0.01 * min(height, width))
    grey8 = np.clip(np.rint(cv2.GaussianBlur(grey, (0, 0), sigma) * 255), 0, 255)
    grey8 = grey8.astype(np.uint8)
    threshold, _ = cv2.threshold(grey8, 0, 1, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    above = grey8 > threshold
    fraction = above.mean()
    if fraction in (0.0, 1.0):
        return whole, "whole"
    values = grey8.astype(np.float64)
    between = fraction * (1 - fraction) * (values[above].mean() - values[~above].mean()) ** 2
    if between < MIN_OTSU_SEPARABILITY * values.var():
        return whole, "whole"
    border = np.concatenate([above[0], above[-1], above[:, 0], above[:, -1]])
    candidate = above if border.mean() <= 0.5 else ~above
    contours, _ = cv2.findContours(
        candidate.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    if not contours:
        return whole, "whole"
    largest = max(contours, key=cv2.contourArea)
    roi = np.zeros((height, width), np.uint8)
    cv2.drawContours(roi, [largest], -1, 1, thickness=cv2.FILLED)
    if roi.mean() < MIN_ROI_FRACTION:
        return whole, "whole"
    return roi.astype(bool), "otsu"


def _distance_inside(region: np.ndarray) -> np.ndarray:
    """Distance (px) from each pixel's centre to the edge of ``region`` or of the image."""
    padded = np.pad(region.astype(np.uint8), 1)
    return cv2.distanceTransform(padded, cv2.DIST_L2, 5)[1:-1, 1:-1] - 0.5


def sample_centre(
    rng: np.random.Generator, candidates: list[np.ndarray]
) -> tuple[float, float] | None:
    """A random sub-pixel (y, x) centre in the first non-empty of ``candidates`` (bool masks)."""
    for region in candidates:
        flat = np.flatnonzero(region)
        if flat.size:
            y, x = divmod(int(flat[rng.integers(flat.size)]), region.shape[1])
            dy, dx = rng.uniform(-0.5, 0.5, 2)
            return y + float(dy), x + float(dx)
    return None


@dataclass
class Painted:
    """One painted defect: its exact mask and the parameters that made it."""

    shape: str
    centre: tuple[float, float]
    radius: float
    contrast: float  # signed: negative = darker than the background
    softness: float  # effective Gaussian sigma of the edge, px
    texture: float  # share of the source texture kept inside
    mask: np.ndarray


def blend_defect(
    target: np.ndarray,
    source: np.ndarray,
    shape: np.ndarray,
    rng: np.random.Generator,
    *,
    contrast: float,
    softness: float,
    gradient: bool,
    texture: float = 0.0,
    allowed: np.ndarray,
    min_pixels: int = 1,
) -> tuple[np.ndarray, float, float] | None:
    """Paint ``shape`` into ``target`` in place; return (exact mask, signed contrast, sigma).

    The defect value is the local background of ``source`` (mean inside the dilated shape)
    changed by ``contrast`` (Weber; sign random, flipped when there is no room), times an
    optional linear gradient, plus faint noise at the local high-frequency std; a share
    ``texture`` of the source pixels (rather than their mean) is kept underneath. The alpha is
    the shape blurred with ``softness`` (capped at half the shape's thickness, peak normalised
    to 1) and cut to ``allowed``; the mask is alpha >= 0.5. Pixels with alpha 0 are untouched.
    Returns None, leaving ``target`` untouched, when the mask has fewer than ``min_pixels``.
    """
    height, width = shape.shape
    shape_u8 = shape.astype(np.uint8)
    x, y, w, h = cv2.boundingRect(shape_u8)
    if w == 0 or h == 0:
        return None
    radius = max(w, h) / 2
    support = math.ceil(3 * softness)
    grow = max(2, round(radius / 2))
    pad = max(support, grow) + 2
    y0, y1 = max(0, y - pad), min(height, y + h + pad)
    x0, x1 = max(0, x - pad), min(width, x + w + pad)
    local = shape_u8[y0:y1, x0:x1]
    src = source[y0:y1, x0:x1].astype(np.float32)

    # edge softness: never blur a thin shape (scratch) more than its half-thickness
    inradius = float(cv2.distanceTransform(np.pad(local, 1), cv2.DIST_L2, 3).max())
    sigma = min(softness, max(0.5, 0.5 * inradius)) if softness > 0 else 0.0
    alpha = local.astype(np.float32)
    if sigma > 0:
        k = 2 * math.ceil(3 * sigma) + 1
        alpha = cv2.GaussianBlur(alpha, (k, k), sigma, borderType=cv2.BORDER_CONSTANT)
        alpha = np.minimum(alpha / max(float(alpha.max()), 1e-6), 1.0)
        # drop the square kernel's far tails: the touched area is the shape grown by ~3 sigma
        alpha[alpha < ALPHA_FLOOR] = 0.0
    alpha *= allowed[y0:y1, x0:x1]
    mask = alpha >= 0.5
    if int(mask.sum()) < max(1, min_pixels):
        return None

    # local background and texture statistics, per channel
    ring = cv2.dilate(local, np.ones((2 * grow + 1, 2 * grow + 1), np.uint8)).astype(bool)
    background = src[ring].mean(axis=0)  # (C,)
    residual = src - cv2.GaussianBlur(src, (0, 0), 1.5).reshape(src.shape)
    local_std = residual[ring].std(axis=0)

    # Weber contrast with a floor (dark backgrounds still get a visible change)
    level = float(background.mean())
    magnitude = contrast * max(level, 0.25)
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if sign < 0 and level < magnitude and 1 - level > level:
        sign = 1.0
    elif sign > 0 and 1 - level < magnitude and level > 1 - level:
        sign = -1.0
    delta = sign * contrast * np.maximum(background, 0.25)

    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    shade = np.ones_like(yy)
    if gradient:
        theta = rng.uniform(0, 2 * math.pi)
        cy, cx = y + h / 2, x + w / 2
        along = ((yy - cy) * math.sin(theta) + (xx - cx) * math.cos(theta)) / max(radius, 1.0)
        shade = 1.0 + rng.uniform(0.2, 0.7) * np.clip(along, -1.0, 1.0)
    noise = rng.standard_normal(yy.shape).astype(np.float32)
    strength = rng.uniform(0.5, 1.0)
    fill = background + strength * noise[..., None] * local_std
    value = (1 - texture) * fill + texture * src + shade[..., None] * delta
    value = np.clip(value, 0.0, 1.0).astype(np.float32)

    region = target[y0:y1, x0:x1]
    touched = alpha > 0
    a = alpha[touched][:, None]
    region[touched] = region[touched] + a * (value[touched] - region[touched])
    full = np.zeros((height, width), bool)
    full[y0:y1, x0:x1] = mask
    return full, sign * contrast, sigma


@register
class ProceduralSynthesizer(Synthesizer):
    """Random Bezier / Gaussian-cloud / scratch defects, softly blended, with exact masks."""

    name: ClassVar[str] = "procedural"
    description: ClassVar[str] = (
        "random Bezier blobs, Gaussian-point blobs and scratches, soft-blended in the object ROI"
    )
    Config = ProceduralConfig
    config: ProceduralConfig

    def synthesize(self, image: np.ndarray, rng: np.random.Generator) -> SynthSample:
        """Paint 1+ defects on ``image`` (H, W[, C]) in [0, 1]; same shape and dtype back."""
        cfg = self.config
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3)):
            raise ValueError(f"expected an (H, W), (H, W, 1) or (H, W, 3) image, got {image.shape}")
        height, width = image.shape[:2]
        short = min(height, width)
        if short < MIN_IMAGE_SIDE:
            raise ValueError(
                f"image {height}x{width} is too small for procedural defects: the short side "
                f"must be at least {MIN_IMAGE_SIDE} px"
            )
        source = np.asarray(image, dtype=np.float32)
        if source.ndim == 2:
            source = source[:, :, None]
        out = source.copy()

        roi, roi_kind = object_roi(source, cfg.roi)
        margin = cfg.border_margin * short
        inner = _distance_inside(np.ones((height, width), bool)) >= margin
        allowed = roi & inner
        depth = _distance_inside(roi)  # distance to the ROI edge or the image border

        n_defects = int(rng.integers(cfg.defects_per_image[0], cfg.defects_per_image[1] + 1))
        painted: list[Painted] = []
        for index in range(n_defects):
            result = self._paint_one(out, source, rng, depth, inner, allowed, short)
            if result is None and index == 0:
                result = self._fallback(out, source, rng, inner, short)
            if result is not None:
                painted.append(result)

        mask = np.zeros((height, width), bool)
        for p in painted:
            mask |= p.mask
        result_image = out if image.ndim == 3 else out[:, :, 0]
        record = {
            "shapes": "+".join(p.shape for p in painted),
            "n_defects": len(painted),
            "centres_yx": ";".join(f"{p.centre[0]:.1f} {p.centre[1]:.1f}" for p in painted),
            "radii": ";".join(f"{p.radius:.1f}" for p in painted),
            "contrasts": ";".join(f"{p.contrast:+.3f}" for p in painted),
            "softness": ";".join(f"{p.softness:.2f}" for p in painted),
            "textures": ";".join(f"{p.texture:.2f}" for p in painted),
            "roi": roi_kind,
            "area_fraction": round(float(mask.mean()), 6),
        }
        return SynthSample(result_image.astype(image.dtype, copy=False), mask, record)

    def _paint_one(
        self,
        out: np.ndarray,
        source: np.ndarray,
        rng: np.random.Generator,
        depth: np.ndarray,
        inner: np.ndarray,
        allowed: np.ndarray,
        short: int,
    ) -> Painted | None:
        """Sample and paint one defect, resampling when it ends below ``min_mask_pixels``."""
        cfg = self.config
        height, width = out.shape[:2]
        margin = cfg.border_margin * short
        for _ in range(MAX_TRIES):
            shape_name = cfg.shapes[int(rng.integers(len(cfg.shapes)))]
            radius = max(MIN_RADIUS_PX, rng.uniform(*cfg.size_fraction) * short / 2)
            centre = sample_centre(
                rng, [depth >= margin + radius, depth >= margin, inner, np.ones_like(inner)]
            )
            assert centre is not None  # the last candidate is the whole image
            shape = SHAPES[shape_name](rng, height, width, centre, radius) & allowed
            if shape.sum() < cfg.min_mask_pixels:
                continue
            contrast = rng.uniform(*cfg.contrast)
            softness = rng.uniform(*cfg.edge_softness)
            texture = rng.uniform(*cfg.texture)
            painted = blend_defect(
                out,
                source,
                shape,
                rng,
                contrast=contrast,
                softness=softness,
                gradient=cfg.gradient,
                texture=texture,
                allowed=allowed,
                min_pixels=cfg.min_mask_pixels,
            )
            if painted is None:
                continue
            mask, signed, sigma = painted
            return Painted(shape_name, centre, radius, signed, sigma, texture, mask)
        return None

    def _fallback(
        self,
        out: np.ndarray,
        source: np.ndarray,
        rng: np.random.Generator,
        inner: np.ndarray,
        short: int,
    ) -> Painted:
        """A soft disc in the middle of the image, off the border; used when no defect fits
        the ROI (e.g. a tiny ROI). It is never empty for images of MIN_IMAGE_SIDE or more."""
        height, width = out.shape[:2]
        radius = max(3.0, 0.1 * short)
        centre = ((height - 1) / 2, (width - 1) / 2)
        shape = np.zeros((height, width), np.uint8)
        cv2.circle(shape, (round(centre[1]), round(centre[0])), round(radius), 1, cv2.FILLED)
        contrast = max(self.config.contrast)
        painted = blend_defect(
            out,
            source,
            shape.astype(bool) & inner,
            rng,
            contrast=contrast,
            softness=0.5,
            gradient=False,
            allowed=inner,
        )
        assert painted is not None, "fallback disc is empty"
        mask, signed, sigma = painted
        return Painted("disc", centre, radius, signed, sigma, 0.0, mask)
