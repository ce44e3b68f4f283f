"""Metrics against scikit-learn, hand-computed cases and brute-force references."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as skm

from defectlab.evaluate.metrics import (
    area_matched_threshold,
    aupro,
    auroc,
    average_precision,
    best_dice_threshold,
    best_threshold,
    calibrate_threshold,
    compute_metrics,
    dice_iou,
    f1_score,
    pixel_auroc,
    pr_curve,
    roc_curve,
)

KEYS = {
    "image_auroc",
    "image_ap",
    "pixel_auroc",
    "aupro",
    "dice",
    "iou",
    "f1",
    "threshold",
    "pixel_threshold",
    "f1_best",
    "threshold_best_f1",
    "dice_best",
    "pixel_threshold_best_dice",
    "n_normal",
    "n_defect",
}
PIXEL_KEYS = {"pixel_auroc", "aupro", "dice", "iou", "dice_best", "pixel_threshold_best_dice"}


def tied_data(seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores rounded to one decimal, so most scores are tied with others."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)
    return labels, scores


# --- image-level curves vs scikit-learn ---------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_auroc_and_ap_match_sklearn_with_ties(seed: int) -> None:
    labels, scores = tied_data(seed)
    assert len(np.unique(scores)) < len(scores) // 2  # the data really is full of ties
    assert auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-9)
    assert average_precision(labels, scores) == pytest.approx(
        skm.average_precision_score(labels, scores), abs=1e-9
    )


@pytest.mark.parametrize("seed", range(3))
def test_auroc_and_ap_match_sklearn_without_ties(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    labels = rng.integers(0, 2, 57)
    scores = rng.normal(labels * 0.3, 1.0)
    assert auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-9)
    assert average_precision(labels, scores) == pytest.approx(
        skm.average_precision_score(labels, scores), abs=1e-9
    )


@pytest.mark.parametrize("seed", range(3))
def test_curves_match_sklearn(seed: int) -> None:
    labels, scores = tied_data(seed, 80)
    fpr, tpr, thr = roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_array_equal(thr, sk_thr)
    assert (fpr[0], tpr[0], thr[0]) == (0.0, 0.0, np.inf)
    assert len(thr) == len(np.unique(scores)) + 1  # one threshold per group of ties

    precision, recall, pr_thr = pr_curve(labels, scores)
    sk_p, sk_r, sk_t = skm.precision_recall_curve(labels, scores)
    np.testing.assert_allclose(precision, sk_p)
    np.testing.assert_allclose(recall, sk_r)
    np.testing.assert_array_equal(pr_thr, sk_t)


def test_auroc_hand_case_with_tie() -> None:
    # Pairs (pos, neg): (0.8, 0.1) win, (0.8, 0.5) win, (0.5, 0.1) win, (0.5, 0.5) tie = 3.5 / 4.
    assert auroc([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.1]) == 0.875
    assert auroc([0, 0, 1, 1], [0.8, 0.5, 0.5, 0.1]) == 0.125


def test_single_class_gives_none() -> None:
    assert auroc([1, 1, 1], [0.1, 0.2, 0.3]) is None
    assert auroc([0, 0], [0.1, 0.2]) is None
    assert average_precision([0, 0], [0.1, 0.2]) is None
    assert average_precision([1, 1], [0.1, 0.2]) == 1.0
    with pytest.raises(ValueError, match="both"):
        roc_curve([1, 1], [0.1, 0.2])


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match=r"0 \(normal\) and 1"):
        auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN or inf"):
        auroc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="differ in length"):
        auroc([0, 1, 1], [0.1, 0.2])


# --- pixel AUROC ---------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_matches_sklearn_on_flat_pixels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = rng.random((3, 20, 24)) < 0.1
    maps = np.round(rng.normal(masks * 0.8, 1.0), 1).astype(np.float32)
    expected = skm.roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-9)


def test_pixel_auroc_none_without_defect_pixels() -> None:
    assert pixel_auroc(np.zeros((2, 4, 4), bool), np.ones((2, 4, 4))) is None


def test_pixel_auroc_refuses_shape_mismatch() -> None:
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        pixel_auroc(np.zeros((2, 4, 4), bool), np.ones((2, 4, 5)))


# --- AUPRO -----------------------------------------------------------------------------------


def aupro_reference(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """Brute force: every unique threshold, per-region loops, segment-by-segment clipped area.
    Regions come from scipy's labelling (not cv2) with a full 3x3 structure (8-connectivity)."""
    negatives = ~masks
    points = [(0.0, 0.0)]
    for t in np.unique(maps)[::-1]:
        fpr = np.sum(negatives & (maps >= t)) / np.sum(negatives)
        overlaps = []
        for i, mask in enumerate(masks):
            labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
            for r in range(1, count + 1):
                region = labelled == r
                overlaps.append(np.sum(region & (maps[i] >= t)) / np.sum(region))
        points.append((fpr, float(np.mean(overlaps))))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= fpr_limit or x1 == x0:
            continue
        end = min(x1, fpr_limit)
        y_end = y0 + (y1 - y0) * (end - x0) / (x1 - x0)
        area += (end - x0) * (y0 + y_end) / 2
    return area / fpr_limit


