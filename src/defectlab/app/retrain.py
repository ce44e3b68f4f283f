"""The loop: reviews in the database → a better model version, measured on reviewed parts
that no training step used.

Reviewed parts are split by content hash (stable whatever the order of reviews): one in
:data:`HOLDOUT_EVERY` is the **hold-out**, the rest the **training side**. From the training
side, (a) the thresholds are recalibrated as ``calibration.method=f1`` does (F1-optimal image
threshold, Dice-optimal pixel threshold where corrected masks exist); (b) when a reviewed
defect class has at least K defects with masks, a supervised Lite0 U-Net is trained on the
defects of every such class, with the reviewed normals and synthetic defects on those
normals (procedural painting and copy-paste of the reviewed defects by default, MaskGAN on
request); classes under K wait. The U-Net does not replace the detector: a segmenter taught
by a few dozen defects outlines them better than a normal-only detector but ranks whole
images worse, so the new version is a ``fused`` run (:mod:`defectlab.segment.fused`) that
keeps the detector's image score and the recalibrated image threshold, and takes its map
from the U-Net's probability fused with the detector's map. Which fusion (U-Net alone,
gated by the detector, averaged with it, or the detector alone) and its pixel threshold are
decided on the hold-out (highest Dice at each fusion's Dice-optimal threshold), so the
hold-out's Dice for that version is in-sample for this choice, while its image numbers are
not. (c) The current and the new version are scored on the hold-out; (d) the new version is
recorded with those numbers and the fusion choice as a candidate, and becomes active when
promoted.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from sqlalchemy import select, update

from defectlab.app.db import Database, Image, Inspection, ModelVersion, Review
from defectlab.app.ingest import ingest_paths, version_inspector
from defectlab.components.fusion import MAP_FUSIONS, fuse_maps
from defectlab.components.gan_layers import min_image_size
from defectlab.data.io import read_image, read_mask, write_png
from defectlab.data.transforms import resize_image, resize_mask
from defectlab.deploy.backends import Inspector, score_images
from defectlab.errors import DataError
from defectlab.evaluate.metrics import auroc, best_dice_threshold, best_threshold

#: one reviewed part in this many (by SHA-256) is held out to measure versions
HOLDOUT_EVERY = 4
#: said of a fused version's hold-out Dice: the hold-out chose its map and pixel threshold
IN_SAMPLE = " (new Dice in-sample: the hold-out chose the map fusion)"


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


#: synthetic pair sources the segmenter can add to the reviewed defects (see train_segmenter)
SYNTHESIS = ("procedural", "copy-paste", "maskgan")


def _copy_paste_pairs(
    data: Path, normals: list[tuple[Path, np.ndarray]], out: Path, n: int, image_size: int
) -> None:
    """``n`` copy-paste pairs: the exported reviewed defects' mask components pasted onto
    the reviewed normals (all at ``image_size``)."""
    from defectlab import api
    from defectlab.synth.copypaste import CopyPaste

    images, masks, types = [], [], []
    for path in sorted((data / "defect").rglob("*.png")):
        images.append(resize_image(read_image(path, 1), image_size))
        masks.append(resize_mask(read_mask(data / "masks" / path.name), image_size))
        types.append(path.parent.name)
    synthesizer = CopyPaste.from_examples(images, masks, types=types)
    api.write_pairs(synthesizer, normals, out, n, seed=0, image_size=image_size)


def _maskgan_pairs(
    data: Path,
    normals: Path,
    out: Path,
    n: int,
    *,
    image_size: int,
    per_class: int,
    epochs: int,
    device: str,
    progress: bool,
) -> None:
    """``n`` MaskGAN pairs on the reviewed normals, from a MaskGAN trained on the exported
    reviewed defects (``epochs`` epochs; minutes per epoch on a CPU)."""
    from defectlab import api

    # the default discriminators (3 scales of 4 layers) need 128 px: fewer for smaller images
    scales, layers = next(
        (
            (s, d)
            for s, d in ((3, 4), (2, 4), (2, 3), (1, 3), (1, 2))
            if min_image_size(d, s) <= image_size
        ),
        (1, 2),
    )
    run = out.parent / "maskgan-run"
    if run.exists():
        shutil.rmtree(run)
    api.train(
        "maskgan",
        data,
        run,
        image_size=image_size,
        device=device,
        seed=0,
        overrides=[
            f"epochs={epochs}",
            f"data.defects_per_class={per_class}",
            f"disc_scales={scales}",
            f"disc_layers={layers}",
        ],
        progress=progress,
    )
    api.synthesize(
        "maskgan", normals, out, n, run=run, seed=0, image_size=image_size, progress=progress
    )


def train_segmenter(
    files: Path,
    parts: list[Reviewed],
    out: Path,
    *,
    image_size: int,
    epochs: int,
    device: str,
    progress: bool,
    synthesis: tuple[str, ...] = ("procedural", "copy-paste"),
    maskgan_epochs: int = 20,
) -> Path:
    """Train a Lite0 U-Net on the reviewed training side (every reviewed defect with a mask
    trains; the reviewed normals split as usual), with synthetic defects on those normals as
    extra pairs: ``max(20, 4 × the largest class)`` pairs shared equally by the
    ``synthesis`` sources — ``procedural`` painting, ``copy-paste`` of the reviewed defects'
    own mask components, ``maskgan`` (a MaskGAN trained on the reviewed defects first;
    off by default because its training costs more than the U-Net's on a CPU). Returns the
    run folder."""
    from defectlab import api

    unknown = sorted(set(synthesis) - set(SYNTHESIS))
    if unknown:
        raise DataError(f"synthesis: unknown {', '.join(unknown)}; choose from {SYNTHESIS}")
    data = out / "reviewed-data"
    counts = export_dataset(files, parts, data)
    if counts.get("normal", 0) < 2:
        raise DataError(
            "training a segmenter needs at least 2 reviewed normal parts outside the hold-out "
            "(review some of the audit sample)"
        )
    per_class = max(v for k, v in counts.items() if k != "normal")  # every reviewed defect
    total = max(20, 4 * per_class)
    normals = [(p, read_image(p, 1)) for p in sorted((data / "normal").glob("*.png"))]
    pair_folders = []
    for i, method in enumerate(synthesis):
        n = total // len(synthesis) + (i < total % len(synthesis))
        folder = out / method
        if folder.exists():
            shutil.rmtree(folder)
        if method == "procedural":
            api.synthesize(
                "procedural",
                data / "normal",
                folder,
                n=n,
                seed=0,
                image_size=image_size,
                progress=progress,
            )
        elif method == "copy-paste":
            _copy_paste_pairs(data, normals, folder, n, image_size)
        else:
            _maskgan_pairs(
                data,
                data / "normal",
                folder,
                n,
                image_size=image_size,
                per_class=per_class,
                epochs=maskgan_epochs,
                device=device,
                progress=progress,
            )
        pair_folders.append(str(folder))
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
            *([f"data.extra_pairs={','.join(pair_folders)}"] if pair_folders else []),
        ],
        progress=progress,
    )
    return run


def choose_fusion(
    files: Path,
    parts: list[Reviewed],
    detector: Inspector,
    segmenter: Inspector,
    level: tuple[float, float],
) -> dict[str, Any]:
    """For every fusion of :data:`~defectlab.components.fusion.MAP_FUSIONS`: the detector's
    and the segmenter's maps on ``parts`` (defects with corrected masks and normals), fused,
    and the Dice-optimal pixel threshold over them. Returns the fusion with the highest
    Dice (the first on a tie), its threshold, and every fusion's Dice."""
    keep = [p for p in parts if p.label == 0 or p.mask_file]
    detector_out = _score_parts(detector, keep)
    segmenter_out = _score_parts(segmenter, keep)
    masks = [_mask(files, p, heat.shape) for p, (_, heat) in zip(keep, detector_out, strict=True)]
    flat_masks = np.concatenate([m.ravel() for m in masks]).reshape(1, 1, -1)
    median, threshold = level
    results = {}
    for fusion in MAP_FUSIONS:
        fused = [
            fuse_maps(
                torch.from_numpy(d.astype(np.float32)),
                torch.from_numpy(s.astype(np.float32)),
                fusion,
                median,
                threshold,
            ).numpy()
            for (_, d), (_, s) in zip(detector_out, segmenter_out, strict=True)
        ]
        flat = np.concatenate([f.ravel() for f in fused]).reshape(1, 1, -1)
        dice, pixel_threshold = best_dice_threshold(flat_masks, flat)
        results[fusion] = {"dice": float(dice), "pixel_threshold": float(pixel_threshold)}
    best = max(MAP_FUSIONS, key=lambda f: (results[f]["dice"], -MAP_FUSIONS.index(f)))
    return {
        "fusion": best,
        "pixel_threshold": results[best]["pixel_threshold"],
        "dice": results[best]["dice"],
        "candidates": results,
        "n_parts": len(keep),
        "n_masks": sum(p.label for p in keep),
    }


def build_fused_run(
    detector_run: Path,
    segmenter_run: Path,
    data: Path,
    out: Path,
    *,
    fusion: str,
    image_threshold: float,
    pixel_threshold: float,
    device: str,
    progress: bool,
) -> Path:
    """The ``fused`` run: the detector's image score, its map fused with the segmenter's
    probability as ``fusion`` says, deciding at the given thresholds. It scores images as
    the detector run does (its image size, channels and tiling); ``data`` (the exported
    reviewed data) only gives it a split and the normal map median of its display range."""
    from defectlab import api
    from defectlab.runs import load_run

    detector = load_run(detector_run, "cpu").config.data
    if out.exists():
        shutil.rmtree(out)
    api.train(
        "fused",
        data,
        out,
        image_size=detector.image_size,
        device=device,
        seed=0,
        overrides=[
            f"detector_run={detector_run}",
            f"segmenter_run={segmenter_run}",
            f"fusion={fusion}",
            f"image_threshold={image_threshold!r}",
            f"pixel_threshold={pixel_threshold!r}",
            f"data.channels={detector.channels}",
            f"data.tile={detector.tile}",
        ],
        progress=progress,
    )
    return out


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
    synthesis: tuple[str, ...] = ("procedural", "copy-paste"),
    maskgan_epochs: int = 20,
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
    candidate = ModelVersion(
        run_dir=str(run_dir),
        model=base.model,
        image_threshold=calibration["image_threshold"],
        pixel_threshold=calibration["pixel_threshold"],
        map_low=base.map_low,
        map_high=base.map_high,
    )
    fusion: dict[str, Any] | None = None
    if enough:
        from defectlab.deploy.backends import torch_inspector

        folder = Path(out) if out else Path(base.run_dir).parent / f"retrained-from-v{base.id}"
        teaching = [
            p for p in train_side if p.label == 0 or (p.mask_file and p.defect_class in qualified)
        ]
        segmenter_run = train_segmenter(
            files,
            teaching,
            folder,
            image_size=segmenter_size,
            epochs=segmenter_epochs,
            device=device,
            progress=progress,
            synthesis=synthesis,
            maskgan_epochs=maskgan_epochs,
        ).resolve()
        detector = torch_inspector(base.run_dir, device)
        level = (
            float(detector.trained.calibration["map_median"]),
            float(detector.trained.pixel_threshold),
        )
        # the hold-out decides; without a reviewed defect mask there, the training side
        judged_on_holdout = any(p.label == 1 and p.mask_file for p in holdout)
        fusion = choose_fusion(
            files,
            holdout if judged_on_holdout else train_side,
            detector,
            torch_inspector(segmenter_run, device),
            level,
        )
        fusion["chosen_on"] = (
            "hold-out"
            if judged_on_holdout
            else "training side (no reviewed defect with a mask in the hold-out)"
        )
        fusion["segmenter_run"] = str(segmenter_run)
        run_dir = build_fused_run(
            Path(base.run_dir),
            segmenter_run,
            folder / "reviewed-data",
            folder / "fused",
            fusion=fusion["fusion"],
            image_threshold=calibration["image_threshold"],
            pixel_threshold=fusion["pixel_threshold"],
            device=device,
            progress=progress,
        ).resolve()
        kind = f"fused ({fusion['fusion']}) with a Lite0 U-Net ({', '.join(qualified)})"
        inspector = torch_inspector(run_dir, device)
        candidate.run_dir = str(run_dir)
        candidate.model = inspector.model
        candidate.pixel_threshold = fusion["pixel_threshold"]
        low, high = inspector.map_range
        candidate.map_low, candidate.map_high = float(low), float(high)
        calibration = calibration | {
            "pixel_threshold": fusion["pixel_threshold"],
            "pixel_threshold_on": fusion["chosen_on"],
        }
        calibration.pop("val_dice", None)  # that was the detector's own map on the training side
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
            + (f"{IN_SAMPLE}" if fusion and fusion["chosen_on"] == "hold-out" else "")
        )
        candidate.metrics = {
            "calibration": calibration,
            "holdout": {f"v{base.id} (current)": current, "new": new},
            "with_masks_per_class": with_masks,
            "min_per_class": min_per_class,
            "trained": kind,
            "fusion": fusion,
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
        f"Dice {fmt(current, 'dice')} → {fmt(new, 'dice')}"
        f"{IN_SAMPLE if fusion and fusion['chosen_on'] == 'hold-out' else ''}, image AUROC "
        f"{fmt(current, 'image_auroc')} → {fmt(new, 'image_auroc')} "
        f"[{time.perf_counter() - started:.0f} s of training and scoring]"
    )
    return {
        "version": new_id,
        "kind": kind,
        "current": current,
        "new": new,
        "calibration": calibration,
        "fusion": fusion,
        "summary": summary,
    }
