"""Image- and pixel-level metrics for anomaly detection, in plain numpy.

Written here rather than taken from scikit-learn so that evaluation has no heavy runtime
dependency and so that the pixel metrics (AUROC and AUPRO over millions of pixels) are computed
exactly, with one sort and cumulative sums instead of loops over thresholds. The image-level
curves follow scikit-learn's conventions (the tests compare against it): tied scores form one
threshold, ROC curves start at (0, 0) with an infinite threshold, average precision is the
step-wise sum over recall.

Conventions: labels are 1 for defect and 0 for normal; a sample is predicted defective when its
score is ``>=`` the threshold; masks count any non-zero pixel as defect.
"""

from __future__ import annotations

from typing import Any, Literal

import cv2
import numpy as np

__all__ = [
    "EVAL_MAX_SIDE",
    "METRIC_KEYS",
    "PixelMetricAccumulator",
    "area_matched_threshold",
    "aupro",
    "auroc",
    "average_precision",
    "best_dice_threshold",
    "best_threshold",
    "calibrate_threshold",
    "compute_metrics",
    "dice_iou",
    "evaluation_mask",
    "evaluation_size",
    "f1_score",
    "pixel_auroc",
    "pr_curve",
    "roc_curve",
]

METRIC_KEYS = (
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
)


# --- input checks --------------------------------------------------------------------------


def _binary_labels(labels: Any, name: str = "labels") -> np.ndarray:
    """Labels as a 1-D bool array; anything but 0/1 is a caller bug, so it is refused."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must contain only 0 (normal) and 1 (defect)")
    return arr.astype(bool)


def _finite_scores(scores: Any, name: str = "scores") -> np.ndarray:
    """Scores as a float array (no copy when already floating); NaN or inf would silently
    corrupt the sort every metric relies on, so they are refused."""
    arr = np.asarray(scores)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contain NaN or inf; metrics need finite values")
    return arr


def _scored_labels(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    y = _binary_labels(labels)
    s = _finite_scores(scores).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in length")
    return y, s


def _pixels(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """Masks (any non-zero pixel is defect) and maps of the same (N, H, W) shape."""
    m = np.asarray(masks)
    a = _finite_scores(maps, "maps")
    if m.ndim != 3 or m.shape != a.shape:
        raise ValueError(f"masks {m.shape} and maps {a.shape} must both be (N, H, W)")
    return (m if m.dtype == bool else m != 0), a


# --- curves on image scores ----------------------------------------------------------------


def _counts_at_thresholds(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, ...]:
    """False and true positive counts at each distinct score, highest score first; a group of
    tied scores is one threshold, so only the last index of each group is kept."""
    order = np.argsort(s)[::-1]  # order within ties is irrelevant
    s_sorted = s[order]
    ends = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(y[order], dtype=np.int64)[ends]
    fps = ends + 1 - tps
    return fps, tps, s_sorted[ends]


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)`` with thresholds decreasing from ``inf``, so the
    curve starts at (0, 0); every distinct score is kept (sklearn's ``drop_intermediate=False``).
    """
    y, s = _scored_labels(labels, scores)
    if y.all() or not y.any():
        raise ValueError("roc_curve needs both normal (0) and defect (1) labels")
    fps, tps, thresholds = _counts_at_thresholds(y, s)
    fpr = np.r_[0, fps] / fps[-1]
    tpr = np.r_[0, tps] / tps[-1]
    return fpr, tpr, np.r_[np.inf, thresholds]


def _auroc_bool(y: np.ndarray, s: np.ndarray) -> float | None:
    """Mann-Whitney form of the AUROC: the probability that a positive outscores a negative,
    ties counting one half. One sort of the negatives and a binary search of the positives is
    exact and needs far less memory than building the ROC curve for millions of pixels."""
    n_pos = int(np.count_nonzero(y))
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    neg = np.sort(s[~y])
    pos = s[y]
    below = np.searchsorted(neg, pos, side="left").sum(dtype=np.int64)
    below_or_tied = np.searchsorted(neg, pos, side="right").sum(dtype=np.int64)
    return float((int(below) + int(below_or_tied)) / (2.0 * n_pos * n_neg))


