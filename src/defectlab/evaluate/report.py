"""A single self-contained HTML evaluation report.

The report carries everything inline: CSS, a tiny script, SVG plots (ROC, PR, score
histogram, heat-map colour bar) and PNG images as ``data:`` URIs. It loads nothing from
anywhere, so it can be mailed, archived or opened offline, and a content security policy in
the page makes the browser enforce that.

Layout: header with run information, metrics table, ROC and PR curves, score histogram,
example overlays (image, heat map, predicted mask, ground truth), the worst false positives
and false negatives, then optional galleries (e.g. synthesis samples).
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectlab.data.io import atomic_write_text
from defectlab.evaluate.metrics import auroc, average_precision, pr_curve, roc_curve
from defectlab.evaluate.visualize import (
    colormap_rgb,
    heatmap_overlay,
    mask_outline,
    png_base64,
    to_rgb_uint8,
)

__all__ = ["ReportImage", "write_report"]

#: how many worst false positives / false negatives are shown
WORST_COUNT = 6

PREDICTED_COLOR = (230, 0, 0)
TRUE_COLOR = (0, 220, 0)
NORMAL_COLOR = "#2b7bba"
DEFECT_COLOR = "#d7301f"

LABEL_NAMES = {1: "defect", 0: "normal", -1: "unknown"}


@dataclass
class ReportImage:
    """One evaluated image as the report shows it.

    ``image`` is ``(H, W, C)`` float in ``[0, 1]`` (C 1 or 3), ``heat`` the ``(H, W)`` anomaly
    map, ``predicted_mask`` and ``true_mask`` ``(H, W)`` bool (``true_mask`` None when there is
    no ground truth), ``label`` 1 defect, 0 normal, -1 unknown.
    """

    name: str
    image: np.ndarray
    heat: np.ndarray
    predicted_mask: np.ndarray
    true_mask: np.ndarray | None
    score: float
    label: int


# --------------------------------------------------------------------------------------------
# public entry point
# --------------------------------------------------------------------------------------------


def write_report(
    path: str | os.PathLike[str],
    *,
    title: str,
    metrics: Mapping[str, Any],
    labels: np.ndarray,
    scores: np.ndarray,
    image_threshold: float,
    items: Sequence[ReportImage],
    heat_range: tuple[float, float],
    info: Mapping[str, Any] | None = None,
    galleries: Sequence[tuple[str, Sequence[np.ndarray]]] | None = None,
    max_examples: int = 12,
) -> Path:
    """Write the HTML report to ``path`` atomically and return the path.

    ``labels`` (1 defect, 0 normal, -1 unknown) and ``scores`` cover every evaluated image and
    feed the curves and the histogram; ``items`` are the images with maps that may be shown.
    Up to ``max_examples`` defect and ``max_examples // 2`` normal and unknown items are shown
    as overlays (spread evenly over the score range, highest score first), followed by the
    highest-scoring normal and lowest-scoring defect items (up to 6 each). ``heat_range`` is
    the ``(vmin, vmax)`` shared by every heat-map overlay.
    """
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in length")
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0, got {max_examples}")
    vmin, vmax = (float(v) for v in heat_range)
    if not (math.isfinite(vmin) and math.isfinite(vmax)):
        raise ValueError(f"heat_range must be finite, got {heat_range}")
    threshold = float(image_threshold)

    body = [
        _header(title, info),
        _metrics_section(metrics, labels, threshold),
        _curves_section(labels, scores),
        _histogram_section(labels, scores, threshold),
        _examples_section(items, threshold, (vmin, vmax), max_examples),
        _worst_section(items, threshold, (vmin, vmax)),
    ]
    for gallery_title, images in galleries or ():
        body.append(_gallery_section(gallery_title, images))

    document = _PAGE.format(
        title=_esc(title),
        csp=_CSP,
        css=_CSS,
        script=_SCRIPT,
        body="\n".join(body),
    )
    out = Path(path)
    atomic_write_text(out, document)
    return out


# --------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------


def _header(title: str, info: Mapping[str, Any] | None) -> str:
    parts = [f'<header><h1>{_esc(title)}</h1><p class="muted">defectlab evaluation report</p>']
    if info:
        parts.append(_kv_table(info, "info"))
    parts.append("</header>")
    return "".join(parts)


def _metrics_section(metrics: Mapping[str, Any], labels: np.ndarray, threshold: float) -> str:
    counts = _class_counts(labels)
    summary = (
        f"{counts[0]} normal, {counts[1]} defect"
        + (f", {counts[-1]} unlabelled" if counts[-1] else "")
        + f" images; image threshold {_format_value(threshold)}."
    )
    table = _kv_table(metrics, "metrics") if metrics else '<p class="note">No metrics.</p>'
    return (
        f'<section id="metrics"><h2>Metrics</h2>{table}'
        f'<p class="muted">{_esc(summary)}</p></section>'
    )


def _curves_section(labels: np.ndarray, scores: np.ndarray) -> str:
    y, s = _labelled(labels, scores)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    head = '<section id="curves"><h2>ROC and precision–recall curves</h2>'
    if n_pos == 0 or n_neg == 0:
        note = (
            "ROC and PR curves need both normal and defect images; "
            f"this evaluation has {n_neg} normal and {n_pos} defect images with finite scores."
        )
        return f'{head}<p class="note">{_esc(note)}</p></section>'

    fpr, tpr, _ = roc_curve(y, s)
    precision, recall, _ = pr_curve(y, s)
    roc_value = float(auroc(y, s))
    ap_value = float(average_precision(y, s))

    roc_points = list(zip(np.asarray(fpr, float), np.asarray(tpr, float), strict=True))
    roc_svg = _unit_plot(
        "roc-curve",
        "ROC curve",
        "false positive rate",
        "true positive rate",
        roc_points,
        reference=[(0.0, 0.0), (1.0, 1.0)],
    )
    # step plot as in scikit-learn's PrecisionRecallDisplay (recall decreasing, steps-post)
    p = np.asarray(precision, float)
    r = np.asarray(recall, float)
    pr_points = [(r[0], p[0])]
    for i in range(1, r.size):
        pr_points += [(r[i], p[i - 1]), (r[i], p[i])]
    prevalence = n_pos / (n_pos + n_neg)
    pr_svg = _unit_plot(
        "pr-curve",
        "Precision–recall curve",
        "recall",
        "precision",
        pr_points,
        reference=[(0.0, prevalence), (1.0, prevalence)],
    )
    roc_caption = f"AUROC = {roc_value:.4f} ({n_neg} normal, {n_pos} defect; dashed: chance)"
    pr_caption = f"AP = {ap_value:.4f} (dashed: defect prevalence {prevalence:.4f})"
    return (
        f'{head}<div class="plots">'
        f"<figure>{roc_svg}<figcaption>{_esc(roc_caption)}</figcaption></figure>"
        f"<figure>{pr_svg}<figcaption>{_esc(pr_caption)}</figcaption></figure>"
        "</div></section>"
    )


def _histogram_section(labels: np.ndarray, scores: np.ndarray, threshold: float) -> str:
    y, s = _labelled(labels, scores)
    head = '<section id="histogram"><h2>Image score distribution</h2>'
    if s.size == 0:
        return f'{head}<p class="note">No labelled images with finite scores.</p></section>'
    svg = _histogram_svg(s[y == 0], s[y == 1], threshold)
    caption = (
        f"Image scores of normal ({int((y == 0).sum())}) and defect ({int((y == 1).sum())}) "
        f"images; dashed line: image threshold {_format_value(threshold)}."
    )
    return (
        f'{head}<figure class="wide">{svg}<figcaption>{_esc(caption)}</figcaption></figure>'
        "</section>"
    )


def _examples_section(
    items: Sequence[ReportImage],
    threshold: float,
    heat_range: tuple[float, float],
    max_examples: int,
) -> str:
    head = '<section id="examples"><h2>Examples</h2>'
    groups = [
        ("Defect images", 1, max_examples),
        ("Normal images", 0, max_examples // 2),
        ("Unlabelled images", -1, max_examples // 2),
    ]
    parts = [head, _colorbar(heat_range)]
    shown = 0
    for heading, label, limit in groups:
        chosen = _spread(_by_score([it for it in items if _label(it) == label]), limit)
        if not chosen:
            continue
        shown += len(chosen)
        parts.append(f"<h3>{_esc(heading)}</h3>")
        parts.append(_rows(chosen, threshold, heat_range))
    if not shown:
        parts.append('<p class="note">No example images.</p>')
    parts.append("</section>")
    return "".join(parts)


def _worst_section(
    items: Sequence[ReportImage], threshold: float, heat_range: tuple[float, float]
) -> str:
    normals = _by_score([it for it in items if _label(it) == 0])[:WORST_COUNT]
    defects = _by_score([it for it in items if _label(it) == 1], descending=False)[:WORST_COUNT]
    parts = []
    for section_id, heading, chosen, explain in (
        (
            "worst-false-positives",
            "Worst false positives",
            normals,
            f"Highest-scoring normal images; those scoring at or above the threshold "
            f"({_format_value(threshold)}) are false positives.",
        ),
        (
            "worst-false-negatives",
            "Worst false negatives",
            defects,
            f"Lowest-scoring defect images; those scoring below the threshold "
            f"({_format_value(threshold)}) are false negatives.",
        ),
    ):
        parts.append(f'<section id="{section_id}"><h2>{_esc(heading)}</h2>')
        parts.append(f'<p class="muted">{_esc(explain)}</p>')
        if chosen:
            parts.append(_rows(chosen, threshold, heat_range))
        else:
            parts.append('<p class="note">No such images.</p>')
        parts.append("</section>")
    return "".join(parts)


def _gallery_section(title: str, images: Sequence[np.ndarray]) -> str:
    parts = [f'<section class="gallery-section"><h2>{_esc(title)}</h2>']
    if len(images) == 0:
        parts.append('<p class="note">No images.</p>')
    else:
        parts.append('<div class="gallery">')
        for index, image in enumerate(images):
            parts.append(_img(to_rgb_uint8(image), f"{title} {index + 1}"))
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# example rows
# --------------------------------------------------------------------------------------------


def _rows(items: Sequence[ReportImage], threshold: float, heat_range: tuple[float, float]) -> str:
    rows = "".join(_example_row(item, threshold, heat_range) for item in items)
    return f'<div class="rows">{rows}</div>'


def _example_row(item: ReportImage, threshold: float, heat_range: tuple[float, float]) -> str:
    label = _label(item)
    score = float(item.score)
    rgb = to_rgb_uint8(item.image)
    height, width = rgb.shape[:2]
    panels = [
        _panel(_img(rgb, f"{item.name}: image"), "image"),
        _panel(
            _img(heatmap_overlay(item.image, item.heat, *heat_range), f"{item.name}: heat map"),
            "heat map",
        ),
        _panel(
            _img(
                mask_outline(rgb, item.predicted_mask, color=PREDICTED_COLOR),
                f"{item.name}: predicted mask",
            ),
            "predicted mask",
        ),
    ]
    if item.true_mask is None:
        placeholder = f'<div class="nomask" style="aspect-ratio: {width} / {height}">no mask</div>'
        panels.append(_panel(placeholder, "ground truth"))
    else:
        outlined = mask_outline(rgb, item.true_mask, color=TRUE_COLOR)
        panels.append(_panel(_img(outlined, f"{item.name}: ground truth"), "ground truth"))

    predicted_defect = math.isfinite(score) and score >= threshold
    badges = [f'<span class="badge {LABEL_NAMES[label]}">{LABEL_NAMES[label]}</span>']
    if label == 0 and predicted_defect:
        badges.append('<span class="badge wrong">false positive</span>')
    elif label == 1 and not predicted_defect:
        badges.append('<span class="badge wrong">false negative</span>')
    elif label in (0, 1):
        badges.append('<span class="badge right">correct</span>')
    else:
        verdict = "predicted defect" if predicted_defect else "predicted normal"
        badges.append(f'<span class="badge">{verdict}</span>')
    return (
        f'<div class="example" data-name="{_esc(item.name)}">'
        f'<div class="meta"><span class="name">{_esc(item.name)}</span>'
        f"<span>score <b>{_esc(_format_value(score))}</b></span>{''.join(badges)}</div>"
        f'<div class="panels">{"".join(panels)}</div></div>'
    )


def _panel(content: str, caption: str) -> str:
    return f"<figure>{content}<figcaption>{_esc(caption)}</figcaption></figure>"


def _img(rgb: np.ndarray, alt: str) -> str:
    height, width = rgb.shape[:2]
    return (
        f'<img src="{png_base64(rgb)}" alt="{_esc(alt)}" width="{width}" height="{height}" '
        'loading="eager" decoding="sync">'
    )


def _colorbar(heat_range: tuple[float, float]) -> str:
    vmin, vmax = heat_range
    stops = colormap_rgb(np.linspace(0.0, 1.0, 11))[0]
    gradient = "".join(
        f'<stop offset="{i / 10:.1f}" stop-color="#{r:02x}{g:02x}{b:02x}"/>'
        for i, (r, g, b) in enumerate(stops.tolist())
    )
    return (
        '<div class="colorbar"><span class="muted">heat-map scale</span>'
        f"<span>{_esc(_format_value(vmin))}</span>"
        '<svg viewBox="0 0 200 14" width="200" height="14" aria-hidden="true">'
        f'<defs><linearGradient id="heat-gradient">{gradient}</linearGradient></defs>'
        '<rect width="200" height="14" rx="3" fill="url(#heat-gradient)"/></svg>'
        f"<span>{_esc(_format_value(vmax))}</span>"
        '<span class="muted">outlines: <b class="pred">predicted</b>, '
        '<b class="true">ground truth</b></span></div>'
    )


# --------------------------------------------------------------------------------------------
# SVG plots
# --------------------------------------------------------------------------------------------

_PLOT_W, _PLOT_H = 360, 320
_ML, _MR, _MT, _MB = 52, 14, 14, 44  # margins


def _unit_plot(
    svg_id: str,
    title: str,
    xlabel: str,
    ylabel: str,
    points: Sequence[tuple[float, float]],
    reference: Sequence[tuple[float, float]],
) -> str:
    """A line plot on the unit square with ticks every 0.2 and a dashed reference line."""
    pw, ph = _PLOT_W - _ML - _MR, _PLOT_H - _MT - _MB

    def sx(v: float) -> float:
        return _ML + min(max(v, 0.0), 1.0) * pw

    def sy(v: float) -> float:
        return _MT + (1.0 - min(max(v, 0.0), 1.0)) * ph

    parts = [_svg_open(svg_id, title)]
    ticks = [i / 5 for i in range(6)]
    for t in ticks:
        parts.append(_grid_line(sx(t), _MT, sx(t), _MT + ph))
        parts.append(_grid_line(_ML, sy(t), _ML + pw, sy(t)))
        parts.append(_text(sx(t), _MT + ph + 16, f"{t:.1f}", "middle"))
        parts.append(_text(_ML - 6, sy(t) + 4, f"{t:.1f}", "end"))
    parts.append(_axes_box(pw, ph))
    ref = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in reference)
    parts.append(
        f'<polyline class="reference" points="{ref}" fill="none" stroke="#9aa3af" '
        'stroke-width="1" stroke-dasharray="4 4"/>'
    )
    coords = _dedupe([(sx(x), sy(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)])
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    parts.append(
        f'<polyline class="curve" points="{line}" fill="none" stroke="{DEFECT_COLOR}" '
        'stroke-width="2" stroke-linejoin="round"/>'
    )
    parts.append(_axis_labels(xlabel, ylabel, pw, ph))
    parts.append("</svg>")
    return "".join(parts)


def _histogram_svg(normal: np.ndarray, defect: np.ndarray, threshold: float) -> str:
    width, height = 720, 300
    ml, mr, mt, mb = 52, 16, 34, 44
    pw, ph = width - ml - mr, height - mt - mb
    everything = np.concatenate([normal, defect])
    lo, hi = float(everything.min()), float(everything.max())
    if math.isfinite(threshold):
        lo, hi = min(lo, threshold), max(hi, threshold)
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        lo, hi = lo - 0.5, hi + 0.5
    n_bins = int(np.clip(round(2 * math.sqrt(everything.size)), 10, 40))
    edges = np.linspace(lo, hi, n_bins + 1)
    counts_normal = np.histogram(normal, bins=edges)[0]
    counts_defect = np.histogram(defect, bins=edges)[0]
    top = max(int(counts_normal.max(initial=0)), int(counts_defect.max(initial=0)), 1)
    y_ticks = _nice_ticks(0.0, float(top), 4, min_step=1.0)
    if y_ticks[-1] < top:  # leave head room: the axis ends on the tick above the tallest bar
        y_ticks.append(y_ticks[-1] + (y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else top))
    y_top = float(y_ticks[-1])

    def sx(v: float) -> float:
        return ml + (v - lo) / (hi - lo) * pw

    def sy(v: float) -> float:
        return mt + (1.0 - v / y_top) * ph

    parts = [
        f'<svg id="score-histogram" viewBox="0 0 {width} {height}" width="{width}" '
        f'height="{height}" role="img" aria-label="Histogram of image scores">'
    ]
    for t in y_ticks:
        parts.append(_grid_line(ml, sy(t), ml + pw, sy(t)))
        parts.append(_text(ml - 6, sy(t) + 4, _tick_label(t), "end"))
    for t in _nice_ticks(lo, hi, 6):
        parts.append(_grid_line(sx(t), mt, sx(t), mt + ph))
        parts.append(_text(sx(t), mt + ph + 16, _tick_label(t), "middle"))
    for counts, color, name in (
        (counts_normal, NORMAL_COLOR, "normal"),
        (counts_defect, DEFECT_COLOR, "defect"),
    ):
        for i, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            x0, x1 = sx(edges[i]), sx(edges[i + 1])
            y0 = sy(count)
            parts.append(
                f'<rect class="bar {name}" x="{x0:.1f}" y="{y0:.1f}" '
                f'width="{max(x1 - x0 - 0.5, 0.5):.1f}" height="{mt + ph - y0:.1f}" '
                f'fill="{color}" fill-opacity="0.55"/>'
            )
    parts.append(
        f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#6b7280"/>'
    )
    if math.isfinite(threshold):
        tx = sx(threshold)
        parts.append(
            f'<line class="threshold" x1="{tx:.1f}" y1="{mt - 4}" x2="{tx:.1f}" '
            f'y2="{mt + ph}" stroke="#111827" stroke-width="1.5" stroke-dasharray="5 3"/>'
        )
    # legend in the top margin
    legend = [
        (
            f'<rect x="{ml}" y="10" width="14" height="12" fill="{NORMAL_COLOR}" '
            'fill-opacity="0.55"/>'
        ),
        _text(ml + 20, 20, f"normal ({normal.size})", "start"),
        (
            f'<rect x="{ml + 130}" y="10" width="14" height="12" fill="{DEFECT_COLOR}" '
            'fill-opacity="0.55"/>'
        ),
        _text(ml + 150, 20, f"defect ({defect.size})", "start"),
        (
            f'<line x1="{ml + 260}" y1="16" x2="{ml + 282}" y2="16" stroke="#111827" '
            'stroke-width="1.5" stroke-dasharray="5 3"/>'
        ),
        _text(ml + 288, 20, f"threshold {_format_value(threshold)}", "start"),
    ]
    parts.append('<g class="legend">' + "".join(legend) + "</g>")
    parts.append(_text(ml + pw / 2, height - 8, "image score", "middle", "axis-label"))
    parts.append(
        f'<text class="axis-label" x="14" y="{mt + ph / 2:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {mt + ph / 2:.1f})">images</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _svg_open(svg_id: str, title: str) -> str:
    return (
        f'<svg id="{svg_id}" viewBox="0 0 {_PLOT_W} {_PLOT_H}" width="{_PLOT_W}" '
        f'height="{_PLOT_H}" role="img" aria-label="{_esc(title)}">'
    )


def _axes_box(pw: float, ph: float) -> str:
    return f'<rect x="{_ML}" y="{_MT}" width="{pw}" height="{ph}" fill="none" stroke="#6b7280"/>'


def _axis_labels(xlabel: str, ylabel: str, pw: float, ph: float) -> str:
    cy = _MT + ph / 2
    return _text(_ML + pw / 2, _PLOT_H - 8, xlabel, "middle", "axis-label") + (
        f'<text class="axis-label" x="14" y="{cy:.1f}" text-anchor="middle" '
        f'transform="rotate(-90 14 {cy:.1f})">{_esc(ylabel)}</text>'
    )


def _grid_line(x1: float, y1: float, x2: float, y2: float) -> str:
    return (
        f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
        'stroke="#e5e7eb" stroke-width="1"/>'
    )


def _text(x: float, y: float, text: str, anchor: str, cls: str = "tick") -> str:
    return f'<text class="{cls}" x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">{_esc(text)}</text>'


def _dedupe(coords: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Drop consecutive points that land on the same tenth of a pixel."""
    out: list[tuple[float, float]] = []
    last = None
    for x, y in coords:
        key = (round(x, 1), round(y, 1))
        if key != last:
            out.append((x, y))
            last = key
    return out


