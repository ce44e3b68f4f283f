"""The loop: reviews in the database → a better model version, measured on reviewed parts
that no step of it used.

Reviewed parts are split by content hash (stable whatever the order of reviews): one in
:data:`HOLDOUT_EVERY` is the **hold-out**, the rest the **training side**. From the training
side, (a) the thresholds are recalibrated as ``calibration.method=f1`` does (F1-optimal image
threshold, Dice-optimal pixel threshold where corrected masks exist); (b) when a reviewed
defect class has at least K defects with masks, a supervised Lite0 U-Net is trained on the
defects of every such class (with the reviewed normals, and procedural defects painted on
those normals) and calibrated the same way; classes under K wait. (c) The current and the
new version are scored on the hold-out; (d) the new
version is recorded with those numbers as a candidate, and becomes active when promoted.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from sqlalchemy import select, update

from defectlab.app.db import Database, Image, Inspection, ModelVersion, Review
from defectlab.app.ingest import ingest_paths, version_inspector
from defectlab.data.io import read_image, write_png
from defectlab.deploy.backends import Inspector, score_images
from defectlab.errors import DataError
from defectlab.evaluate.metrics import auroc, best_dice_threshold, best_threshold

#: one reviewed part in this many (by SHA-256) is held out to measure versions
HOLDOUT_EVERY = 4


def is_holdout(sha: str) -> bool:
    return int(sha[8:16], 16) % HOLDOUT_EVERY == 0


@dataclass
class Reviewed:
    """One reviewed part with the base version's result for it."""

    image: Image
    inspection: Inspection
    label: int
    defect_class: str
    mask_file: str


def reviewed_parts(db: Database, version: ModelVersion) -> list[Reviewed]:
    with db.sessions() as session:
        rows = session.execute(
            select(Image, Inspection, Review)
            .join(Inspection, Inspection.image_id == Image.id)
            .join(Review, Review.image_id == Image.id)
            .where(Inspection.model_version_id == version.id, Review.verdict != "unsure")
            .order_by(Image.sha256)
        ).all()
    return [
        Reviewed(
            image,
            inspection,
            int(review.verdict == "defect"),
            review.defect_class or "defect",
            review.mask_file,
        )
        for image, inspection, review in rows
    ]


def _mask(files: Path, part: Reviewed, shape: tuple[int, int]) -> np.ndarray:
    """The part's corrected mask on a grid of ``shape`` (empty for normals)."""
    if part.label == 0 or not part.mask_file:
        return np.zeros(shape, bool)
    mask = cv2.imread(str(files / part.mask_file), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise DataError(
            f"{files / part.mask_file}: corrected mask of image {part.image.id} is gone"
        )
    return cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_AREA) > 127


def _stored_heat(files: Path, part: Reviewed) -> np.ndarray:
    return np.load(files / part.inspection.heatmap_file).astype(np.float32)


def recalibrate(files: Path, parts: list[Reviewed], current: ModelVersion) -> dict[str, Any]:
    """F1-optimal image threshold on the parts' stored scores; Dice-optimal pixel threshold
    on their stored heat maps where defects have corrected masks (else kept)."""
    labels = np.array([p.label for p in parts])
    if labels.size == 0 or labels.min() == labels.max():
        raise DataError(
            "retrain needs at least one reviewed defect and one reviewed normal outside the "
            f"hold-out (one reviewed part in {HOLDOUT_EVERY} is held out); review more parts"
        )
    scores = np.array([p.inspection.score for p in parts])
    f1, image_threshold = best_threshold(labels, scores)
    result: dict[str, Any] = {
        "image_threshold": image_threshold,
        "pixel_threshold": current.pixel_threshold,
        "val_f1": f1,
        "n_defect": int(labels.sum()),
        "n_normal": int((labels == 0).sum()),
    }
    masked = [p for p in parts if p.label == 0 or p.mask_file]
    if any(p.label == 1 for p in masked):
        heats = [_stored_heat(files, p) for p in masked]
        masks = [_mask(files, p, h.shape) for p, h in zip(masked, heats, strict=True)]
        flat_masks = np.concatenate([m.ravel() for m in masks])
        flat_heats = np.concatenate([h.ravel() for h in heats])
        dice, pixel_threshold = best_dice_threshold(  # images of any size: one long row
            flat_masks.reshape(1, 1, -1), flat_heats.reshape(1, 1, -1)
        )
        result |= {"pixel_threshold": pixel_threshold, "val_dice": dice}
    return result


