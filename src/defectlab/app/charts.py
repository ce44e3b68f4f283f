"""Small inline SVG charts for the dashboard (no JavaScript, no chart library)."""

from __future__ import annotations

from html import escape
from typing import Any

W, H, PAD = 560, 220, 36


def _x(value: float, low: float, high: float) -> float:
    return PAD + (value - low) / (high - low or 1.0) * (W - 2 * PAD)


def histogram_svg(hist: dict[str, Any], lines: dict[str, float | None]) -> str:
    """Reviewed-defect and reviewed-normal score counts side by side per bin, all scores as
    a grey outline, and a vertical line per named threshold."""
    edges = hist["edges"]
    low, high = edges[0], edges[-1]
    top = max([1, *hist["defect"], *hist["normal"]])
    top_all = max([1, *hist["all"]])
    parts = [f'<svg viewBox="0 0 {W} {H}" class="chart" role="img" aria-label="score histogram">']
    parts.append(f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" class="axis"/>')
    for i in range(len(edges) - 1):
        x0, x1 = _x(edges[i], low, high), _x(edges[i + 1], low, high)
        width = (x1 - x0) / 2 - 1
        h_all = hist["all"][i] / top_all * (H - 2 * PAD)
        parts.append(
            f'<rect x="{x0:.1f}" y="{H - PAD - h_all:.1f}" width="{x1 - x0:.1f}" '
            f'height="{h_all:.1f}" class="bar-all"><title>all: {hist["all"][i]}</title></rect>'
        )
        for j, key in enumerate(("normal", "defect")):
            count = hist[key][i]
            h = count / top * (H - 2 * PAD)
            parts.append(
                f'<rect x="{x0 + j * (width + 1):.1f}" y="{H - PAD - h:.1f}" '
                f'width="{max(width, 1):.1f}" height="{h:.1f}" class="bar-{key}">'
                f"<title>reviewed {key}: {count}</title></rect>"
            )
    for k, (name, value) in enumerate(lines.items()):
        if value is None or not low <= value <= high:
            continue
        x = _x(value, low, high)
        right = x > W / 2  # labels of lines in the right half end at the line
        parts.append(
            f'<line x1="{x:.1f}" y1="{PAD - 10}" x2="{x:.1f}" y2="{H - PAD}" '
            f'class="line-{k}"/><text x="{x - 3 if right else x + 3:.1f}" '
            f'y="{PAD - 12 + 12 * k}" class="label" text-anchor="{"end" if right else "start"}">'
            f"{escape(name)} {value:.4g}</text>"
        )
    parts.append(
        f'<text x="{PAD}" y="{H - 8}" class="label">{low:.4g}</text>'
        f'<text x="{W - PAD}" y="{H - 8}" class="label" text-anchor="end">{high:.4g}</text>'
        f'<text x="{W / 2}" y="{H - 8}" class="label" text-anchor="middle">score</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def drift_svg(drift: list[dict[str, Any]], threshold: float, width: int = 1100) -> str:
    """Median score per group of inspections (time order) with its 10–90 % band, and the
    threshold."""
    W = width  # wider than the histogram: the chart spans the page
    if not drift:
        return '<p class="muted">no inspections yet</p>'
    values = [threshold] + [d["p10"] for d in drift] + [d["p90"] for d in drift]
    low, high = min(values), max(values)
    if high <= low:
        high = low + 1.0

    def y(v: float) -> float:
        return H - PAD - (v - low) / (high - low) * (H - 2 * PAD)

    n = len(drift)

    def x(i: int) -> float:
        return PAD + (i + 0.5) / n * (W - 2 * PAD)

    parts = [f'<svg viewBox="0 0 {W} {H}" class="chart" role="img" aria-label="score drift">']
    band = " ".join(f"{x(i):.1f},{y(d['p90']):.1f}" for i, d in enumerate(drift))
    back = reversed(list(enumerate(drift)))
    band += " " + " ".join(f"{x(i):.1f},{y(d['p10']):.1f}" for i, d in back)
    parts.append(f'<polygon points="{band}" class="band"/>')
    line = " ".join(f"{x(i):.1f},{y(d['median']):.1f}" for i, d in enumerate(drift))
    parts.append(f'<polyline points="{line}" class="median"/>')
    for i, d in enumerate(drift):
        parts.append(
            f'<circle cx="{x(i):.1f}" cy="{y(d["median"]):.1f}" r="3" class="median-dot">'
            f"<title>{escape(d['period'])}: n={d['n']}, median {d['median']:.4g}, "
            f"flagged {100 * d['flagged']:.0f}%</title></circle>"
        )
    parts.append(
        f'<line x1="{PAD}" y1="{y(threshold):.1f}" x2="{W - PAD}" y2="{y(threshold):.1f}" '
        f'class="line-0"/><text x="{W - PAD}" y="{y(threshold) - 4:.1f}" class="label" '
        f'text-anchor="end">threshold {threshold:.4g}</text>'
    )
    parts.append(
        f'<text x="{PAD}" y="{H - 8}" class="label">{escape(drift[0]["period"])}</text>'
        f'<text x="{W - PAD}" y="{H - 8}" class="label" text-anchor="end">'
        f"{escape(drift[-1]['period'])}</text>"
    )
    parts.append("</svg>")
    return "".join(parts)