def auroc(labels: Any, scores: Any) -> float | None:
    """Area under the ROC curve; ``None`` when only one class is present (it is undefined)."""
    return _auroc_bool(*_scored_labels(labels, scores))


def pr_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision-recall curve as sklearn returns it: thresholds increasing, recall decreasing,
    and a final (precision 1, recall 0) point without a threshold."""
    y, s = _scored_labels(labels, scores)
    if y.size == 0:
        raise ValueError("pr_curve needs at least one sample")
    fps, tps, thresholds = _counts_at_thresholds(y, s)
    precision = tps / (tps + fps)
    # sklearn's convention: without positives recall is 1 at every threshold.
    recall = tps / tps[-1] if tps[-1] > 0 else np.ones(tps.shape)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def average_precision(labels: Any, scores: Any) -> float | None:
    """Average precision, sum over thresholds of (R_n - R_{n-1}) * P_n (no interpolation, as
    sklearn); ``None`` when there is no defect, since recall is then undefined."""
    y, s = _scored_labels(labels, scores)
    if not y.any():
        return None
    precision, recall, _ = pr_curve(y, s)
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


# --- pixel metrics ---------------------------------------------------------------------------


def pixel_auroc(masks: Any, maps: Any) -> float | None:
    """AUROC over every pixel of every image; ``None`` when the pixels hold only one class.
    Maps keep their float dtype (pass float32 for ~10 M pixels) and are not copied to float64.
    """
    m, a = _pixels(masks, maps)
    return _auroc_bool(m.ravel(), a.ravel())


def _region_ids(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Global id (1..R) of the 8-connected ground-truth region of every pixel, 0 for normal
    pixels. Regions are found per image so that no region spans two images."""
    ids = np.zeros(masks.shape, dtype=np.int32)
    n_regions = 0
    for i in np.flatnonzero(masks.reshape(len(masks), -1).any(axis=1)):
        count, labels = cv2.connectedComponents(
            masks[i].astype(np.uint8), connectivity=8, ltype=cv2.CV_32S
        )
        ids[i] = np.where(labels > 0, labels + n_regions, 0)
        n_regions += count - 1
    return ids.ravel(), n_regions


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3) -> float | None:
    """Normalised area under the per-region-overlap curve up to ``fpr_limit`` (MVTec AD,
    Bergmann et al. 2021): unlike pixel AUROC, a small defect counts as much as a large one.

    PRO(t) is the mean over all ground-truth regions (8-connected, over all images) of the
    fraction of the region with map >= t; FPR(t) the fraction of all normal pixels with
    map >= t. The curve is exact at every distinct map value (one sort, cumulative sums), the
    trapezoid area stops at ``fpr_limit`` by linear interpolation and is divided by it, so a
    perfect map scores 1.0. ``None`` without regions or without normal pixels.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    m, a = _pixels(masks, maps)
    region, n_regions = _region_ids(m)
    n_neg = region.size - int(np.count_nonzero(m))
    if n_regions == 0 or n_neg == 0:
        return None
    # Each pixel of region r adds 1 / (R * |r|) to PRO when the threshold passes it.
    weight = np.zeros(n_regions + 1)
    weight[1:] = 1.0 / (n_regions * np.bincount(region, minlength=n_regions + 1)[1:])

    scores = a.ravel()
    if fpr_limit < 1.0:
        # Only thresholds down to the first curve point past the limit shape the area: keep
        # pixels scoring at least the r-th highest normal score, r one or two normal pixels past
        # the limit (the margin absorbs rounding in fpr_limit * n_neg). Exact, and it saves
        # sorting the ~70 % of pixels that no threshold of interest reaches.
        r = min(n_neg, int(fpr_limit * n_neg) + 2)
        negatives = scores[region == 0]
        cut = np.partition(negatives, n_neg - r)[n_neg - r]
        del negatives
        keep = np.flatnonzero(scores >= cut)
        scores, region = scores[keep], region[keep]
        del keep
    order = np.argsort(scores)[::-1]
    sorted_scores = scores[order]
    ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    del sorted_scores
    region = region[order]
    del order
    cum = weight[region]
    np.cumsum(cum, out=cum)
    pro = np.r_[0.0, cum[ends]]
    del cum
    fpr = np.r_[0.0, np.cumsum(region == 0, dtype=np.int64)[ends] / n_neg]

    # fpr is non-decreasing and ends at 1, so a point beyond the limit exists when limit < 1.
    last = int(np.searchsorted(fpr, fpr_limit, side="right"))  # points with fpr <= limit
    x, y = fpr[:last], pro[:last]
    if last < fpr.size:
        x0, x1, y0, y1 = fpr[last - 1], fpr[last], pro[last - 1], pro[last]
        y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, y = np.r_[x, fpr_limit], np.r_[y, y_limit]
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2.0)
    return area / fpr_limit


def dice_iou(masks: Any, predicted: Any) -> tuple[float, float]:
    """Micro Dice and IoU, counted over all pixels of all images together so that images with
    small defects do not dominate; both are 1.0 when mask and prediction are both empty."""
    m = np.asarray(masks) != 0
    p = np.asarray(predicted) != 0
    if m.shape != p.shape:
        raise ValueError(f"masks {m.shape} and predicted {p.shape} differ in shape")
    tp = int(np.count_nonzero(m & p))
    total = int(np.count_nonzero(m)) + int(np.count_nonzero(p))
    if total == 0:
        return 1.0, 1.0
    return 2.0 * tp / total, tp / (total - tp)


def best_dice_threshold(masks: Any, maps: Any, n_thresholds: int = 256) -> tuple[float, float]:
    """Best micro Dice over ``n_thresholds`` candidate thresholds spaced by quantile of the map
    values (so they follow the score distribution, whatever its scale). An oracle: it peeks at
    the test masks, reported only as an upper bound for the calibrated threshold.

    With the scores sorted once, the predicted and true-positive counts at all candidates are
    two binary searches of the candidates, not one pass over the pixels per candidate.
    """
    if n_thresholds < 1:
        raise ValueError(f"n_thresholds must be >= 1, got {n_thresholds}")
    m, a = _pixels(masks, maps)
    if a.size == 0:
        raise ValueError("best_dice_threshold needs at least one pixel")
    mask = m.ravel()
    ranked = np.sort(a, axis=None)
    ranked_pos = np.sort(a.ravel()[mask])
    # Quantiles with method="lower", read off the sorted scores: candidates are map values.
    positions = np.floor(np.linspace(0.0, 1.0, n_thresholds) * (ranked.size - 1)).astype(np.int64)
    candidates = np.unique(ranked[positions])
    predicted = ranked.size - np.searchsorted(ranked, candidates, side="left")  # map >= t
    tp = ranked_pos.size - np.searchsorted(ranked_pos, candidates, side="left")
    dice = 2.0 * tp / (predicted + ranked_pos.size)  # predicted >= 1: t <= max(map)
    best = int(np.argmax(dice))
    return float(dice[best]), float(candidates[best])


# --- image-level decisions -------------------------------------------------------------------


def f1_score(labels: Any, predicted: Any) -> float:
    """F1 of image-level decisions; 0.0 when there is nothing to count (sklearn's default)."""
    y = _binary_labels(labels)
    p = _binary_labels(predicted, "predicted")
    if y.shape != p.shape:
        raise ValueError(f"labels {y.shape} and predicted {p.shape} differ in length")
    tp = int(np.count_nonzero(y & p))
    denom = int(np.count_nonzero(y)) + int(np.count_nonzero(p))
    return 2.0 * tp / denom if denom else 0.0


def best_threshold(labels: Any, scores: Any, metric: Literal["f1"] = "f1") -> tuple[float, float]:
    """The threshold (predicted = score >= threshold) that maximises F1 on these labels, and
    that F1. An oracle on the test set: it shows what the calibrated threshold leaves on the
    table. Every distinct score is a candidate; the highest one wins a tie."""
    if metric != "f1":
        raise ValueError(f"unknown metric {metric!r}; only 'f1' is supported")
    y, s = _scored_labels(labels, scores)
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0:
        raise ValueError("best_threshold needs at least one defect (1) label")
    fps, tps, thresholds = _counts_at_thresholds(y, s)
    f1 = 2.0 * tps / (tps + fps + n_pos)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def calibrate_threshold(normal_scores: Any, quantile: float) -> float:
    """Threshold at the given quantile (linear interpolation) of scores of normal validation
    images or pixels: with quantile q, about 1 - q of normal samples are flagged."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    scores = _finite_scores(normal_scores, "normal scores").ravel()
    if scores.size == 0:
        raise ValueError("cannot calibrate a threshold on no normal scores")
    return float(np.quantile(scores, quantile))


def area_matched_threshold(maps: Any, area_ratios: Any) -> float:
    """The pixel threshold (mask = map >= threshold) at which the maps flag as many pixels
    as their labelled area ratios say in total: round(mean ratio × pixel count) pixels, the
    highest-scoring ones. Calibration for models taught by area ratios alone (no masks, and
    normal images say nothing about how much of a defective image to flag). With every ratio
    0 the threshold lies just above the largest map value, so nothing is flagged."""
    values = _finite_scores(maps, "maps")
    ratios = np.asarray(area_ratios, dtype=np.float64).ravel()
    if values.ndim < 2 or len(values) != ratios.size:
        raise ValueError(
            f"maps {values.shape} must be one map per area ratio ({ratios.size} ratios)"
        )
    if ratios.size == 0:
        raise ValueError("area_matched_threshold needs at least one labelled map")
    outside = ratios[~((ratios >= 0) & (ratios <= 1))]
    if outside.size:
        raise ValueError(f"area ratios must be in [0, 1], got {outside[0]}")
    flat = values.ravel()
    wanted = round(float(ratios.mean()) * flat.size)
    if wanted == 0:
        return float(np.nextafter(flat.max(), np.inf))
    return float(np.partition(flat, flat.size - wanted)[flat.size - wanted])


# --- pixel metrics on a grid independent of the model ---------------------------------------

#: pixel metrics are computed on each mask's native grid, its long side capped at this many
#: pixels: the same pixels for every run on a dataset, whatever the model's input size
EVAL_MAX_SIDE = 512
#: quantile bins of map values in :class:`PixelMetricAccumulator` (plus as many evenly spaced)
ACCUMULATOR_BINS = 1 << 16


def evaluation_size(native: tuple[int, int], max_side: int = EVAL_MAX_SIDE) -> tuple[int, int]:
    """(height, width) on which an image with mask of ``native`` (height, width) is scored:
    the native size, scaled down (aspect kept) when its long side exceeds ``max_side``."""
    h, w = int(native[0]), int(native[1])
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    scale = max_side / max(h, w)
    if scale >= 1:
        return h, w
    return max(1, round(h * scale)), max(1, round(w * scale))


def evaluation_mask(mask: Any, max_side: int = EVAL_MAX_SIDE) -> np.ndarray:
    """A native-resolution mask on its :func:`evaluation_size` grid: unchanged when small
    enough, else area-averaged and a pixel is defect when most of it was."""
    m = np.asarray(mask) != 0
    h, w = evaluation_size(m.shape[:2], max_side)
    if (h, w) == m.shape:
        return m
    area = cv2.resize(m.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    return area > 0.5


class PixelMetricAccumulator:
    """Pixel AUROC, AUPRO and Dice over images of any sizes, added one image at a time, so
    that full-resolution maps are never held together.

    Each image adds its pixels to histograms over fixed bins of map values: normal pixels,
    defect pixels, and defect pixels weighted by 1 / (size of their 8-connected region)
    (AUPRO's per-region overlap). The bins are centred on ``centres``: every value is
    counted in the bin of its nearest centre and thresholds lie half-way between centres.
    The curves are then exact at those thresholds, and AUROC counts a defect and a normal
    pixel in the same bin as a tie; with one centre per distinct value (few values) every
    metric equals the exact one. :meth:`for_maps` puts the centres at quantiles of the maps
    the values come from (resampled maps stay within their range). Dice and IoU at
    ``pixel_threshold`` are counted exactly, pixel by pixel.
    """

    def __init__(
        self, centres: Any, pixel_threshold: float | None = None, fpr_limit: float = 0.3
    ) -> None:
        c = np.unique(_finite_scores(centres, "bin centres").ravel())
        if c.size == 0:
            raise ValueError("PixelMetricAccumulator needs at least one bin centre")
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
        self.centres = c
        self._bounds = (c[1:] + c[:-1]) / 2.0  # bin b holds values in [bounds[b-1], bounds[b])
        self.fpr_limit = fpr_limit
        self.pixel_threshold = pixel_threshold
        self.negatives = np.zeros(c.size, np.int64)
        self.positives = np.zeros(c.size, np.int64)
        self.region_weight = np.zeros(c.size)  # Σ 1/|r| over defect pixels
        self.regions = 0
        self.images = 0
        self._tp = self._predicted = 0

    @classmethod
    def for_maps(
        cls,
        maps: Any,
        pixel_threshold: float | None = None,
        n_bins: int = ACCUMULATOR_BINS,
        sample: int = 1 << 22,
    ) -> PixelMetricAccumulator:
        """Bins for maps resampled from ``maps``: ``n_bins`` quantiles of their values (read
        from an evenly strided sample of at most ``sample`` values) and ``n_bins`` evenly
        spaced values from their minimum to their maximum, so that sparse tails keep fine
        bins too."""
        values = _finite_scores(maps, "maps").ravel()
        if values.size == 0:
            raise ValueError("PixelMetricAccumulator.for_maps needs at least one map value")
        low, high = float(values.min()), float(values.max())
        sampled = np.sort(values[:: max(1, values.size // sample)])
        picks = np.linspace(0, sampled.size - 1, n_bins).round().astype(np.int64)
        centres = np.r_[sampled[picks], np.linspace(low, high, n_bins), low, high]
        return cls(centres, pixel_threshold)

    def add(self, mask: Any, heat: Any) -> None:
        """One image: its (H, W) mask (non-zero = defect) and map on the same grid."""
        m = np.asarray(mask) != 0
        a = _finite_scores(heat, "map")
        if m.ndim != 2 or m.shape != a.shape:
            raise ValueError(f"mask {m.shape} and map {a.shape} must both be (H, W)")
        bins = np.searchsorted(self._bounds, a.ravel(), side="right")
        flat = m.ravel()
        n = self.centres.size
        self.negatives += np.bincount(bins[~flat], minlength=n)
        if flat.any():
            self.positives += np.bincount(bins[flat], minlength=n)
            count, labels = cv2.connectedComponents(
                m.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S
            )
            sizes = np.bincount(labels.ravel(), minlength=count).astype(np.float64)
            region = labels.ravel()[flat]
            self.region_weight += np.bincount(bins[flat], weights=1.0 / sizes[region], minlength=n)
            self.regions += count - 1
        if self.pixel_threshold is not None:
            predicted = a >= self.pixel_threshold
            self._tp += int(np.count_nonzero(predicted & m))
            self._predicted += int(np.count_nonzero(predicted))
        self.images += 1

    def auroc(self) -> float | None:
        n_pos, n_neg = int(self.positives.sum()), int(self.negatives.sum())
        if n_pos == 0 or n_neg == 0:
            return None
        below = np.cumsum(self.negatives) - self.negatives  # normal pixels in lower bins
        pairs = self.positives @ (below + 0.5 * self.negatives)
        return float(pairs / (float(n_pos) * n_neg))

    def aupro(self) -> float | None:
        n_neg = int(self.negatives.sum())
        if self.regions == 0 or n_neg == 0:
            return None
        # thresholds from the highest bin down: curve points after each bin
        fpr = np.r_[0.0, np.cumsum(self.negatives[::-1]) / n_neg]
        pro = np.r_[0.0, np.cumsum(self.region_weight[::-1]) / self.regions]
        limit = self.fpr_limit
        last = int(np.searchsorted(fpr, limit, side="right"))
        x, y = fpr[:last], pro[:last]
        if last < fpr.size:
            x0, x1, y0, y1 = fpr[last - 1], fpr[last], pro[last - 1], pro[last]
            x, y = np.r_[x, limit], np.r_[y, y0 + (y1 - y0) * (limit - x0) / (x1 - x0)]
        return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1])) / 2.0) / limit

    def best_dice(self) -> tuple[float | None, float | None]:
        """The best micro Dice over the bin thresholds, and that threshold (an oracle)."""
        n_pos = int(self.positives.sum())
        if n_pos == 0:
            return None, None
        tp = np.cumsum(self.positives[::-1])[::-1]  # defect pixels at or above each bin
        predicted = tp + np.cumsum(self.negatives[::-1])[::-1]
        dice = 2.0 * tp / (predicted + n_pos)
        best = int(np.argmax(dice))
        threshold = self.centres[0] if best == 0 else self._bounds[best - 1]
        return float(dice[best]), float(threshold)

    def result(self) -> dict[str, float | None]:
        """``pixel_auroc``, ``aupro``, ``dice``, ``iou``, ``dice_best`` and
        ``pixel_threshold_best_dice`` over every image added."""
        n_pos = int(self.positives.sum())
        dice = iou = None
        if self.pixel_threshold is not None and self.images:
            total = n_pos + self._predicted
            dice = 2.0 * self._tp / total if total else 1.0
            iou = self._tp / (total - self._tp) if total else 1.0
        dice_best, threshold_best = self.best_dice()
        return {
            "pixel_auroc": self.auroc(),
            "aupro": self.aupro(),
            "dice": dice,
            "iou": iou,
            "dice_best": dice_best,
            "pixel_threshold_best_dice": threshold_best,
        }


# --- everything at once ----------------------------------------------------------------------


def _optional_float(value: float | None) -> float | None:
    return None if value is None else float(value)


def compute_metrics(
    labels: Any,
    scores: Any,
    *,
    image_threshold: float,
    masks: Any = None,
    maps: Any = None,
    pixel_threshold: float | None = None,
    has_mask: Any = None,
) -> dict[str, float | int | None]:
    """All metrics of a test run as a JSON-serialisable dict with the keys of ``METRIC_KEYS``.

    ``labels``: 1 defect / 0 normal per image; ``scores``: image scores; ``masks``/``maps``:
    (N, H, W) ground truth and anomaly maps; ``has_mask``: which images have a ground-truth mask.
    Normal images always count as having an all-zero mask; defect images without one are left
    out of the pixel metrics, which are ``None`` when no defect image has a mask. ``dice`` and
    ``iou`` use ``pixel_threshold`` (``None`` without it); ``f1`` uses ``image_threshold``.
    The ``threshold`` and ``pixel_threshold`` keys echo the thresholds used.
    """
    y, s = _scored_labels(labels, scores)
    for name, value in (("image_threshold", image_threshold), ("pixel_threshold", pixel_threshold)):
        if value is not None and not np.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    n_defect = int(np.count_nonzero(y))
    f1_best = threshold_best_f1 = None
    if n_defect:
        f1_best, threshold_best_f1 = best_threshold(y, s)
    result: dict[str, float | int | None] = {
        "image_auroc": _auroc_bool(y, s),
        "image_ap": average_precision(y, s),
        "pixel_auroc": None,
        "aupro": None,
        "dice": None,
        "iou": None,
        "f1": f1_score(y, s >= image_threshold),
        "threshold": float(image_threshold),
        "pixel_threshold": _optional_float(pixel_threshold),
        "f1_best": f1_best,
        "threshold_best_f1": threshold_best_f1,
        "dice_best": None,
        "pixel_threshold_best_dice": None,
        "n_normal": int(y.size - n_defect),
        "n_defect": n_defect,
    }
    if masks is None or maps is None:
        return result

    m, a = _pixels(masks, maps)
    if len(m) != y.size:
        raise ValueError(f"masks/maps hold {len(m)} images but labels {y.size}")
    with_mask = np.ones(y.shape, bool) if has_mask is None else _binary_labels(has_mask, "has_mask")
    if with_mask.shape != y.shape:
        raise ValueError(f"has_mask {with_mask.shape} and labels {y.shape} differ in length")
    used = with_mask | ~y
    if not (used & y).any():
        return result
    if not used.all():
        m, a, y_used = m[used], a[used], y[used]
    else:
        y_used = y
    m = m & y_used[:, None, None]  # a normal image's mask is all zero by definition

    result["pixel_auroc"] = pixel_auroc(m, a)
    result["aupro"] = aupro(m, a)
    if pixel_threshold is not None:
        result["dice"], result["iou"] = dice_iou(m, a >= pixel_threshold)
    result["dice_best"], result["pixel_threshold_best_dice"] = best_dice_threshold(m, a)
    return result
