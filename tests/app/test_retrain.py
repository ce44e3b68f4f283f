"""The loop: reviews → recalibrated (or retrained) version, measured on a reviewed hold-out
that neither calibration nor training saw, then promoted."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import func, select

from defectlab.app.db import Database, Image, Inspection, ModelVersion, Review
from defectlab.app.ingest import ingest_folder, register_version
from defectlab.app.retrain import is_holdout, retrain
from defectlab.cli import main
from defectlab.components.fusion import MAP_FUSIONS, fuse_maps, resize_maps
from defectlab.data.io import write_png
from defectlab.data.transforms import resize_image
from defectlab.errors import DataError
from defectlab.runs import load_run, predict_arrays


def review_everything(db: Database, files: Path, truth: dict, with_masks: bool = True) -> None:
    """Replay the true labels as a reviewer would enter them."""
    with db.transaction() as session:
        for image in session.scalars(select(Image)):
            mask = truth[Path(image.path).name]
            mask_file = ""
            if mask is not None and with_masks:
                mask_file = f"reviews/{image.sha256}.png"
                write_png(files / mask_file, mask)
            session.add(
                Review(
                    image_id=image.id,
                    verdict="normal" if mask is None else "defect",
                    defect_class="" if mask is None else "blob",
                    mask_file=mask_file,
                    reviewer="replay",
                )
            )


@pytest.fixture
def reviewed(db_url: str, trained_run: Path, tmp_path: Path):
    from tests.app.conftest import write_parts

    folder = tmp_path / "line"
    truth = write_parts(folder, n_normal=24, n_defect=16, seed=3)
    db = Database(db_url)
    files = tmp_path / "files"
    version = register_version(db, trained_run)
    ingest_folder(db, version, folder, files, progress=False)
    yield db, files, truth, version
    db.close()


def test_nothing_to_learn_from_is_a_clear_error(db_url: str, trained_run: Path, tmp_path: Path):
    db = Database(db_url)
    with pytest.raises(DataError, match="no model version"):
        retrain(db, tmp_path, progress=False)
    register_version(db, trained_run)
    with pytest.raises(DataError, match="at least one reviewed defect and one reviewed normal"):
        retrain(db, tmp_path, progress=False)
    db.close()


def test_recalibration_from_reviews(reviewed) -> None:
    db, files, truth, base = reviewed
    review_everything(db, files, truth)
    result = retrain(db, files, min_per_class=1000, progress=False)
    assert result["kind"] == "recalibrated"
    with db.sessions() as session:
        shas = session.scalars(select(Image.sha256)).all()
        new = session.get(ModelVersion, result["version"])
        n_new = session.scalar(
            select(func.count(Inspection.id)).where(Inspection.model_version_id == new.id)
        )
    n_holdout = sum(is_holdout(s) for s in shas)
    assert 0 < n_holdout < len(shas)
    calibration = new.metrics["calibration"]
    # calibration saw exactly the reviewed parts outside the hold-out
    assert calibration["n_defect"] + calibration["n_normal"] == len(shas) - n_holdout
    assert result["new"]["n"] == result["current"]["n"] == n_holdout
    assert new.status == "candidate" and new.parent_id == base.id
    assert new.run_dir == base.run_dir and n_new == len(shas)  # decisions derived, not rescored
    # F1 on the training side is best at the new threshold, and the painted discs are easy
    assert calibration["val_f1"] == 1.0
    assert result["new"]["f1"] >= result["current"]["f1"]
    assert result["new"]["dice"] is not None and 0 <= result["new"]["dice"] <= 1
    code = main(
        ["retrain", "--db", db.url, "--files", str(files), "--min-per-class", "1000", "--promote"]
    )
    assert code == 0
    with db.sessions() as session:
        active = db.active_version(session)
        assert active.id == result["version"] + 1
        assert session.get(ModelVersion, base.id).status == "retired"


def test_retrained_version_fuses_a_segmenter_into_the_detector(reviewed, tmp_path: Path) -> None:
    db, files, truth, base = reviewed
    review_everything(db, files, truth)
    result = retrain(
        db,
        files,
        out=tmp_path / "seg",
        min_per_class=5,
        segmenter_epochs=2,
        segmenter_size=64,
        progress=False,
    )
    fusion = result["fusion"]
    assert result["kind"] == f"fused ({fusion['fusion']}) with a Lite0 U-Net (blob)"
    segmenter_run, fused_run = tmp_path / "seg" / "run", tmp_path / "seg" / "fused"
    assert (segmenter_run / "model.pt").is_file() and (fused_run / "model.pt").is_file()
    with db.sessions() as session:
        new = session.get(ModelVersion, result["version"])
        shas = dict(session.execute(select(Image.id, Image.sha256)).all())
        scores = {
            (i.model_version_id, i.image_id): i.score
            for i in session.scalars(
                select(Inspection).where(Inspection.model_version_id.in_([base.id, new.id]))
            )
        }
    assert new.model == "fused" and new.run_dir == str(fused_run.resolve())
    # the image decision is the detector's: its scores, the threshold the reviews recalibrated
    base_scores = [scores[(base.id, i)] for i in shas]
    new_scores = [scores[(new.id, i)] for i in shas]
    np.testing.assert_allclose(new_scores, base_scores, rtol=1e-6)
    recalibrated = retrain(db, files, min_per_class=1000, progress=False)
    assert new.image_threshold == recalibrated["calibration"]["image_threshold"]
    # the map: the fusion with the best Dice on the hold-out, at its threshold
    assert fusion["chosen_on"] == "hold-out" and fusion["fusion"] in MAP_FUSIONS
    assert fusion["dice"] == max(c["dice"] for c in fusion["candidates"].values())
    assert new.pixel_threshold == fusion["pixel_threshold"]
    assert "in-sample" in result["summary"] and "in-sample" in new.note  # said where shown
    stored = json.loads((fused_run / "calibration.json").read_text())
    assert stored["image_threshold"] == new.image_threshold
    assert stored["pixel_threshold"] == new.pixel_threshold
    # the hold-out measured the versions and chose the fusion; nothing trained on it
    holdout = {s[:20] for s in shas.values() if is_holdout(s)}
    trained_on = {p.stem for p in (tmp_path / "seg" / "reviewed-data").rglob("*.png")}
    assert holdout and not (holdout & trained_on)
    normals = {p.stem for p in (tmp_path / "seg" / "reviewed-data" / "normal").glob("*.png")}
    n_pairs = 0
    for method in ("procedural", "copy-paste"):
        with (tmp_path / "seg" / method / "manifest.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        n_pairs += len(rows)
        assert {Path(r["source"]).stem for r in rows} <= normals
    n_defects = len(list((tmp_path / "seg" / "reviewed-data" / "defect").rglob("*.png")))
    assert n_pairs == max(20, 4 * n_defects)  # shared by the two sources (one class here)


def test_fused_run_reloads_and_scores_as_its_members(reviewed, tmp_path: Path) -> None:
    """The fused version is an ordinary run: it reloads to identical outputs, its scores are
    the detector's, its map the fusion of its members' maps, and ``predict`` runs on it."""
    db, files, truth, _ = reviewed
    review_everything(db, files, truth)
    retrain(
        db,
        files,
        out=tmp_path / "seg",
        min_per_class=5,
        segmenter_epochs=1,
        segmenter_size=64,
        synthesis=("copy-paste",),
        progress=False,
    )
    fused = load_run(tmp_path / "seg" / "fused", "cpu")
    again = load_run(tmp_path / "seg" / "fused", "cpu")
    detector = load_run(fused.model.config.detector_run, "cpu")
    segmenter = load_run(fused.model.config.segmenter_run, "cpu")
    size = fused.config.data.image_size
    images = np.random.default_rng(0).random((4, size, size, 1)).astype(np.float32)
    scores, maps = predict_arrays(fused.model, images)
    for got, want in zip(predict_arrays(again.model, images), (scores, maps), strict=True):
        np.testing.assert_array_equal(got, want)
    detector_scores, detector_maps = predict_arrays(detector.model, images)
    np.testing.assert_array_equal(scores, detector_scores)
    big = np.stack([resize_image(image, segmenter.config.data.image_size) for image in images])
    _, probabilities = predict_arrays(segmenter.model, big)
    expected = fuse_maps(
        torch.from_numpy(detector_maps),
        resize_maps(torch.from_numpy(probabilities), (size, size)),
        fused.model.config.fusion,
        detector.calibration["map_median"],
        detector.pixel_threshold,
    )
    np.testing.assert_allclose(maps, expected.numpy(), atol=1e-5)
    out = tmp_path / "predicted"
    code = main(
        [
            "predict",
            "--run",
            str(fused.run_dir),
            "--input",
            str(files.parent / "line"),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    with (out / "scores.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(truth)


def test_unknown_synthesis_is_refused(reviewed, tmp_path: Path) -> None:
    db, files, truth, _ = reviewed
    review_everything(db, files, truth)
    with pytest.raises(DataError, match="synthesis: unknown nope"):
        retrain(
            db, files, out=tmp_path / "seg", min_per_class=5, synthesis=("nope",), progress=False
        )


def test_maskgan_pairs_join_on_request(reviewed, tmp_path: Path) -> None:
    """``synthesis`` with ``maskgan`` trains a MaskGAN on the reviewed defects first and adds
    its pairs (painted on the reviewed normals) to the segmenter's training set."""
    db, files, truth, _ = reviewed
    review_everything(db, files, truth)
    result = retrain(
        db,
        files,
        out=tmp_path / "seg",
        min_per_class=5,
        segmenter_epochs=1,
        segmenter_size=64,
        synthesis=("copy-paste", "maskgan"),
        maskgan_epochs=1,
        progress=False,
    )
    assert result["fusion"] is not None
    assert (tmp_path / "seg" / "maskgan-run" / "model.pt").is_file()
    normals = {p.stem for p in (tmp_path / "seg" / "reviewed-data" / "normal").glob("*.png")}
    with (tmp_path / "seg" / "maskgan" / "manifest.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows and {Path(r["source"]).stem for r in rows} <= normals
    config = json.loads((tmp_path / "seg" / "run" / "config.json").read_text())
    assert {Path(p).name for p in config["data"]["extra_pairs"]} == {"copy-paste", "maskgan"}
