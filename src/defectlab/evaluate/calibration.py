"""Scoring loaded images as their run scores them, and calibrating a run's thresholds.

:func:`predict_loaded` scores whole images at the run's size, or stitched native-resolution
tiles when the run tiles; :func:`calibrate` sets the image and pixel thresholds from normal
validation images (quantiles), from labelled validation defects (``f1``), from area ratios
(``area``) or from the model itself (``model``), as :func:`calibration_method` resolves.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np
from tqdm import tqdm

from defectlab.base import Model
from defectlab.config import CalibrationConfig, DataConfig
from defectlab.data.io import image_limits, read_image
from defectlab.data.loading import LoadedImages
from defectlab.data.transforms import resize_map, score_tiled
from defectlab.errors import ConfigError, DataError
from defectlab.evaluate.metrics import (
    area_matched_threshold,
    best_dice_threshold,
    best_threshold,
    calibrate_threshold,
    evaluation_size,
)
from defectlab.runs import predict_arrays

#: tiles per model call when whole images are scored as stitched tiles
TILE_BATCH = 32


def predict_loaded(
    model: Model,
    loaded: LoadedImages,
    data: DataConfig,
    *,
    progress: bool = False,
    native_maps: bool = False,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray] | None]:
    """Scores (N,) and model-grid maps (N, S, S) of loaded images as their run scores them:
    whole images at ``data.image_size``, or with ``data.tile="on"`` each image read again at
    native resolution and scored as stitched tiles
    (:func:`~defectlab.data.transforms.score_tiled`, one image at a time), its map resampled
    to the model grid. With ``native_maps`` also each stitched map at the evaluation grid
    (:func:`~defectlab.evaluate.metrics.evaluation_size`), for pixel metrics; otherwise None."""
    if data.tile != "on":
        scores, maps = predict_arrays(model, loaded.images, progress=progress)
        return scores, maps, None
    size = int(data.image_size)
    scores, maps, natives = [], [], []

    def tiles(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return predict_arrays(model, batch, TILE_BATCH)

    with image_limits(max_pixels=data.max_pixels, min_side=data.min_side):
        for sample in tqdm(
            loaded.samples,
            desc="predicting tiles",
            disable=not progress,
            leave=False,
            file=sys.stderr,
        ):
            image = read_image(sample.path, int(data.channels))
            score, heat = score_tiled(tiles, image, size, TILE_BATCH)
            scores.append(score)
            maps.append(resize_map(heat, (size, size)))
            if native_maps:
                natives.append(resize_map(heat, evaluation_size(heat.shape)))
    return (
        np.array(scores, np.float32),
        np.stack(maps),
        natives if native_maps else None,
    )


def calibration_method(model: Model, config: CalibrationConfig) -> str:
    """The calibration a run gets: ``config.method`` resolved for ``model``. ``"auto"`` is
    ``"model"`` for models that fix their own thresholds (``decision_thresholds``), else
    ``"area"`` for models taught by area ratios, else ``"quantile"``; ``"quantile"`` defers
    to a model's own thresholds too. Asking for ``"area"`` or ``"model"`` from a model that
    cannot give them is a config error, raised before any data is loaded."""
    learns_ratios = model.learns_from_area_ratios
    fixes_thresholds = model.decision_thresholds is not None
    if config.method == "area" and not learns_ratios:
        raise ConfigError(
            f"calibration.method=area needs a model taught by area ratios; {model.name} is not"
        )
    if config.method == "model" and not fixes_thresholds:
        raise ConfigError(
            f"calibration.method=model needs a model that fixes its own thresholds (cam with "
            f"peak_fraction, a voting ensemble, arearatio-gcn); {model.name} with this "
            "configuration does not"
        )
    if config.method in ("auto", "quantile") and fixes_thresholds:
        return "model"
    if config.method == "auto":
        return "area" if learns_ratios else "quantile"
    return config.method


def calibrate(
    model: Model,
    val: LoadedImages,
    config: CalibrationConfig,
    method: str,
    val_defect: LoadedImages | None = None,
    area_labels: tuple[np.ndarray, np.ndarray] | None = None,
    data: DataConfig | None = None,
) -> dict[str, Any]:
    """Thresholds from the normal validation images (quantiles); with ``method="f1"`` the
    F1-optimal image threshold and Dice-optimal pixel threshold over normal + defect
    validation images; with ``method="area"`` the pixel threshold that matches the total
    area of ``area_labels`` (training images, their area ratios); with ``method="model"`` the
    model's own ``decision_thresholds``. The normal-score
    statistics always come from normal images only. ``method`` is the resolved
    :func:`calibration_method`. With ``data`` (a run's data settings) images are scored
    as the run scores them (:func:`predict_loaded`: stitched tiles when it tiles)."""

    def predict(loaded: LoadedImages) -> tuple[np.ndarray, np.ndarray]:
        if data is None:
            return predict_arrays(model, loaded.images)
        return predict_loaded(model, loaded, data)[:2]

    scores, maps = predict(val)
    calibration: dict[str, Any] = {
        "method": method,
        "image_threshold": calibrate_threshold(scores, config.image_quantile),
        "pixel_threshold": calibrate_threshold(maps.ravel(), config.pixel_quantile),
        "image_quantile": config.image_quantile,
        "pixel_quantile": config.pixel_quantile,
        "normal_score_mean": float(scores.mean()),
        "normal_score_std": float(scores.std()),
        "map_median": float(np.median(maps)),
        "n_val": len(scores),
    }
    if method == "area":
        if area_labels is None:
            raise DataError("calibration.method=area: the training images carry no area ratios")
        images, ratios = area_labels
        _, train_maps = predict_arrays(model, images)
        return calibration | {
            "pixel_threshold": area_matched_threshold(train_maps, ratios),
            "n_area_labelled": len(ratios),
            "mean_area_ratio": float(np.mean(ratios)),
        }
    if method == "model":
        image_threshold, pixel_threshold = model.decision_thresholds
        calibration["pixel_threshold"] = pixel_threshold
        if image_threshold is not None:  # None: the model leaves it to the normal quantile
            calibration["image_threshold"] = image_threshold
        return calibration
    if method == "quantile":
        return calibration
    if val_defect is None or not len(val_defect.samples):
        raise DataError("calibration.method=f1: the split holds no validation defect images")
    defect_scores, defect_maps = predict(val_defect)
    labels = np.r_[np.zeros(len(scores), int), np.ones(len(defect_scores), int)]
    f1, threshold = best_threshold(labels, np.r_[scores, defect_scores])
    calibration |= {
        "image_threshold": threshold,
        "val_f1": f1,
        "n_val_defect": len(labels) - len(scores),
    }
    with_mask = np.array([s.mask_path is not None for s in val_defect.samples])
    if with_mask.any():
        masks = np.concatenate([np.zeros(maps.shape, bool), val_defect.masks[with_mask]])
        dice, pixel_threshold = best_dice_threshold(
            masks, np.concatenate([maps, defect_maps[with_mask]])
        )
        calibration |= {"pixel_threshold": pixel_threshold, "val_dice": dice}
    return calibration
