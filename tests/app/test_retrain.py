"""The loop: reviews → recalibrated (or retrained) version, measured on a reviewed hold-out
that neither calibration nor training saw, then promoted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select

from defectlab.app.db import Database, Image, Inspection, ModelVersion, Review
from defectlab.app.ingest import ingest_folder, register_version
from defectlab.app.retrain import is_holdout, retrain
from defectlab.cli import main
from defectlab.data.io import write_png
from defectlab.errors import DataError


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


def test_segmenter_trains_when_k_masks_per_class(reviewed, tmp_path: Path) -> None:
    db, files, truth, _ = reviewed
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
    assert result["kind"] == "Lite0 U-Net (blob)"
    assert (tmp_path / "seg" / "run" / "model.pt").is_file()
    with db.sessions() as session:
        new = session.get(ModelVersion, result["version"])
        shas = session.scalars(select(Image.sha256)).all()
        scored = session.scalar(
            select(func.count(Inspection.id)).where(Inspection.model_version_id == new.id)
        )
    assert new.model == "unet" and scored == len(shas)
    trained_on = {p.stem for p in (tmp_path / "seg" / "reviewed-data").rglob("*.png")}
    holdout = {s[:20] for s in shas if is_holdout(s)}
    assert holdout and not (holdout & trained_on)  # never trained on what reports its quality
    assert np.isfinite(result["new"]["f1"] or 0.0)
