"""Batch inspection: streaming with bounded read-ahead, one model call per batch, resumable
output, unreadable files skipped, no mixing of two models' results."""

from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import numpy as np
import pytest

import defectlab.api as dl
from defectlab.data import loading
from defectlab.data.io import read_image
from defectlab.deploy.backends import score_images, torch_inspector
from defectlab.deploy.batch import RESULTS, inspect_folder
from defectlab.errors import ConfigError
from tests.conftest import textured, with_defect, write_image

SIZE = 32


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(5)
    root = tmp_path_factory.mktemp("data")
    for i in range(16):
        write_image(root / "normal" / f"n{i:02d}.png", textured(rng, 48))
    return dl.train(
        "pixelstats",
        root,
        tmp_path_factory.mktemp("run") / "run",
        image_size=SIZE,
        progress=False,
    ).run_dir


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    """Ten images of different sizes in two sub-folders (same file names in both), three
    with a bright defect, and one corrupt file."""
    rng = np.random.default_rng(6)
    root = tmp_path / "inputs"
    for i in range(10):
        image = textured(rng, 40 + 4 * i)
        if i % 3 == 0:
            image, _ = with_defect(image, rng)
        write_image(root / ("a" if i < 5 else "b") / f"img{i % 5}.png", image)
    (root / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    return root


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]


def test_rows_masks_and_overlays_per_image(run_dir: Path, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = inspect_folder(torch_inspector(run_dir, "cpu"), inputs, out, batch_size=4)
    assert result["n_images"] == 10 and result["n_skipped"] == 1 and result["n_total"] == 10
    rows = read_rows(out)
    assert len({r["mask"] for r in rows}) == 10  # a/img0 and b/img0 do not collide
    for row in rows:
        mask = read_image(out / row["mask"])
        assert mask.shape[:2] == (row["height"], row["width"])
        assert (out / row["overlay"]).is_file()
    flagged = {Path(r["path"]).stem + Path(r["path"]).parent.name for r in rows if r["is_defect"]}
    assert {"img0a", "img3a", "img1b", "img4b"} <= flagged  # the bright discs
    skipped = list(csv.DictReader((out / "skipped.csv").read_text().splitlines()))
    assert [Path(s["path"]).name for s in skipped] == ["broken.png"]
    table = list(csv.DictReader((out / "scores.csv").read_text().splitlines()))
    assert [r["path"] for r in table] == [r["path"] for r in rows]


def test_interrupted_inspection_resumes_without_redoing_images(
    run_dir: Path, inputs: Path, tmp_path: Path
) -> None:
    inspector = torch_inspector(run_dir, "cpu")
    reference = tmp_path / "reference"
    inspect_folder(inspector, inputs, reference, batch_size=4, progress=False)
    out = tmp_path / "out"
    inspect_folder(inspector, inputs, out, batch_size=4, progress=False)
    lines = (out / RESULTS).read_text().splitlines(keepends=True)
    # as if killed while writing the fifth row: four complete rows and a torn one
    (out / RESULTS).write_text("".join(lines[:4]) + lines[4][:15])
    result = inspect_folder(inspector, inputs, out, batch_size=4, progress=False)
    assert result["n_resumed"] == 4 and result["n_images"] == 6 and result["n_total"] == 10
    assert sorted(map(json.dumps, read_rows(out))) == sorted(map(json.dumps, read_rows(reference)))
    again = inspect_folder(inspector, inputs, out, batch_size=4, progress=False)
    assert again["n_images"] == 0 and again["n_resumed"] == 10


def test_results_of_another_model_are_not_mixed_in(
    run_dir: Path, inputs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    inspect_folder(torch_inspector(run_dir, "cpu"), inputs, out, progress=False)
    with pytest.raises(ConfigError, match=r"another inspection .*tile"):
        inspect_folder(torch_inspector(run_dir, "cpu"), inputs, out, tile=True, progress=False)


def test_read_ahead_is_bounded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """However many files, at most (prefetch + 1) batches are decoded ahead of the consumer."""
    paths = [tmp_path / f"{i}.png" for i in range(60)]
    read, lock = [0], threading.Lock()

    def fake_read(path: Path, channels: int) -> np.ndarray:
        with lock:
            read[0] += 1
        return np.zeros((4, 4, channels), np.float32)

    monkeypatch.setattr(loading, "read_image", fake_read)
    consumed = 0
    for batch_paths, _, _ in loading.iter_files(paths, 1, batch_size=5, workers=2, prefetch=2):
        consumed += len(batch_paths)
        assert read[0] - consumed <= 2 * 5
    assert consumed == 60 and read[0] == 60


def test_one_model_call_per_batch_of_mixed_sizes(run_dir: Path) -> None:
    inspector = torch_inspector(run_dir, "cpu")
    calls = []
    original = inspector.score

    def spy(images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        calls.append(len(images))
        return original(images, batch_size)

    inspector.score = spy  # type: ignore[method-assign]
    images = [np.full((h, 50, 1), 0.5, np.float32) for h in (30, 45, 80)]
    results = score_images(inspector, images)
    assert calls == [3]
    assert [heat.shape for _, heat in results] == [(30, 50), (45, 50), (80, 50)]