def test_aupro_perfect_map_is_one() -> None:
    masks = np.zeros((2, 10, 10), bool)
    masks[0, 2:4, 2:4] = True
    masks[1, 5:9, 1:3] = True
    maps = masks.astype(np.float32)
    assert aupro(masks, maps) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(1.0, abs=1e-12)


def test_aupro_two_regions_weighted_equally_not_by_size() -> None:
    # Region A (4 px) scores 1.0, normal pixels 0.5, region B (9 px) 0.0. Curve:
    # (0, 0) -> t=1.0: (fpr 0, PRO mean(1, 0) = 0.5) -> t=0.5: (1, 0.5) -> t=0.0: (1, 1).
    # Area up to fpr 0.3 is 0.3 * 0.5, divided by 0.3 gives exactly 0.5. Weighting pixels
    # instead of regions would give 4 / 13.
    masks = np.zeros((1, 8, 8), bool)
    masks[0, 0:2, 0:2] = True
    masks[0, 4:7, 4:7] = True
    maps = np.full((1, 8, 8), 0.5)
    maps[0, 0:2, 0:2] = 1.0
    maps[0, 4:7, 4:7] = 0.0
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)
    # Swapping which region is found first changes nothing: regions count equally.
    assert aupro(masks, 1.0 - maps) == pytest.approx(0.5, abs=1e-12)


def test_aupro_constant_map() -> None:
    # All pixels tie: one segment (0, 0) -> (1, 1); area to 0.3 is 0.3^2 / 2, normalised 0.15.
    masks = np.zeros((2, 6, 6), bool)
    masks[0, 1:3, 1:4] = True
    maps = np.full((2, 6, 6), 3.0)
    assert aupro(masks, maps) == pytest.approx(0.15, abs=1e-12)
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx(0.5, abs=1e-12)


def test_aupro_interpolates_inside_a_tied_group() -> None:
    # 10 normal pixels (one at 0.9, nine at 0.5), one 4-px region all at 0.5. Curve:
    # (0, 0) -> (0.1, 0) -> (1, 1). At fpr 0.3 PRO = 0.2 / 0.9 = 2/9; area 0.2 * (2/9) / 2 = 1/45;
    # normalised by 0.3: 2/27.
    masks = np.zeros((1, 1, 14), bool)
    masks[0, 0, 10:] = True
    maps = np.full((1, 1, 14), 0.5)
    maps[0, 0, 0] = 0.9
    assert aupro(masks, maps) == pytest.approx(2 / 27, abs=1e-12)


def test_aupro_uses_8_connectivity() -> None:
    # (0,0) touches (1,1) diagonally, (1,2) is beside (1,1): one region of 3 pixels with
    # 8-connectivity, two regions ({(0,0)}, 2 px) with 4-connectivity. Only (0,0) scores high,
    # so PRO before any false positive is 1/3 (8-conn) rather than 1/2 (4-conn).
    masks = np.zeros((1, 5, 5), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 1, 2] = True
    maps = np.full((1, 5, 5), 0.5)
    maps[0, 0, 0] = 1.0
    maps[0, 1, 1] = maps[0, 1, 2] = 0.0
    assert aupro(masks, maps) == pytest.approx(1 / 3, abs=1e-12)