def measure(
    files: Path,
    parts: list[Reviewed],
    image_threshold: float,
    pixel_threshold: float,
    outputs: list[tuple[float, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Image AUROC, precision / recall / F1 at ``image_threshold`` and micro Dice at
    ``pixel_threshold`` (defects with corrected masks and all normals) on ``parts``;
    ``outputs`` are (score, heat) per part, the stored ones when ``None``."""
    if outputs is None:
        outputs = [(p.inspection.score, _stored_heat(files, p)) for p in parts]
    labels = np.array([p.label for p in parts])
    scores = np.array([score for score, _ in outputs])
    predicted = scores >= image_threshold
    tp = int(np.sum(predicted & (labels == 1)))
    fp = int(np.sum(predicted & (labels == 0)))
    fn = int(np.sum(~predicted & (labels == 1)))
    inter = total = 0
    n_masks = 0
    for part, (_, heat) in zip(parts, outputs, strict=True):
        if part.label == 1 and not part.mask_file:
            continue
        n_masks += part.label
        mask = _mask(files, part, heat.shape)
        pred = heat >= pixel_threshold
        inter += int(np.sum(mask & pred))
        total += int(mask.sum() + pred.sum())
    return {
        "n": int(labels.size),
        "n_defect": int(labels.sum()),
        "image_auroc": auroc(labels, scores)
        if labels.size and labels.min() != labels.max()
        else None,
        "precision": tp / (tp + fp) if tp + fp else None,
        "recall": tp / (tp + fn) if tp + fn else None,
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
        "dice": 2 * inter / total if n_masks and total else (1.0 if n_masks else None),
        "n_masks": n_masks,
    }


def _score_parts(inspector: Inspector, parts: list[Reviewed]) -> list[tuple[float, np.ndarray]]:
    """Run a model on the parts' image files; heat maps on the stored-heat grid."""
    outputs = []
    for part in parts:
        image = read_image(part.image.path, inspector.channels)
        ((score, heat),) = score_images(inspector, [image])
        outputs.append((score, heat))
    return outputs


def export_dataset(files: Path, parts: list[Reviewed], folder: Path) -> dict[str, int]:
    """The reviewed training side as a folder dataset: ``normal/``, ``defect/<class>/``,
    ``masks/`` (stems are content hashes, so names never clash)."""
    if folder.exists():
        shutil.rmtree(folder)
    counts: dict[str, int] = {}
    for part in parts:
        stem = part.image.sha256[:20]
        image = read_image(part.image.path, 3)
        pixels = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
        if part.label == 0:
            write_png(folder / "normal" / f"{stem}.png", pixels)
            counts["normal"] = counts.get("normal", 0) + 1
        elif part.mask_file:
            cls = "".join(c if c.isalnum() or c in "-_" else "_" for c in part.defect_class)
            write_png(folder / "defect" / cls / f"{stem}.png", pixels)
            mask = cv2.imread(str(files / part.mask_file), cv2.IMREAD_GRAYSCALE)
            write_png(folder / "masks" / f"{stem}.png", mask)
            counts[cls] = counts.get(cls, 0) + 1
    return counts


def train_segmenter(
    files: Path,
    parts: list[Reviewed],
    out: Path,
    *,
    image_size: int,
    epochs: int,
    device: str,
    progress: bool,
) -> Path:
    """Train a Lite0 U-Net on the reviewed training side (every reviewed defect with a mask
    trains; the reviewed normals split as usual), with procedural defects painted on those
    normals as extra pairs. Returns the run folder."""
    from defectlab import api

    data = out / "reviewed-data"
    counts = export_dataset(files, parts, data)
    if counts.get("normal", 0) < 2:
        raise DataError(
            "training a segmenter needs at least 2 reviewed normal parts outside the hold-out "
            "(review some of the audit sample)"
        )
    per_class = max(v for k, v in counts.items() if k != "normal")  # every reviewed defect
    synth = out / "procedural"
    if synth.exists():
        shutil.rmtree(synth)
    api.synthesize(
        "procedural",
        data / "normal",
        synth,
        n=max(20, 4 * per_class),
        seed=0,
        image_size=image_size,
        progress=progress,
    )
    run = out / "run"
    if run.exists():
        shutil.rmtree(run)
    api.train(
        "unet",
        data,
        run,
        image_size=image_size,
        device=device,
        seed=0,
        overrides=[
            "encoder=lite0",
            f"epochs={epochs}",
            f"data.defects_per_class={per_class}",
            f"data.extra_pairs={synth}",
        ],
        progress=progress,
    )
    return run


def derive_inspections(db: Database, files: Path, parent: ModelVersion, child: ModelVersion) -> int:
    """A recalibrated version shares its parent's weights: copy the parent's inspections
    with the new decisions and masks (no model call)."""
    added = 0
    with db.sessions() as session:
        rows = session.execute(
            select(Inspection, Image)
            .join(Image, Image.id == Inspection.image_id)
            .where(Inspection.model_version_id == parent.id)
        ).all()
    for batch_start in range(0, len(rows), 64):
        with db.transaction() as session:
            for inspection, image in rows[batch_start : batch_start + 64]:
                heat = np.load(files / inspection.heatmap_file).astype(np.float32)
                full = cv2.resize(heat, (image.width, image.height), interpolation=cv2.INTER_LINEAR)
                mask = full >= child.pixel_threshold
                mask_file = Path(f"v{child.id}") / image.sha256[:2] / f"{image.sha256}-mask.png"
                write_png(files / mask_file, mask.astype(np.uint8) * 255)
                is_defect = bool(inspection.score >= child.image_threshold)
                session.add(
                    Inspection(
                        image_id=image.id,
                        model_version_id=child.id,
                        score=inspection.score,
                        is_defect=is_defect,
                        defect_area=round(float(mask.mean()), 6),
                        mask_file=str(mask_file),
                        heatmap_file=inspection.heatmap_file,
                        audit=inspection.audit and not is_defect,
                        created_at=inspection.created_at,
                    )
                )
                added += 1
    return added


def promote_version(db: Database, version_id: int) -> None:
    with db.transaction() as session:
        if session.get(ModelVersion, version_id) is None:
            raise DataError(f"model version {version_id} does not exist")
        session.execute(
            update(ModelVersion).where(ModelVersion.status == "active").values(status="retired")
        )
        session.execute(
            update(ModelVersion).where(ModelVersion.id == version_id).values(status="active")
        )


def retrain(
    db: Database,
    files: Path,
    *,
    from_run: str | Path | None = None,
    out: str | Path | None = None,
    min_per_class: int = 5,
    promote: bool = False,
    device: str = "cpu",
    segmenter_epochs: int = 30,
    segmenter_size: int = 128,
    progress: bool = True,
) -> dict[str, Any]:
    """One turn of the loop (see the module); returns the new version's numbers and a
    summary line."""
    started = time.perf_counter()
    with db.sessions() as session:
        base = db.active_version(session)
        if from_run is not None:
            wanted = str(Path(from_run).resolve())
            base = session.scalars(
                select(ModelVersion)
                .where(ModelVersion.run_dir == wanted)
                .order_by(ModelVersion.status != "active", ModelVersion.id.desc())
            ).first()
            if base is None:
                raise DataError(f"{from_run}: no model version of this run in the database")
    if base is None:
        raise DataError("the database has no model version: run `defectlab inspect` first")
    parts = reviewed_parts(db, base)
    holdout = [p for p in parts if is_holdout(p.image.sha256)]
    train_side = [p for p in parts if not is_holdout(p.image.sha256)]
    calibration = recalibrate(files, train_side, base)
    current = measure(files, holdout, base.image_threshold, base.pixel_threshold)
    with_masks: dict[str, int] = {}
    for part in train_side:
        if part.label == 1 and part.mask_file:
            with_masks[part.defect_class] = with_masks.get(part.defect_class, 0) + 1
    qualified = sorted(c for c, n in with_masks.items() if n >= min_per_class)
    normals = sum(1 for p in train_side if p.label == 0)
    # the segmenter's own split and the painted defects need normals
    enough = bool(qualified) and normals >= 2
    run_dir, kind = Path(base.run_dir), "recalibrated"
    if enough:
        folder = Path(out) if out else Path(base.run_dir).parent / f"retrained-from-v{base.id}"
        teaching = [
            p for p in train_side if p.label == 0 or (p.mask_file and p.defect_class in qualified)
        ]
        run_dir = train_segmenter(
            files,
            teaching,
            folder,
            image_size=segmenter_size,
            epochs=segmenter_epochs,
            device=device,
            progress=progress,
        ).resolve()
        kind = f"Lite0 U-Net ({', '.join(qualified)})"
    candidate = ModelVersion(
        run_dir=str(run_dir),
        model=base.model,
        image_threshold=calibration["image_threshold"],
        pixel_threshold=calibration["pixel_threshold"],
        map_low=base.map_low,
        map_high=base.map_high,
    )
    if enough:
        from defectlab.deploy.backends import open_inspector

        inspector = open_inspector(run_dir, "torch", device)
        seg_cal = recalibrate_outputs(
            files, train_side, _score_parts(inspector, train_side), inspector
        )
        candidate.model = inspector.model
        candidate.image_threshold = seg_cal["image_threshold"]
        candidate.pixel_threshold = seg_cal["pixel_threshold"]
        low, high = inspector.map_range
        candidate.map_low, candidate.map_high = float(low), float(high)
        calibration = seg_cal | {
            "n_defect": calibration["n_defect"],
            "n_normal": calibration["n_normal"],
        }
        inspector.image_threshold = candidate.image_threshold
        inspector.pixel_threshold = candidate.pixel_threshold
        new = measure(
            files,
            holdout,
            candidate.image_threshold,
            candidate.pixel_threshold,
            _score_parts(inspector, holdout),
        )
    else:
        new = measure(files, holdout, candidate.image_threshold, candidate.pixel_threshold)
    with db.transaction() as session:
        candidate.status = "candidate"
        candidate.parent_id = base.id
        candidate.note = (
            f"{kind} from v{base.id} on {len(train_side)} reviewed parts; hold-out {len(holdout)}"
        )
        candidate.metrics = {
            "calibration": calibration,
            "holdout": {f"v{base.id} (current)": current, "new": new},
            "with_masks_per_class": with_masks,
            "min_per_class": min_per_class,
            "trained": kind,
        }
        session.add(candidate)
        session.flush()
        new_id = candidate.id
    with db.sessions() as session:
        candidate = session.get(ModelVersion, new_id)
    if enough:
        paths = []
        with db.sessions() as session:
            paths = [Path(p) for p in session.scalars(select(Image.path)).all()]
        ingest_paths(
            db,
            candidate,
            [p for p in paths if p.is_file()],
            files,
            inspector=version_inspector(candidate, device),
            progress=progress,
        )
    else:
        derive_inspections(db, files, base, candidate)
    if promote:
        promote_version(db, new_id)

    def fmt(m: dict[str, Any], key: str) -> str:
        return "–" if m.get(key) is None else f"{m[key]:.3f}"

    state = "active" if promote else "candidate: promote it in the app"
    summary = (
        f"retrain: v{new_id} ({kind}, {state})"
        f" — hold-out of {new['n']} reviewed parts: F1 {fmt(current, 'f1')} → {fmt(new, 'f1')}, "
        f"Dice {fmt(current, 'dice')} → {fmt(new, 'dice')}, image AUROC "
        f"{fmt(current, 'image_auroc')} → {fmt(new, 'image_auroc')} "
        f"[{time.perf_counter() - started:.0f} s of training and scoring]"
    )
    return {
        "version": new_id,
        "kind": kind,
        "current": current,
        "new": new,
        "calibration": calibration,
        "summary": summary,
    }


def recalibrate_outputs(
    files: Path,
    parts: list[Reviewed],
    outputs: list[tuple[float, np.ndarray]],
    inspector: Inspector,
) -> dict[str, Any]:
    """As :func:`recalibrate`, on a new model's outputs for the parts."""
    labels = np.array([p.label for p in parts])
    scores = np.array([s for s, _ in outputs])
    f1, image_threshold = best_threshold(labels, scores)
    result: dict[str, Any] = {
        "image_threshold": image_threshold,
        "pixel_threshold": inspector.pixel_threshold,
        "val_f1": f1,
    }
    keep = [i for i, p in enumerate(parts) if p.label == 0 or p.mask_file]
    if any(parts[i].label == 1 for i in keep):
        heats = [outputs[i][1] for i in keep]
        masks = [_mask(files, parts[i], h.shape) for i, h in zip(keep, heats, strict=True)]
        dice, pixel_threshold = best_dice_threshold(
            np.concatenate([m.ravel() for m in masks]).reshape(1, 1, -1),
            np.concatenate([h.ravel() for h in heats]).reshape(1, 1, -1),
        )
        result |= {"pixel_threshold": pixel_threshold, "val_dice": dice}
    return result
