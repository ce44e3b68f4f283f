"""Numbers behind the queue and the dashboard: review labels joined to scores, the
threshold the reviews imply, the confusion matrix, histograms and drift."""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from defectlab.app.db import Image, Inspection, ModelVersion, Review
from defectlab.evaluate.metrics import auroc, best_threshold

#: the drift chart splits the inspections, in time order, into at most this many equal groups
DRIFT_BUCKETS = 30


def reviewed_scores(session: Session, version_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels 1 defect / 0 normal, scores) of the version's reviewed images ('unsure'
    left out)."""
    rows = session.execute(
        select(Review.verdict, Inspection.score)
        .join(Inspection, Inspection.image_id == Review.image_id)
        .where(Inspection.model_version_id == version_id, Review.verdict != "unsure")
    ).all()
    labels = np.array([1 if v == "defect" else 0 for v, _ in rows], int)
    scores = np.array([s for _, s in rows], float)
    return labels, scores


def confusion(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Counts, precision and recall of ``score >= threshold`` against the labels."""
    predicted = scores >= threshold
    tp = int(np.sum(predicted & (labels == 1)))
    fp = int(np.sum(predicted & (labels == 0)))
    fn = int(np.sum(~predicted & (labels == 1)))
    tn = int(np.sum(~predicted & (labels == 0)))
    return {
        "threshold": float(threshold),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
    }


def implied_threshold(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any] | None:
    """The F1-optimal threshold of the reviews, with its confusion; ``None`` until there
    are reviewed defects and normals."""
    if labels.size == 0 or labels.min() == labels.max():
        return None
    _, threshold = best_threshold(labels, scores)
    return confusion(labels, scores, threshold)


def histogram(values: list[float], edges: np.ndarray) -> list[int]:
    return np.histogram(np.asarray(values, float), bins=edges)[0].astype(int).tolist()


def dashboard(session: Session, version: ModelVersion) -> dict[str, Any]:
    """Everything the dashboard shows for one model version."""
    scores_all = np.array(
        session.scalars(
            select(Inspection.score).where(Inspection.model_version_id == version.id)
        ).all(),
        float,
    )
    labels, scores = reviewed_scores(session, version.id)
    counts = {
        "inspected": int(scores_all.size),
        "flagged": int(np.sum(scores_all >= version.image_threshold)),
        "reviewed": int(
            session.scalar(
                select(func.count(Review.id))
                .join(Inspection, Inspection.image_id == Review.image_id)
                .where(Inspection.model_version_id == version.id)
            )
            or 0
        ),
        "reviewed_defect": int(np.sum(labels == 1)),
        "reviewed_normal": int(np.sum(labels == 0)),
    }
    counts["unsure"] = counts["reviewed"] - counts["reviewed_defect"] - counts["reviewed_normal"]
    if scores_all.size:
        low, high = float(scores_all.min()), float(scores_all.max())
        if high <= low:
            high = low + 1.0
        edges = np.linspace(low, high, 21)
    else:
        edges = np.linspace(0.0, 1.0, 21)
    hist = {
        "edges": edges.tolist(),
        "defect": histogram(scores[labels == 1].tolist(), edges),
        "normal": histogram(scores[labels == 0].tolist(), edges),
        "all": histogram(scores_all.tolist(), edges),
    }
    drift_rows = session.execute(
        select(Inspection.created_at, Inspection.score)
        .where(Inspection.model_version_id == version.id)
        .order_by(Inspection.created_at)
    ).all()
    size = max(10, -(-len(drift_rows) // DRIFT_BUCKETS))
    drift = []
    for start in range(0, len(drift_rows), size):
        chunk = drift_rows[start : start + size]
        values = np.array([score for _, score in chunk], float)
        drift.append(
            {
                "period": chunk[0][0].strftime("%Y-%m-%d %H:%M"),
                "n": int(values.size),
                "median": float(np.median(values)),
                "p10": float(np.quantile(values, 0.1)),
                "p90": float(np.quantile(values, 0.9)),
                "flagged": float(np.mean(values >= version.image_threshold)),
            }
        )
    return {
        "counts": counts,
        "histogram": hist,
        "current": confusion(labels, scores, version.image_threshold) if labels.size else None,
        "implied": implied_threshold(labels, scores),
        "auroc": auroc(labels, scores) if labels.size and labels.min() != labels.max() else None,
        "drift": drift,
    }


def image_count(session: Session) -> int:
    return int(session.scalar(select(func.count(Image.id))) or 0)