def test_aupro_regions_do_not_span_images() -> None:
    # The same 2-px region in two images: two regions. Image 0's is found at once, image 1's
    # only after every normal pixel, so PRO is 0.5 throughout the integrated range.
    masks = np.zeros((2, 4, 4), bool)
    masks[:, 0, 0:2] = True
    maps = np.full((2, 4, 4), 0.5)
    maps[0, 0, 0:2] = 1.0
    maps[1, 0, 0:2] = 0.0
    assert aupro(masks, maps) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_brute_force(seed: int, fpr_limit: float) -> None:
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.normal(size=(3, 14, 14)), sigma=(0, 1.5, 1.5))
    masks = noise > np.quantile(noise, 0.85)
    masks[2] = False  # an image without defect
    maps = np.round(rng.normal(masks * 1.0, 0.8), 1)  # coarse values: many ties
    assert ndimage.label(masks[0], structure=np.ones((3, 3)))[1] >= 1
    expected = aupro_reference(masks, maps, fpr_limit)
    assert aupro(masks, maps, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_aupro_none_and_errors() -> None:
    assert aupro(np.zeros((1, 4, 4), bool), np.ones((1, 4, 4))) is None  # no regions
    assert aupro(np.ones((1, 4, 4), bool), np.ones((1, 4, 4))) is None  # no normal pixels
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(np.ones((1, 4, 4), bool), np.ones((1, 4, 4)), fpr_limit=0.0)
    with pytest.raises(ValueError, match="maps contain NaN"):
        aupro(np.ones((1, 2, 2), bool), np.array([[[0.0, np.inf], [0.0, 0.0]]]))


# --- Dice, IoU, F1, thresholds ------------------------------------------------------------


def test_dice_iou_hand_cases() -> None:
    empty = np.zeros((2, 4, 4), bool)
    assert dice_iou(empty, empty) == (1.0, 1.0)

    mask = np.zeros((1, 4, 4), bool)
    mask[0, 0, 0:4] = True
    inside = np.zeros_like(mask)
    inside[0, 0, 0:2] = True
    # tp 2, |mask| 4, |pred| 2: Dice 4/6, IoU 2/4.
    assert dice_iou(mask, inside) == pytest.approx((2 / 3, 0.5))
    assert dice_iou(mask, ~mask) == (0.0, 0.0)
    assert dice_iou(mask, empty[:1]) == (0.0, 0.0)

    # Micro over images: image 0 perfect (1 px), image 1 missed (3 px). tp 1, |mask| 4,
    # |pred| 1 -> Dice 2/5, IoU 1/4 (the mean of per-image Dice would be 0.5).
    masks = np.zeros((2, 3, 3), bool)
    masks[0, 0, 0] = True
    masks[1, 2, :] = True
    predicted = np.zeros_like(masks)
    predicted[0, 0, 0] = True
    assert dice_iou(masks, predicted) == pytest.approx((0.4, 0.25))


def test_f1_score_matches_sklearn() -> None:
    assert f1_score([1, 1, 0, 0], [1, 0, 1, 0]) == 0.5
    rng = np.random.default_rng(3)
    labels, predicted = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    assert f1_score(labels, predicted) == pytest.approx(skm.f1_score(labels, predicted))
    assert f1_score([0, 0], [0, 0]) == 0.0


def test_best_threshold_hand_case() -> None:
    # F1 = 2tp / (tp + fp + 3) at each threshold: 0.9 -> 2/4, 0.6 -> 4/5, 0.5 -> 4/6,
    # 0.4 -> 6/7 (best), 0.1 -> 6/8.
    labels = [1, 1, 0, 1, 0]
    scores = [0.9, 0.6, 0.5, 0.4, 0.1]
    value, threshold = best_threshold(labels, scores)
    assert (value, threshold) == (pytest.approx(6 / 7), 0.4)
    assert f1_score(labels, np.array(scores) >= threshold) == pytest.approx(value)


@pytest.mark.parametrize("seed", range(3))
def test_best_threshold_matches_brute_force(seed: int) -> None:
    labels, scores = tied_data(seed, 60)
    value, threshold = best_threshold(labels, scores)
    brute = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    assert value == pytest.approx(brute, abs=1e-12)
    assert f1_score(labels, scores >= threshold) == pytest.approx(value, abs=1e-12)


def test_best_threshold_errors() -> None:
    with pytest.raises(ValueError, match="only 'f1'"):
        best_threshold([0, 1], [0.1, 0.2], metric="iou")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="defect"):
        best_threshold([0, 0], [0.1, 0.2])


def test_best_dice_threshold_finds_separating_threshold() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((2, 16, 16), bool)
    masks[0, 3:9, 4:10] = True
    maps = masks * 0.9 + rng.uniform(0, 0.05, masks.shape)
    dice, threshold = best_dice_threshold(masks, maps)
    assert dice == 1.0
    assert dice_iou(masks, maps >= threshold)[0] == 1.0


