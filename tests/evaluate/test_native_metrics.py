"""Pixel metrics on each mask's native grid, whatever the model's resolution."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import defectlab.api as dl
from defectlab.data.transforms import resize_map
from defectlab.evaluate.metrics import (
    EVAL_MAX_SIDE,
    PixelMetricAccumulator,
    aupro,
    best_dice_threshold,
    compute_metrics,
    dice_iou,
    evaluation_mask,
    evaluation_size,
    pixel_auroc,
)
from tests.conftest import write_image


def _native_case() -> list[tuple[np.ndarray, np.ndarray]]:
    """Three images of different native sizes with maps constant per image (model grid
    16×16): a defect image 64×64 (top quarter defect, map 1.0), a normal 128×128 (0.5), a
    defect 32×32 (left half defect, map 0.25)."""
    a = np.zeros((64, 64), bool)
    a[:16] = True
    c = np.zeros((32, 32), bool)
    c[:, :16] = True
    return [
        (a, np.full((16, 16), 1.0, np.float32)),
        (np.zeros((128, 128), bool), np.full((16, 16), 0.5, np.float32)),
        (c, np.full((16, 16), 0.25, np.float32)),
    ]


def test_native_grid_scores_the_native_pixels_not_the_model_ones() -> None:
    case = _native_case()
    maps = np.stack([m for _, m in case])
    accumulator = PixelMetricAccumulator.for_maps(maps, pixel_threshold=0.75)
    for mask, heat in case:
        accumulator.add(mask, resize_map(heat, mask.shape))
    native = accumulator.result()
    # by hand: 1024 defect pixels at 1.0 and 512 at 0.25; normal: 3072 at 1.0, 16384 at 0.5,
    # 512 at 0.25; a defect pixel outscores a normal one, ties counting one half
    pairs = 1024 * (3072 / 2 + 16384 + 512) + 512 * (512 / 2)
    assert native["pixel_auroc"] == pytest.approx(pairs / (1536 * 19968), abs=1e-12)
    assert native["dice"] == pytest.approx(2 * 1024 / (4096 + 1536), abs=1e-12)
    # AUPRO: at FPR 3072/19968 < 0.3 region A is found (PRO 1/2), then the normal image
    # passes (FPR 0.974): the curve to 0.3 is a straight line from (0.154, 0.5)
    f1 = 3072 / 19968
    area = f1 * 0.5 / 2 + (0.3 - f1) * 0.5
    assert native["aupro"] == pytest.approx(area / 0.3, abs=1e-12)
    # the same images scored on the model grid (all 16×16) weigh pixels differently
    small = np.stack([cv2.resize(m.astype(np.uint8), (16, 16), interpolation=0) for m, _ in case])
    model_grid = compute_metrics(
        [1, 0, 1],
        [1.0, 0.5, 0.25],
        image_threshold=0.5,
        masks=small,
        maps=maps,
        pixel_threshold=0.75,
    )
    assert abs(model_grid["pixel_auroc"] - native["pixel_auroc"]) > 0.2
    assert abs(model_grid["dice"] - native["dice"]) > 0.05


def test_accumulator_matches_the_exact_metrics() -> None:
    """Smooth random maps (many distinct values): binned curves agree with the exact ones."""
    rng = np.random.default_rng(0)
    masks, maps = [], []
    for i in range(6):
        heat = cv2.GaussianBlur(rng.normal(size=(48, 48)).astype(np.float32), (0, 0), 3)
        mask = np.zeros((48, 48), bool)
        if i % 2:
            mask[10 + i : 20 + i, 5 : 12 + 2 * i] = True
            heat[mask] += 0.3
        masks.append(mask)
        maps.append(heat)
    masks, maps = np.stack(masks), np.stack(maps)
    accumulator = PixelMetricAccumulator.for_maps(maps, pixel_threshold=0.2)
    for mask, heat in zip(masks, maps, strict=True):
        accumulator.add(mask, heat)
    got = accumulator.result()
    assert got["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps), abs=1e-4)
    assert got["aupro"] == pytest.approx(aupro(masks, maps), abs=1e-4)
    assert got["dice"] == pytest.approx(dice_iou(masks, maps >= 0.2)[0], abs=1e-12)
    # best Dice over every bin is at least the 256-candidate oracle's, and really reached
    best, threshold = got["dice_best"], got["pixel_threshold_best_dice"]
    assert best >= best_dice_threshold(masks, maps)[0] - 1e-9
    assert best == pytest.approx(dice_iou(masks, maps >= threshold)[0], abs=1e-9)


def test_evaluation_grid_caps_the_long_side() -> None:
    assert evaluation_size((300, 300)) == (300, 300)
    assert evaluation_size((600, 1024)) == (300, EVAL_MAX_SIDE)
    mask = np.zeros((600, 1024), bool)
    mask[100:300, 200:400] = True  # 2×2 blocks of the half-size grid
    small = evaluation_mask(mask)
    assert small.shape == (300, 512) and small.sum() == 100 * 100
    with pytest.raises(ValueError, match="must be positive"):
        evaluation_size((0, 10))


def test_bad_inputs_are_refused() -> None:
    accumulator = PixelMetricAccumulator([0.0, 1.0])
    with pytest.raises(ValueError, match=r"must both be \(H, W\)"):
        accumulator.add(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="NaN or inf"):
        accumulator.add(np.zeros((2, 2)), np.full((2, 2), np.nan))
    assert accumulator.result()["pixel_auroc"] is None


def test_evaluate_reports_native_resolution_pixel_metrics(tmp_path: Path) -> None:
    """Normal images 32 px, defect images 96 px with a small defect, a 32 px model: the
    metrics are those of the maps resized to the 96 px masks, not of the 32 px grid."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for i in range(24):
        write_image(root / "normal" / f"n{i:02d}.png", rng.integers(90, 110, (32, 32), np.uint8))
    for i in range(6):
        image = rng.integers(90, 110, (96, 96), np.uint8)
        mask = np.zeros((96, 96), np.uint8)
        cv2.circle(mask, (30 + 5 * i, 50), 4, 255, -1)
        image[mask > 0] += 8  # faint: neither grid ranks every pixel right
        write_image(root / "defect" / f"d{i}.png", image)
        write_image(root / "masks" / f"d{i}.png", mask)
    dl.train("pixelstats", root, tmp_path / "run", image_size=32, device="cpu", progress=False)
    seen = {}

    def keep(loaded, scores, maps) -> None:
        seen.update(loaded=loaded, maps=maps)

    metrics = dl.evaluate(
        tmp_path / "run", root, tmp_path / "eval", progress=False, on_predictions=keep
    )
    loaded, maps = seen["loaded"], seen["maps"]
    native_masks, native_maps = [], []
    for i, sample in enumerate(loaded.samples):
        h, w = loaded.original_sizes[i]
        mask = np.zeros((h, w), bool)
        if sample.mask_path is not None:
            mask = cv2.imread(str(sample.mask_path), cv2.IMREAD_GRAYSCALE) > 127
        native_masks.append(mask.ravel())
        native_maps.append(cv2.resize(maps[i], (w, h), interpolation=cv2.INTER_LINEAR).ravel())
    expected = pixel_auroc(
        np.concatenate(native_masks)[None, None], np.concatenate(native_maps)[None, None]
    )
    assert metrics["pixel_auroc"] == pytest.approx(expected, abs=1e-4)
    assert abs(metrics["pixel_auroc_model_resolution"] - expected) > 0.05
    assert "native grid" in metrics["pixel_metrics_resolution"]
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["pixel_auroc"] == metrics["pixel_auroc"]
