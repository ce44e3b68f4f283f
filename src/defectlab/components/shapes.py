"""Defect shape generators: where a defect is, as a bool mask; its look is painted elsewhere.

Each generator is ``(rng, height, width, centre (y, x), radius) -> bool (height, width)`` and
draws within about ``radius`` of ``centre``, so placement (ROI, border margin) stays with the
synthesizer. Families, following the competition toolbox and the DRAEM / CutPaste papers:

* ``bezier_blob``, ``gaussian_blob``: closed irregular blobs (joined Bezier curves, filled
  2-D Gaussian point clouds);
* ``scratch``: one thin wobbly open Bezier curve;
* ``elastic_line``, ``elastic_circle``: a line, disc or ring bent by a smooth random
  displacement field (dents, rings, bent scratches);
* ``perlin_region``: thresholded multi-octave Perlin noise (DRAEM style), often several
  ragged islands;
* ``crack``: branching random-walk polylines, 1–2 px wide;
* ``cutpaste``, ``scar``: a rotated rectangle / a thin long rotated strip; the synthesizer
  fills these (:data:`PATCH_SHAPES`) with a patch cut from elsewhere, as in CutPaste.

Local canvases keep each generator's cost proportional to the defect, not the image. A
generator may take keyword-only ranges of its own (``strength``, ``octaves``, ...) with
defaults; :class:`~defectlab.components.painting.ProceduralConfig` passes them from its fields.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

#: ``(rng, height, width, centre (y, x), radius) -> bool mask (height, width)``
ShapeGenerator = Callable[[np.random.Generator, int, int, tuple[float, float], float], np.ndarray]

#: shape name → generator; register new shapes with :func:`shape_generator`
SHAPES: dict[str, ShapeGenerator] = {}

#: shapes whose inside is a patch cut from elsewhere (same or another normal image)
PATCH_SHAPES: frozenset[str] = frozenset({"cutpaste", "scar"})

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


def _canvas(centre: tuple[float, float], reach: float) -> tuple[np.ndarray, int, int, np.ndarray]:
    """A zeroed local uint8 canvas covering ``reach`` px around ``centre``: (canvas, top,
    left, centre in canvas coordinates)."""
    half = math.ceil(reach) + 2
    cy, cx = centre
    top, left = math.floor(cy) - half, math.floor(cx) - half
    canvas = np.zeros((2 * half + 2, 2 * half + 2), np.uint8)
    return canvas, top, left, np.array([cy - top, cx - left])


def _place(local: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """Put a local bool/uint8 canvas whose (0, 0) is image pixel (top, left) into a full mask."""
    mask = np.zeros((height, width), bool)
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(height, top + local.shape[0]), min(width, left + local.shape[1])
    if y1 > y0 and x1 > x0:
        mask[y0:y1, x0:x1] = local[y0 - top : y1 - top, x0 - left : x1 - left] > 0
    return mask


def _elastic_warp(
    rng: np.random.Generator, local: np.ndarray, amplitude: float, smoothness: float
) -> np.ndarray:
    """Bend a binary canvas by a smooth random displacement field (max ``amplitude`` px)."""
    h, w = local.shape
    field = rng.standard_normal((2, h, w)).astype(np.float32)
    sigma = max(1.0, smoothness)
    k = 2 * math.ceil(3 * sigma) + 1
    # a bend, not a shift: the placement already chose where the shape goes
    dy = cv2.GaussianBlur(field[0], (k, k), sigma)
    dx = cv2.GaussianBlur(field[1], (k, k), sigma)
    dy -= dy.mean()
    dx -= dx.mean()
    peak = max(float(np.abs(dy).max()), float(np.abs(dx).max()), 1e-9)
    dy *= amplitude / peak
    dx *= amplitude / peak
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    warped = cv2.remap(
        local.astype(np.float32),
        xx + dx,
        yy + dy,
        cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
    )
    return (warped >= 0.5).astype(np.uint8)


@shape_generator("elastic_line")
def elastic_line(
    rng: np.random.Generator,
    height: int,
    width: int,
    centre: tuple[float, float],
    radius: float,
    *,
    strength: tuple[float, float] = (0.08, 0.2),
) -> np.ndarray:
    """A straight line 2–4 px thick bent by an elastic warp (peak displacement ``strength``
    times the radius): bent scratches, folds."""
    canvas, top, left, c = _canvas(centre, radius * 1.1)
    length = 2 * radius * rng.uniform(0.6, 0.8)
    theta = rng.uniform(0, math.pi)
    along = np.array([math.sin(theta), math.cos(theta)])
    ends = np.stack([c - along * length / 2, c + along * length / 2])
    thickness = int(rng.integers(2, 5))
    cv2.polylines(canvas, [_fixed(ends)], False, 1, thickness, cv2.LINE_8, _SHIFT)
    warped = _elastic_warp(rng, canvas, rng.uniform(*strength) * radius, 0.25 * radius)
    if not warped.any():  # a warp can only thin a line this thick, but never leave nothing
        warped = canvas
    return _place(warped, top, left, height, width)


@shape_generator("elastic_circle")
def elastic_circle(
    rng: np.random.Generator,
    height: int,
    width: int,
    centre: tuple[float, float],
    radius: float,
    *,
    strength: tuple[float, float] = (0.08, 0.2),
) -> np.ndarray:
    """A disc or a ring bent by an elastic warp (peak displacement ``strength`` times the
    radius): dents, pits, ring marks."""
    canvas, top, left, c = _canvas(centre, radius * 1.1)
    rho = radius * rng.uniform(0.45, 0.75)
    filled = rng.random() < 0.5
    thickness = cv2.FILLED if filled else int(rng.integers(2, 4))
    centre_fixed = tuple(int(v) for v in np.round(c[::-1] * (1 << _SHIFT)))
    cv2.circle(canvas, centre_fixed, round(rho * (1 << _SHIFT)), 1, thickness, cv2.LINE_8, _SHIFT)
    warped = _elastic_warp(rng, canvas, rng.uniform(*strength) * radius, 0.25 * radius)
    if not warped.any():
        warped = canvas
    return _place(warped, top, left, height, width)


def _perlin_octave(rng: np.random.Generator, t: np.ndarray, n: int) -> np.ndarray:
    """One octave of Perlin noise with ``n`` lattice cells across, sampled at ``t`` in [0, 1)."""
    angles = rng.uniform(0, 2 * math.pi, (n + 1, n + 1))
    grad = np.stack([np.sin(angles), np.cos(angles)], -1)  # (n+1, n+1, 2) as (gy, gx)
    pos = t * n
    cell = np.minimum(pos.astype(int), n - 1)
    frac = pos - cell
    fy, fx = frac[:, None], frac[None, :]
    iy, ix = cell[:, None], cell[None, :]
    dots = [
        grad[iy + dy, ix + dx, 0] * (fy - dy) + grad[iy + dy, ix + dx, 1] * (fx - dx)
        for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1))
    ]
    uy = fy**3 * (fy * (fy * 6 - 15) + 10)  # Perlin's fade curve
    ux = fx**3 * (fx * (fx * 6 - 15) + 10)
    top = dots[0] + ux * (dots[1] - dots[0])
    bottom = dots[2] + ux * (dots[3] - dots[2])
    return top + uy * (bottom - top)


def perlin_noise(
    rng: np.random.Generator, size: int, cells: int, octaves: int, persistence: float = 0.5
) -> np.ndarray:
    """Multi-octave 2-D Perlin (gradient) noise on a ``size`` x ``size`` grid, float32.

    Octave ``k`` has ``cells * 2**k`` lattice cells across; amplitudes fall by
    ``persistence`` per octave. Vectorised over pixels (DRAEM's ``rand_perlin_2d``)."""
    t = (np.arange(size, dtype=np.float64) + 0.5) / size
    total = np.zeros((size, size))
    for octave in range(octaves):
        total += persistence**octave * _perlin_octave(rng, t, cells * 2**octave)
    return total.astype(np.float32)


@shape_generator("perlin_region")
def perlin_region(
    rng: np.random.Generator,
    height: int,
    width: int,
    centre: tuple[float, float],
    radius: float,
    *,
    octaves: tuple[int, int] = (2, 4),
    coverage: tuple[float, float] = (0.3, 0.6),
) -> np.ndarray:
    """Thresholded multi-octave Perlin noise inside a soft disc: ragged stains (DRAEM).
    ``coverage`` is the share of the disc above the threshold."""
    scale = min(1.0, 24.0 / radius)  # noise on a capped local grid, then scaled up
    half = math.ceil(radius * scale) + 2
    size = 2 * half + 1
    n_octaves = int(rng.integers(octaves[0], octaves[1] + 1))
    noise = perlin_noise(rng, size, int(rng.integers(1, 3)), n_octaves)
    noise /= max(float(noise.std()), 1e-6)
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    dist = np.hypot(yy, xx) / (radius * scale)
    # fade towards the rim so islands end in noise-shaped, not circular, edges
    score = noise - 3.0 * np.clip(dist - 0.55, 0.0, None) ** 2 * 4
    inside = dist <= 1.0
    threshold = np.quantile(score[inside], 1.0 - rng.uniform(*coverage))
    local = ((score > threshold) & inside).astype(np.uint8)
    return _paste_local(local, scale, centre, height, width)


def _walk(
    rng: np.random.Generator, start: np.ndarray, heading: float, length: float, steps: int
) -> np.ndarray:
    """(steps + 1, 2) points of a random walk with smoothly wandering heading."""
    turns = np.cumsum(rng.normal(0.0, 0.25, steps))
    headings = heading + turns
    moves = (length / steps) * np.stack([np.sin(headings), np.cos(headings)], 1)
    return np.vstack([start[None], start + np.cumsum(moves, axis=0)])


def _within(points: np.ndarray, centre: np.ndarray, reach: float) -> np.ndarray:
    """The walk up to its first point farther than ``reach`` from ``centre``."""
    outside = np.flatnonzero(np.hypot(*(points - centre).T) > reach)
    return points[: outside[0]] if outside.size else points


@shape_generator("crack")
def crack(
    rng: np.random.Generator,
    height: int,
    width: int,
    centre: tuple[float, float],
    radius: float,
    *,
    branches: tuple[int, int] = (0, 3),
) -> np.ndarray:
    """Branching random-walk polylines 1–2 px wide: hairline cracks with ``branches`` side
    branches (fewer on small cracks, which would otherwise clot into a blob)."""
    c = np.asarray(centre, dtype=np.float64)
    theta = rng.uniform(0, 2 * math.pi)
    steps = 16
    arms = [
        _walk(rng, c, theta, radius * rng.uniform(0.9, 1.15), steps),
        _walk(rng, c, theta + math.pi, radius * rng.uniform(0.9, 1.15), steps),
    ]
    trunk = np.vstack(
        [_within(arms[0], c, 1.1 * radius)[::-1], _within(arms[1], c, 1.1 * radius)[1:]]
    )
    side_branches = []
    # small cracks get fewer branches and a 1 px trunk, or they clot into a blob
    wide = radius >= 8 and rng.random() < 0.5
    n_branches = min(int(rng.integers(branches[0], branches[1] + 1)), 1 + int(radius // 8))
    for _ in range(n_branches):
        i = int(rng.integers(1, max(2, len(trunk) - 1)))
        i = min(i, len(trunk) - 1)
        d = trunk[i] - trunk[i - 1]
        side = 1.0 if rng.random() < 0.5 else -1.0
        heading = math.atan2(d[0], d[1]) + side * rng.uniform(0.5, 1.2)
        branch = _walk(rng, trunk[i], heading, radius * rng.uniform(0.3, 0.6), 8)
        side_branches.append(_within(branch, c, 1.1 * radius))
    mask = np.zeros((height, width), np.uint8)
    cv2.polylines(mask, [_fixed(trunk)], False, 1, 1, cv2.LINE_8, _SHIFT)
    if wide:  # a 2 px trunk (cv2 thickness 2 draws 3 px)
        mask = cv2.dilate(mask, np.ones((2, 2), np.uint8))
    cv2.polylines(
        mask, [_fixed(b) for b in side_branches if len(b) > 1], False, 1, 1, cv2.LINE_8, _SHIFT
    )
    return mask.astype(bool)


def _rotated_rectangle(
    height: int, width: int, centre: tuple[float, float], size: tuple[float, float], angle: float
) -> np.ndarray:
    """Filled rectangle (length, breadth) rotated by ``angle`` degrees about ``centre``."""
    box = cv2.boxPoints(((centre[1], centre[0]), (size[0], size[1]), angle))  # (x, y)
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [_fixed(box[:, ::-1].astype(np.float64))], 1, cv2.LINE_8, _SHIFT)
    return mask.astype(bool)


@shape_generator("cutpaste")
def cutpaste(
    rng: np.random.Generator, height: int, width: int, centre: tuple[float, float], radius: float
) -> np.ndarray:
    """CutPaste patch: a rotated rectangle, aspect 0.3–1 (filled with a displaced patch)."""
    length = 2 * radius * rng.uniform(0.6, 0.85)
    breadth = length * rng.uniform(0.3, 1.0)
    return _rotated_rectangle(height, width, centre, (length, breadth), rng.uniform(0, 180))


@shape_generator("scar")
def scar(
    rng: np.random.Generator, height: int, width: int, centre: tuple[float, float], radius: float
) -> np.ndarray:
    """CutPaste scar: a thin long rotated strip, 2 px to a quarter radius wide."""
    length = 2 * radius * rng.uniform(0.75, 1.0)
    breadth = rng.uniform(2.0, max(2.5, 0.25 * radius))
    return _rotated_rectangle(height, width, centre, (length, breadth), rng.uniform(0, 180))