@pytest.mark.parametrize("n_thresholds", [5, 64])
def test_best_dice_threshold_is_best_of_quantile_candidates(n_thresholds: int) -> None:
    rng = np.random.default_rng(1)
    masks = rng.random((2, 12, 12)) < 0.2
    maps = np.round(rng.normal(masks * 0.7, 0.6), 1)
    dice, threshold = best_dice_threshold(masks, maps, n_thresholds)
    candidates = np.quantile(maps, np.linspace(0, 1, n_thresholds), method="lower")
    brute = [dice_iou(masks, maps >= t)[0] for t in candidates]
    assert dice == pytest.approx(max(brute), abs=1e-12)
    assert threshold in candidates
    assert dice_iou(masks, maps >= threshold)[0] == pytest.approx(dice, abs=1e-12)


def test_calibrate_threshold() -> None:
    scores = np.arange(11.0)
    assert calibrate_threshold(scores, 0.95) == pytest.approx(9.5)
    assert calibrate_threshold(scores, 1.0) == 10.0
    assert calibrate_threshold(scores.reshape(1, 11), 0.5) == 5.0
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"quantile must be in \(0, 1\]"):
            calibrate_threshold(scores, bad)
    with pytest.raises(ValueError, match="no normal scores"):
        calibrate_threshold(np.array([]), 0.9)
    with pytest.raises(ValueError, match="NaN or inf"):
        calibrate_threshold([0.0, np.nan], 0.9)


# --- compute_metrics -------------------------------------------------------------------------


def make_run(seed: int = 0) -> dict[str, np.ndarray]:
    """Six images: three normal, three defect with a rectangle, maps that mostly find them."""
    rng = np.random.default_rng(seed)
    labels = np.array([0, 0, 0, 1, 1, 1])
    masks = np.zeros((6, 10, 10), bool)
    masks[3, 1:4, 1:4] = masks[4, 5:9, 5:9] = masks[5, 2:5, 6:8] = True
    maps = (masks * 0.6 + rng.uniform(0, 0.8, masks.shape)).astype(np.float32)
    scores = maps.reshape(6, -1).max(axis=1).astype(np.float64)
    return {"labels": labels, "scores": scores, "masks": masks, "maps": maps}


def test_compute_metrics_full() -> None:
    run = make_run()
    out = compute_metrics(
        run["labels"],
        run["scores"],
        image_threshold=0.55,
        masks=run["masks"],
        maps=run["maps"],
        pixel_threshold=0.5,
    )
    assert set(out) == KEYS
    json.dumps(out, allow_nan=False)
    assert all(v is None or type(v) in (float, int) for v in out.values())
    assert (out["n_normal"], out["n_defect"]) == (3, 3)
    assert type(out["n_normal"]) is int
    assert out["image_auroc"] == pytest.approx(skm.roc_auc_score(run["labels"], run["scores"]))
    assert out["image_ap"] == pytest.approx(
        skm.average_precision_score(run["labels"], run["scores"])
    )
    assert out["pixel_auroc"] == pytest.approx(
        skm.roc_auc_score(run["masks"].ravel(), run["maps"].ravel())
    )
    assert out["aupro"] == pytest.approx(aupro(run["masks"], run["maps"]))
    dice, iou = dice_iou(run["masks"], run["maps"] >= 0.5)
    assert (out["dice"], out["iou"]) == (pytest.approx(dice), pytest.approx(iou))
    assert out["f1"] == pytest.approx(f1_score(run["labels"], run["scores"] >= 0.55))
    assert (out["threshold"], out["pixel_threshold"]) == (0.55, 0.5)
    assert out["f1_best"] >= out["f1"]
    assert (out["dice_best"], out["pixel_threshold_best_dice"]) == pytest.approx(
        best_dice_threshold(run["masks"], run["maps"])
    )
    assert 0.5 < out["pixel_auroc"] < 1.0  # the fixture is neither trivial nor hopeless


def test_compute_metrics_without_masks_has_no_pixel_metrics() -> None:
    run = make_run()
    out = compute_metrics(run["labels"], run["scores"], image_threshold=0.5)
    assert set(out) == KEYS
    assert all(out[k] is None for k in PIXEL_KEYS)
    assert out["pixel_threshold"] is None
    assert out["image_auroc"] is not None and out["f1"] is not None
    json.dumps(out, allow_nan=False)

    out = compute_metrics(
        run["labels"], run["scores"], image_threshold=0.5, maps=run["maps"], pixel_threshold=0.4
    )
    assert all(out[k] is None for k in PIXEL_KEYS)
    assert out["pixel_threshold"] == 0.4