def _nice_ticks(lo: float, hi: float, target: int, min_step: float = 0.0) -> list[float]:
    """Round tick positions (1, 2, 2.5 or 5 times a power of ten) covering ``[lo, hi]``."""
    span = hi - lo
    if not (math.isfinite(span) and span > 0):
        return [lo]
    raw = span / max(target, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = 10.0 * magnitude
    for multiple in (1.0, 2.0, 2.5, 5.0, 10.0):
        if span / (multiple * magnitude) <= target:
            step = multiple * magnitude
            break
    step = max(step, min_step)
    start = math.ceil(lo / step - 1e-9) * step
    count = math.floor((hi - start) / step + 1e-9)
    return [start + i * step for i in range(count + 1)]


def _tick_label(value: float) -> str:
    value = round(value, 10)
    return f"{value:g}" if value != 0 else "0"


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _format_value(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_format_value(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_format_value(v) for v in value)
    return str(value)


def _kv_table(mapping: Mapping[str, Any], cls: str) -> str:
    rows = "".join(
        f"<tr><th>{_esc(key)}</th><td>{_esc(_format_value(value))}</td></tr>"
        for key, value in mapping.items()
    )
    return f'<table class="kv {cls}"><tbody>{rows}</tbody></table>'


def _label(item: ReportImage) -> int:
    label = int(item.label)
    if label not in LABEL_NAMES:
        raise ValueError(f"{item.name}: label must be 1, 0 or -1, got {item.label}")
    return label


def _labelled(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels (0/1 ints) and scores of the labelled images with finite scores."""
    keep = np.isin(labels, (0, 1)) & np.isfinite(scores)
    return labels[keep].astype(np.int64), scores[keep]


def _class_counts(labels: np.ndarray) -> dict[int, int]:
    return {label: int((labels == label).sum()) for label in (0, 1, -1)}


def _by_score(items: Sequence[ReportImage], descending: bool = True) -> list[ReportImage]:
    """Items sorted by score (NaN last), ties broken by name, so the choice is deterministic."""

    def key(item: ReportImage) -> tuple[int, float, str]:
        score = float(item.score)
        if not math.isfinite(score):
            return (1, 0.0, item.name)
        return (0, -score if descending else score, item.name)

    return sorted(items, key=key)


def _spread(items: list[ReportImage], limit: int) -> list[ReportImage]:
    """Up to ``limit`` items spread evenly over an ordered list (both ends included)."""
    if limit <= 0:
        return []
    if len(items) <= limit:
        return list(items)
    if limit == 1:
        return [items[0]]
    indices = np.rint(np.linspace(0, len(items) - 1, limit)).astype(int)
    return [items[i] for i in indices]


# --------------------------------------------------------------------------------------------
# page template
# --------------------------------------------------------------------------------------------

_CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
    "script-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)

_SCRIPT = """
window.addEventListener("load", function () {
  var images = document.querySelectorAll("img");
  var loaded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { loaded++; }
  }
  document.body.dataset.imagesLoaded = String(loaded);
  document.body.dataset.imagesTotal = String(images.length);
});
"""

_CSS = """
:root { --fg: #1f2937; --muted: #6b7280; --line: #e5e7eb; --bg: #f5f6f8; --card: #fff; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  "Noto Sans", "DejaVu Sans", sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 20px 56px; }
header h1 { font-size: 1.6rem; margin: 0; }
header p { margin: 2px 0 12px; }
h2 { font-size: 1.15rem; margin: 0 0 12px; }
h3 { font-size: 1rem; margin: 18px 0 4px; color: var(--muted); font-weight: 600; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
  padding: 16px 20px; margin: 16px 0; }
.muted { color: var(--muted); font-size: .9rem; }
.note { color: #92400e; background: #fffbeb; border: 1px solid #fde68a; border-radius: 6px;
  padding: 8px 12px; font-size: .9rem; }
table.kv { border-collapse: collapse; font-size: .9rem; max-width: 100%; }
table.kv th { text-align: left; font-weight: 600; color: var(--muted); padding: 3px 18px 3px 0;
  vertical-align: top; white-space: nowrap; }
table.kv td { padding: 3px 0; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas,
  "DejaVu Sans Mono", monospace; overflow-wrap: anywhere; }
table.kv tr + tr { border-top: 1px solid var(--line); }
figure { margin: 0; }
figcaption { font-size: .82rem; color: var(--muted); text-align: center; margin-top: 2px; }
.plots { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr)); gap: 16px; }
svg { display: block; max-width: 100%; height: auto; margin: 0 auto; }
svg text { font-family: inherit; fill: #374151; }
svg .tick { font-size: 11px; }
svg .axis-label { font-size: 12px; fill: #111827; }
svg .legend text { font-size: 12px; }
.colorbar { display: flex; flex-wrap: wrap; align-items: center; gap: 8px; font-size: .85rem;
  margin-bottom: 6px; }
.colorbar svg { margin: 0; }
b.pred { color: #e60000; } b.true { color: #00a000; }
.rows { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr));
  column-gap: 28px; }
@media (max-width: 560px) { .rows { grid-template-columns: minmax(0, 1fr); } }
.example { border-top: 1px solid var(--line); padding: 10px 0; min-width: 0; }
.meta { display: flex; flex-wrap: wrap; align-items: baseline; gap: 10px; font-size: .9rem;
  margin-bottom: 6px; }
.meta .name { font-weight: 600; overflow-wrap: anywhere; }
.badge { border-radius: 999px; padding: 0 8px; font-size: .78rem; background: #f3f4f6;
  color: #374151; }
.badge.defect { background: #fde8e6; color: #9b1c1c; }
.badge.normal { background: #e3effb; color: #1e4e8c; }
.badge.wrong { background: #fff1d6; color: #8a4b00; }
.badge.right { background: #e5f6ea; color: #1d6b36; }
.panels { display: grid; grid-template-columns: repeat(4, minmax(0, 1fr)); gap: 8px; }
@media (max-width: 560px) { .panels { grid-template-columns: repeat(2, minmax(0, 1fr)); } }
.panels img, .gallery img { display: block; width: 100%; height: auto; border-radius: 4px;
  image-rendering: pixelated; background: #000; }
.nomask { display: flex; align-items: center; justify-content: center; width: 100%;
  border: 1px dashed #cbd5e1; border-radius: 4px; color: var(--muted); font-size: .85rem;
  background: #f9fafb; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(96px, 1fr)); gap: 6px; }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<title>{title}</title>
<style>{css}</style>
<script>{script}</script>
</head>
<body>
<main>
{body}
</main>
</body>
</html>
"""
