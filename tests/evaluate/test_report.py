"""The self-contained HTML report: content checks, then a real render in headless Chromium."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from defectlab.evaluate.metrics import auroc, average_precision
from defectlab.evaluate.report import ReportImage, write_report
from defectlab.evaluate.visualize import heatmap_overlay, mask_outline, to_rgb_uint8

SIZE = 64
HEAT_RANGE = (0.0, 1.0)
THRESHOLD = 0.5
METRICS = {
    "image_auroc": 0.91234567,
    "image_ap": np.float32(0.875),
    "pixel_aupro": None,
    "n_test_images": 11,
    "threshold_source": "validation F1",
}


def make_item(
    name: str, label: int, score: float, rng: np.random.Generator, *, with_mask: bool = True
) -> ReportImage:
    channels = 3 if label == 1 else 1
    image = np.clip(0.5 + rng.normal(0, 0.03, (SIZE, SIZE, channels)), 0, 1).astype(np.float32)
    heat = np.clip(rng.normal(0.2, 0.05, (SIZE, SIZE)), 0, 1).astype(np.float32)
    true_mask = np.zeros((SIZE, SIZE), bool)
    if label == 1:
        y, x = rng.integers(8, SIZE - 24, 2)
        true_mask[y : y + 14, x : x + 12] = True
        image[true_mask] = 0.9
        heat[y - 2 : y + 12, x + 2 : x + 16] = 0.9  # prediction slightly off the truth
    return ReportImage(
        name=name,
        image=image,
        heat=heat,
        predicted_mask=heat > 0.5,
        true_mask=true_mask if with_mask else None,
        score=score,
        label=label,
    )


def make_items(n_normal: int = 3, n_defect: int = 4, n_unknown: int = 1) -> list[ReportImage]:
    rng = np.random.default_rng(0)
    items = [make_item(f"normal_{i}", 0, 0.1 + 0.15 * i, rng) for i in range(n_normal)]
    items += [
        make_item(f"defect_{i}", 1, 0.3 + 0.2 * i, rng, with_mask=i != 1) for i in range(n_defect)
    ]
    items += [make_item(f"unknown_{i}", -1, 0.4, rng, with_mask=False) for i in range(n_unknown)]
    return items


def gallery_images(count: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    out = []
    for _ in range(count):
        image = to_rgb_uint8(rng.uniform(0.3, 0.7, (SIZE, SIZE, 1)))
        mask = np.zeros((SIZE, SIZE), bool)
        mask[20:40, 25:35] = True
        out.append(mask_outline(image, mask))
    return out


def build(tmp_path: Path, items: list[ReportImage], **overrides) -> tuple[Path, str]:
    labels = np.array([it.label for it in items] + [0] * 6 + [1] * 2)
    scores = np.array([it.score for it in items] + [0.05, 0.1, 0.15, 0.2, 0.25, 0.55, 0.8, 0.9])
    kwargs = {
        "title": "Evaluation <pixelstats> & friends",
        "metrics": METRICS,
        "labels": labels,
        "scores": scores,
        "image_threshold": THRESHOLD,
        "items": items,
        "heat_range": HEAT_RANGE,
        "info": {"run dir": "runs/2024-01-01", "model": "pixelstats", "versions": ["a", "b"]},
        "galleries": [("Synthesis samples", gallery_images())],
    }
    kwargs.update(overrides)
    path = write_report(tmp_path / "out" / "report.html", **kwargs)
    return path, path.read_text(encoding="utf-8")


def expected_img_count(items: list[ReportImage], gallery: int = 5) -> int:
    """With few items and max_examples=12, every item shows once in the overlays, and every
    labelled item once more in the worst false positive / false negative lists."""
    total = gallery
    for item in items:
        appearances = 1 if item.label == -1 else 2
        total += appearances * (4 if item.true_mask is not None else 3)
    return total


def row_html(document: str, name: str) -> str:
    match = re.search(
        rf'<div class="example" data-name="{re.escape(name)}">.*?</div></div>', document
    )
    assert match, f"no example row for {name}"
    return match.group(0)


def decode_images(fragment: str) -> list[np.ndarray]:
    out = []
    for data in re.findall(r'src="data:image/png;base64,([^"]+)"', fragment):
        bgr = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
        out.append(bgr[:, :, ::-1])
    return out


def section(document: str, section_id: str) -> str:
    match = re.search(rf'<section id="{section_id}">.*?</section>', document, re.S)
    assert match, f"no section {section_id}"
    return match.group(0)


# --------------------------------------------------------------------------------------------


def test_report_is_self_contained_and_complete(tmp_path: Path) -> None:
    items = make_items()
    path, document = build(tmp_path, items)

    assert path == tmp_path / "out" / "report.html"
    assert document.startswith("<!DOCTYPE html>")
    assert "http://" not in document and "https://" not in document
    assert not re.search(r'\bsrc="(?!data:image/png;base64,)', document)
    assert not re.search(r"url\((?!#)", document), "only in-document SVG references allowed"

    # header, info and metrics
    assert "Evaluation &lt;pixelstats&gt; &amp; friends" in document
    assert "<pixelstats>" not in document
    for key in ("run dir", "model", "versions", "runs/2024-01-01", "a, b"):
        assert key in document
    metrics_html = section(document, "metrics")
    for key in METRICS:
        assert f"<th>{key}</th>" in metrics_html
    assert "<td>0.9123</td>" in metrics_html
    assert "<td>0.8750</td>" in metrics_html
    assert "<td>n/a</td>" in metrics_html
    assert "<td>11</td>" in metrics_html

    # curves with captions computed from the labelled scores only
    labelled = np.array([it.label for it in items] + [0] * 6 + [1] * 2)
    scores = np.array([it.score for it in items] + [0.05, 0.1, 0.15, 0.2, 0.25, 0.55, 0.8, 0.9])
    keep = labelled >= 0
    for svg_id in ("roc-curve", "pr-curve", "score-histogram"):
        match = re.search(rf'<svg id="{svg_id}".*?</svg>', document, re.S)
        assert match, svg_id
        assert "<text" in match.group(0), f"{svg_id} has no tick labels"
    for svg_id in ("roc-curve", "pr-curve"):
        svg = re.search(rf'<svg id="{svg_id}".*?</svg>', document, re.S).group(0)
        points = re.search(r'<polyline class="curve" points="([^"]+)"', svg).group(1).split()
        assert len(points) >= 3
    assert f"AUROC = {auroc(labelled[keep], scores[keep]):.4f}" in document
    assert f"AP = {average_precision(labelled[keep], scores[keep]):.4f}" in document

    # histogram: both classes, threshold line, legend with the labelled counts
    histogram = re.search(r'<svg id="score-histogram".*?</svg>', document, re.S).group(0)
    assert 'class="bar normal"' in histogram and 'class="bar defect"' in histogram
    assert 'class="threshold"' in histogram
    assert "normal (9)" in histogram and "defect (6)" in histogram

    # images: every row has its panels, "no mask" where there is no ground truth
    assert document.count("<img") == expected_img_count(items)
    assert document.count(">no mask</div>") == 2 * 1 + 1  # defect_1 twice, unknown_0 once
    for width, height in re.findall(r'<img [^>]*width="(\d+)" height="(\d+)"', document):
        assert (int(width), int(height)) == (SIZE, SIZE), "images must keep model resolution"

    # the written file is the only file in the folder (atomic write leaves no temp file)
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]


def test_report_row_images_show_the_item(tmp_path: Path) -> None:
    items = make_items()
    _, document = build(tmp_path, items)
    item = next(it for it in items if it.name == "defect_2")
    row = row_html(document, "defect_2")
    assert "score <b>0.7000</b>" in row
    assert 'class="badge defect"' in row and "correct" in row
    image, heat, predicted, truth = decode_images(row)
    assert np.array_equal(image, to_rgb_uint8(item.image))
    assert np.array_equal(heat, heatmap_overlay(item.image, item.heat, *HEAT_RANGE))
    red = np.all(predicted == (230, 0, 0), axis=2)
    green = np.all(truth == (0, 220, 0), axis=2)
    assert red.any() and not (red & ~item.predicted_mask).any()
    assert green.any() and not (green & ~item.true_mask).any()
    # defect_0 scores 0.3 < 0.5: a false negative; every normal here scores below 0.5
    assert "false negative" in row_html(document, "defect_0")
    assert "false positive" not in section(document, "worst-false-positives").split("</p>", 1)[1]


def test_report_example_selection_is_capped_and_deterministic(tmp_path: Path) -> None:
    items = make_items(n_normal=9, n_defect=8, n_unknown=3)
    # shuffle: the choice must depend on scores only
    shuffled = [items[i] for i in np.random.default_rng(3).permutation(len(items))]
    _, document = build(tmp_path, shuffled, max_examples=4)
    _, again = build(tmp_path, items, max_examples=4)
    assert document == again

    examples = section(document, "examples")
    shown = re.findall(r'data-name="([^"]+)"', examples)
    assert sum(n.startswith("defect_") for n in shown) == 4
    assert sum(n.startswith("normal_") for n in shown) == 2
    assert sum(n.startswith("unknown_") for n in shown) == 2
    # spread over the score range, highest first, both ends included
    defects = [n for n in shown if n.startswith("defect_")]
    assert defects[0] == "defect_7" and defects[-1] == "defect_0"

    fp = re.findall(r'data-name="([^"]+)"', section(document, "worst-false-positives"))
    fn = re.findall(r'data-name="([^"]+)"', section(document, "worst-false-negatives"))
    assert fp == [f"normal_{i}" for i in (8, 7, 6, 5, 4, 3)]
    assert fn == [f"defect_{i}" for i in range(6)]
    # normals 3..8 score 0.55..1.3, i.e. at or above the 0.5 threshold
    assert section(document, "worst-false-positives").count("badge wrong") == 6
    assert not any(n.startswith("unknown_") for n in fp + fn)


def test_report_with_one_class_omits_curves(tmp_path: Path) -> None:
    items = [it for it in make_items() if it.label == 0]
    path = write_report(
        tmp_path / "one.html",
        title="normals only",
        metrics={"image_auroc": None},
        labels=np.zeros(len(items), int),
        scores=np.array([it.score for it in items]),
        image_threshold=THRESHOLD,
        items=items,
        heat_range=HEAT_RANGE,
    )
    document = path.read_text(encoding="utf-8")
    assert 'id="roc-curve"' not in document and 'id="pr-curve"' not in document
    assert "need both normal and defect images" in document
    assert 'id="score-histogram"' in document
    assert "<td>n/a</td>" in document
    assert document.count("<img") == 2 * 3 * 4  # overlays + worst false positives


def test_report_overwrites_atomically(tmp_path: Path) -> None:
    target = tmp_path / "report.html"
    target.write_text("old")
    _, document = build(tmp_path, make_items(), galleries=None)
    path2 = write_report(
        target,
        title="new",
        metrics={},
        labels=np.array([0, 1]),
        scores=np.array([0.1, 0.9]),
        image_threshold=0.5,
        items=[],
        heat_range=HEAT_RANGE,
    )
    assert path2 == target
    text = target.read_text(encoding="utf-8")
    assert text != "old" and "<title>new</title>" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "report.html"]
    assert 'class="gallery"' not in document


def test_report_escapes_item_names(tmp_path: Path) -> None:
    items = make_items()
    items[0].name = 'bad"<script>alert(1)</script>'
    _, document = build(tmp_path, items)
    assert "<script>alert(1)</script>" not in document
    assert 'data-name="bad&quot;&lt;script&gt;alert(1)&lt;/script&gt;"' in document


# --------------------------------------------------------------------------------------------
# rendering in a real browser
# --------------------------------------------------------------------------------------------


def chromium_binary() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        message = "chromium not found; install it with `apt-get install -y chromium`"
        if os.environ.get("CI"):
            pytest.fail(f"chromium must be installed in CI ({message})")
        pytest.skip(message)
    return binary


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"chromium failed ({result.returncode}):\n{result.stderr}"
    return result


def test_report_renders_in_chromium(tmp_path: Path) -> None:
    binary = chromium_binary()
    items = make_items()
    path, _ = build(tmp_path, items)
    url = path.resolve().as_uri()

    dom = run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", url).stdout
    loaded = re.search(r'data-images-loaded="(\d+)"', dom)
    total = re.search(r'data-images-total="(\d+)"', dom)
    assert loaded and total, f"the load script did not run; DOM starts with:\n{dom[:500]}"
    assert int(total.group(1)) == expected_img_count(items)
    assert int(loaded.group(1)) == int(total.group(1)) > 0

    shot = tmp_path / "shot.png"
    run_chromium(
        binary,
        tmp_path / "profile-shot",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        "--hide-scrollbars",
        url,
    )
    assert shot.is_file(), "no screenshot written"
    pixels = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert pixels is not None and pixels.shape[:2] == (2000, 1200)
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50, f"screenshot looks flat ({len(colours)} colours)"
    assert pixels.std() > 5