def test_compute_metrics_no_defect_mask_gives_none() -> None:
    run = make_run()
    # Only normal images "have" masks: no ground truth for any defect -> no pixel metrics.
    out = compute_metrics(
        run["labels"],
        run["scores"],
        image_threshold=0.5,
        masks=run["masks"],
        maps=run["maps"],
        pixel_threshold=0.5,
        has_mask=np.array([True, True, True, False, False, False]),
    )
    assert all(out[k] is None for k in PIXEL_KEYS)
    assert out["image_auroc"] is not None


def test_compute_metrics_uses_only_images_with_masks() -> None:
    run = make_run()
    # Image 4 has no mask file; normal images count as masked even when has_mask says no.
    has_mask = np.array([False, True, True, True, False, True])
    out = compute_metrics(
        run["labels"],
        run["scores"],
        image_threshold=0.5,
        masks=run["masks"],
        maps=run["maps"],
        pixel_threshold=0.5,
        has_mask=has_mask,
    )
    keep = [0, 1, 2, 3, 5]
    masks, maps = run["masks"][keep], run["maps"][keep]
    assert out["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps), abs=1e-12)
    assert out["pixel_auroc"] != pytest.approx(pixel_auroc(run["masks"], run["maps"]), abs=1e-6)
    assert out["aupro"] == pytest.approx(aupro(masks, maps), abs=1e-12)
    assert (out["dice"], out["iou"]) == pytest.approx(dice_iou(masks, maps >= 0.5))
    assert out["n_defect"] == 3  # image-level counts still include every image


def test_compute_metrics_treats_normal_masks_as_empty() -> None:
    run = make_run()
    noisy = run["masks"].copy()
    noisy[0, 0:3, 0:3] = True  # a stray mask on a normal image is ignored
    kwargs = {"image_threshold": 0.5, "maps": run["maps"], "pixel_threshold": 0.5}
    clean = compute_metrics(run["labels"], run["scores"], masks=run["masks"], **kwargs)
    assert compute_metrics(run["labels"], run["scores"], masks=noisy, **kwargs) == clean


def test_compute_metrics_single_class() -> None:
    run = make_run()
    out = compute_metrics(np.zeros(6, int), run["scores"], image_threshold=0.5)
    assert out["image_auroc"] is None and out["image_ap"] is None
    assert out["f1_best"] is None and out["threshold_best_f1"] is None
    assert (out["n_normal"], out["n_defect"]) == (6, 0)


def test_compute_metrics_refuses_non_finite_values() -> None:
    run = make_run()
    scores = run["scores"].copy()
    scores[2] = np.nan
    with pytest.raises(ValueError, match="scores contain NaN or inf"):
        compute_metrics(run["labels"], scores, image_threshold=0.5)
    maps = run["maps"].copy()
    maps[3, 0, 0] = np.inf
    with pytest.raises(ValueError, match="maps contain NaN or inf"):
        compute_metrics(
            run["labels"], run["scores"], image_threshold=0.5, masks=run["masks"], maps=maps
        )
    with pytest.raises(ValueError, match="image_threshold must be finite"):
        compute_metrics(run["labels"], run["scores"], image_threshold=float("inf"))


def test_compute_metrics_refuses_mismatched_shapes() -> None:
    run = make_run()
    with pytest.raises(ValueError, match="6 images but labels 5"):
        compute_metrics(
            run["labels"][:5],
            run["scores"][:5],
            image_threshold=0.5,
            masks=run["masks"],
            maps=run["maps"],
        )


def test_area_matched_threshold_flags_the_labelled_total_area() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((4, 10, 10)).astype(np.float32)
    ratios = np.array([0.0, 0.1, 0.2, 0.3])  # mean 0.15 → 60 of 400 pixels
    threshold = area_matched_threshold(maps, ratios)
    assert np.count_nonzero(maps >= threshold) == 60
    assert np.count_nonzero(maps >= area_matched_threshold(maps, [1, 1, 1, 1])) == 400
    assert np.count_nonzero(maps >= area_matched_threshold(maps, np.zeros(4))) == 0
    with pytest.raises(ValueError, match="one map per area ratio"):
        area_matched_threshold(maps, ratios[:3])
    with pytest.raises(ValueError, match=r"in \[0, 1\], got 1.5"):
        area_matched_threshold(maps, [0.1, 0.2, 0.3, 1.5])
