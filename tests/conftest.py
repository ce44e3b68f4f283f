"""Shared fixtures: small real image files in the layouts defectlab reads."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MAGNETIC_TILE = SHARED_DATA / "magnetic-tile"


def write_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3 and array.shape[2] == 3:
        array = array[:, :, ::-1]
    assert cv2.imwrite(str(path), array), path
    return path


def textured(rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """A normal-looking 8-bit grey image: smooth gradient plus fine noise."""
    y, x = np.mgrid[0:size, 0:size]
    base = 100 + 40 * np.sin(x / 7.0) + 20 * np.cos(y / 5.0)
    return np.clip(base + rng.normal(0, 4, (size, size)), 0, 255).astype(np.uint8)


def with_defect(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    size = image.shape[0]
    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
    mask = np.zeros_like(image)
    cv2.circle(mask, (int(cx), int(cy)), size // 8, 255, -1)
    out = image.copy()
    out[mask > 0] = 250
    return out, mask


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    """An MVTec AD category folder ``bottle/`` with 12 train, 4 good and 4 defect test images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "mvtec" / "bottle"
    for i in range(12):
        write_image(root / "train" / "good" / f"{i:03d}.png", textured(rng))
    for i in range(4):
        write_image(root / "test" / "good" / f"{i:03d}.png", textured(rng))
        image, mask = with_defect(textured(rng), rng)
        write_image(root / "test" / "crack" / f"{i:03d}.png", image)
        write_image(root / "ground_truth" / "crack" / f"{i:03d}_mask.png", mask)
    return root


def write_folder_dataset(
    root: Path, rng: np.random.Generator, n_normal: int, n_defect: int, size: int = 48
) -> Path:
    """A plain folder layout under ``root``: ``normal/nXX.png`` textures, then ``defect/dXX.png``
    with their masks in ``masks/`` (matched by stem), drawn in that order from ``rng``."""
    for i in range(n_normal):
        write_image(root / "normal" / f"n{i:02d}.png", textured(rng, size))
    for i in range(n_defect):
        image, mask = with_defect(textured(rng, size), rng)
        write_image(root / "defect" / f"d{i:02d}.png", image)
        write_image(root / "masks" / f"d{i:02d}.png", mask)
    return root


@pytest.fixture
def folder_root(tmp_path: Path) -> Path:
    """A plain folder layout: normal/, defect/ and masks/ (matched by stem)."""
    return write_folder_dataset(tmp_path / "folder", np.random.default_rng(1), 20, 6)


def interrupt_on_call(
    monkeypatch: pytest.MonkeyPatch, owner: type, name: str, call: int
) -> Callable:
    """Make ``owner.name`` raise ``KeyboardInterrupt`` on its ``call``-th call (from 1), as a
    user's Ctrl-C mid-training would; returns the original to restore before resuming."""
    original = getattr(owner, name)
    calls = {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, interrupted)
    return original


# Outside CI the real data may be absent; in CI (CI set) a missing folder fails the tests.
requires_magnetic_tile = pytest.mark.skipif(
    not (MAGNETIC_TILE / "MT_Free").is_dir() and not os.environ.get("CI"),
    reason="needs ../shared/data/magnetic-tile",
)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny convolutions on a shared 2-core machine: one thread avoids oversubscription.
    Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def striped_normals(n: int, seed: int = 0, size: int = 64) -> np.ndarray:
    """(N, H, W, 1) in [0, 1]: diagonal stripes of random phase and level, slight noise;
    normal images for the feature-based detectors' tests."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    images = []
    for _ in range(n):
        phase, level = rng.uniform(0, 2 * np.pi), rng.uniform(0.4, 0.5)
        image = level + 0.15 * np.sin(2 * np.pi * (x + y) / 16 + phase)
        images.append(image + rng.normal(0, 0.02, (size, size)))
    return np.clip(np.stack(images), 0, 1)[..., None].astype(np.float32)


def with_square(images: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    """A copy of (N, H, W, C) images with a saturated square: an obvious anomaly."""
    out = images.copy()
    out[:, top : top + side, left : left + side] = 1.0
    return out


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) numpy images → the (N, C, H, W) tensor models take."""
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
