"""Does a detector's image score rank defects, or image statistics that vary among normal images?

For each finished detection run (its ``eval/scores.csv`` and ``split.json``), this loads the
test images as the model saw them (the run's size and channels) and measures five nuisance
statistics per image: mean brightness, contrast (standard deviation), vertical-streak energy
(mean absolute difference between neighbouring columns: magnetic tile's streaks run top to
bottom), row texture (the same between rows) and fine detail (mean absolute difference to a
5×5 box blur), plus the original aspect ratio and size, since every image is squashed to a
square. It prints:

* the image AUROC of the score, overall and per defect type;
* for each statistic: its image AUROC alone, and its Spearman correlation with the score among
  the normal test images and among the defect images;
* how much of the score's spread among normal images the five image statistics explain (R² of
  a linear fit, 5-fold cross-validated over the normal test images), and the image AUROC of
  the part of the score they do not explain. The fit is made on normal test images only, out
  of fold; this peeks at the test normals, so it is a diagnosis, not a detector. Aspect ratio
  and size stay out of that fit: on magnetic tile they differ between the normal and the
  defect folders (a dataset bias, not image content), and a fit on them would reward it.
* for a run whose model fitted its own normaliser (``score_normalization=image_statistics``,
  on training images), the image AUROC of the same network's score without it.

A score that the nuisance statistics explain well among normal images, and whose unexplained
part separates defects better than the score itself, is swamped by normal variation rather
than blind to defects.

    .venv/bin/python benchmarks/score_confounds.py runs/bench/ae-magnetic-tile-128-s0 \\
        runs/bench/patchmemory-magnetic-tile-128-s0
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import (
    add_write_docs,
    content_statistics,
    docs_key,
    fmt_number,
    markdown_table,
    write_section,
)

SHAPE_STATISTICS = ("aspect ratio (w/h)", "original size")


def nuisance_statistics(images: np.ndarray, original_sizes: list[tuple[int, int]]) -> np.ndarray:
    """(N, 7): :func:`content_statistics`, then the original aspect ratio and size."""
    heights, widths = np.array(original_sizes, dtype=np.float64).T
    shape = np.stack([widths / heights, np.sqrt(widths * heights)], axis=1)
    return np.hstack([content_statistics(images).numpy(), shape])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation (ties broken by order; the statistics here are continuous)."""
    rank_a = np.argsort(np.argsort(a)).astype(np.float64)
    rank_b = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(rank_a, rank_b)[0, 1])


def unexplained_scores(
    scores: np.ndarray, features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0
) -> tuple[np.ndarray, float]:
    """Score minus its linear prediction from the statistics, fitted on normal images out of
    fold (each defect image uses the mean of the fold models), and the cross-validated R² of
    that prediction among the normal images. The fit is the detectors' own
    :class:`~defectlab.detect.nuisance.ScoreNormalizer`, unregularised (least squares)."""
    from defectlab.detect.nuisance import ScoreNormalizer

    score_tensor, feature_tensor = torch.from_numpy(scores), torch.from_numpy(features)
    normal = np.flatnonzero(labels == 0)
    order = np.random.default_rng(seed).permutation(normal)
    residual = np.empty_like(scores, dtype=np.float64)
    defect = labels == 1
    defect_residual = np.zeros(int(defect.sum()))
    for fold in np.array_split(order, folds):
        fit_on = np.setdiff1d(normal, fold)
        normalizer = ScoreNormalizer(ridge=0.0).fit(score_tensor[fit_on], feature_tensor[fit_on])
        # the normaliser keeps the fitted mean score; the residual is taken around zero
        fitted_mean = scores[fit_on].mean()
        residual[fold] = normalizer(score_tensor[fold], feature_tensor[fold]).numpy() - fitted_mean
        defect_residual += (
            normalizer(score_tensor[defect], feature_tensor[defect]).numpy() - fitted_mean
        ) / folds
    residual[defect] = defect_residual
    normal_scores = scores[normal]
    r2 = 1.0 - float(
        np.sum(residual[normal] ** 2) / np.sum((normal_scores - normal_scores.mean()) ** 2)
    )
    return residual, r2


def read_scores(run: Path) -> dict[str, tuple[float, str]]:
    path = run / "eval" / "scores.csv"
    if not path.exists():
        raise SystemExit(f"{run}: no eval/scores.csv (is this a finished detection run?)")
    with path.open(newline="") as handle:
        return {
            row["path"]: (float(row["score"]), row["defect_type"]) for row in csv.DictReader(handle)
        }


def report(run: Path) -> dict[str, Any]:
    """Print the diagnosis of one run; its summary row for ``--write-docs``."""
    from defectlab.data.loading import load_samples
    from defectlab.data.splits import Split
    from defectlab.detect.nuisance import STATISTICS
    from defectlab.evaluate.metrics import auroc

    scored = read_scores(run)  # first: a folder that is not a finished run says so
    config = json.loads((run / "config.json").read_text())
    data = config["data"]
    split = Split.load(run / "split.json")
    test = load_samples(
        split["test"],
        data["image_size"],
        data["channels"],
        data["mask_threshold"],
        desc="loading test images",
    )
    kept = [i for i, s in enumerate(test.samples) if str(s.path) in scored]
    if len(kept) < len(test.samples):
        print(f"{run}: {len(test.samples) - len(kept)} test images have no score; left out")
    scores = np.array([scored[str(test.samples[i].path)][0] for i in kept])
    types = np.array([scored[str(test.samples[i].path)][1] for i in kept])
    labels = test.labels[kept]
    features = nuisance_statistics(test.images[kept], [test.original_sizes[i] for i in kept])
    normal, defect = labels == 0, labels == 1
    print(
        f"\n{run} ({config['model']}): {int(normal.sum())} normal + {int(defect.sum())} defect "
        f"test images; image AUROC of the score {auroc(labels, scores):.3f}"
    )
    by_type = ", ".join(
        f"{kind} {auroc(labels[normal | (types == kind)], scores[normal | (types == kind)]):.3f}"
        f" ({int((types == kind).sum())})"
        for kind in sorted(set(types[defect]))
    )
    print(f"  per defect type: {by_type}")
    print(f"  {'statistic':<24} {'AUROC alone':>11} {'ρ normal':>9} {'ρ defect':>9}")
    for j, name in enumerate(STATISTICS + SHAPE_STATISTICS):
        print(
            f"  {name:<24} {auroc(labels, features[:, j]):>11.3f} "
            f"{spearman(scores[normal], features[normal, j]):>9.2f} "
            f"{spearman(scores[defect], features[defect, j]):>9.2f}"
        )
    residual, r2 = unexplained_scores(scores, features[:, : len(STATISTICS)], labels)
    print(
        f"  image statistics explain R² = {r2:.2f} of the score's spread among normal images "
        f"(5-fold); AUROC of the unexplained part {auroc(labels, residual):.3f}"
    )
    row = {
        "run": run.name,
        "model": config["model"],
        "image_auroc": auroc(labels, scores),
        "r2": r2,
        "unexplained_auroc": auroc(labels, residual),
        "raw_auroc": None,
    }
    raw = raw_scores(run, test.images[kept])
    if raw is not None:
        row["raw_auroc"] = auroc(labels, raw)
        print(
            f"  the model's own score normaliser is fitted; without it the image AUROC is "
            f"{auroc(labels, raw):.3f}"
        )
    return row


def raw_scores(run: Path, images: np.ndarray) -> np.ndarray | None:
    """The run's scores with its fitted :class:`~defectlab.detect.nuisance.ScoreNormalizer`
    switched off (same network), or ``None`` when the model has none fitted."""
    from defectlab import api
    from defectlab.detect.nuisance import ScoreNormalizer

    if not (run / "model.pt").exists():
        return None
    model = api.load_run(run, "cpu").model
    normalizer = getattr(model, "score_normalizer", None)
    if normalizer is None or not normalizer.fitted:
        return None
    model.score_normalizer = ScoreNormalizer()
    return api.predict_arrays(model, images)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished detection run directories")
    add_write_docs(parser, "diagnostics")
    args = parser.parse_args()
    rows = [report(run) for run in args.runs]
    if args.write_docs:
        columns = [
            ("run", "run", lambda v: f"`{v}`"),
            ("image_auroc", "image AUROC", fmt_number(3)),
            ("r2", "R² of the statistics among normal images", fmt_number(2)),
            ("unexplained_auroc", "AUROC of the unexplained part", fmt_number(3)),
            ("raw_auroc", "image AUROC without the run's score normaliser", fmt_number(3)),
        ]
        folders = sorted({run.resolve().parent.name for run in args.runs})
        path = write_section(
            args.write_docs,
            docs_key("score-confounds", *folders),
            f"What the image score measures: {', '.join(folders)}",
            markdown_table(rows, columns),
            notes=(
                "R²: share of the score's spread among normal test images explained by "
                "brightness, contrast, streak energy, row texture and fine detail (linear, "
                "5-fold, fitted on the test normals: a diagnosis, not a detector)."
            ),
        )
        print(f"results → {path}")


if __name__ == "__main__":
    main()
