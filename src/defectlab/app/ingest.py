"""Ingest: score images with a model version and store every result in the database.

Idempotent by image content: an image (SHA-256 of its bytes) already inspected by the
version is not scored again, wherever it lies. Resumable: each batch is committed in one
transaction after its mask and heat-map files are on disk, so a killed ingest loses at most
the batch in flight and a rerun goes on from there, with no duplicates.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from tqdm import tqdm

from defectlab.app.db import Database, Image, Inspection, ModelVersion, Skipped
from defectlab.data.io import atomic_write, write_png
from defectlab.data.loading import iter_files, list_input_images
from defectlab.deploy.backends import Inspector, open_inspector, score_images
from defectlab.errors import ConfigError

#: heat maps are stored with their long side at most this (they steer display and
#: recalibration; masks keep the image's full size)
HEATMAP_MAX_SIDE = 512
#: one passed part in this many (by hash, so stable) joins the audit sample
AUDIT_EVERY = 10


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_audit(sha: str) -> bool:
    return int(sha[:8], 16) % AUDIT_EVERY == 0


def register_version(
    db: Database, run_dir: str | Path, inspector: Inspector | None = None, device: str = "cpu"
) -> ModelVersion:
    """The database's version for ``run_dir`` with its stored thresholds; the first one
    registered becomes the active version."""
    run_dir = Path(run_dir).resolve()
    inspector = inspector or open_inspector(run_dir, "torch", device)
    with db.transaction() as session:
        existing = session.scalars(
            select(ModelVersion)
            .where(ModelVersion.run_dir == str(run_dir), ModelVersion.parent_id.is_(None))
            .order_by(ModelVersion.id)
        ).first()
        if existing is not None:
            return existing
        low, high = inspector.map_range
        has_active = db.active_version(session) is not None
        metrics: dict[str, Any] = {}
        metrics_file = run_dir / "metrics.json"
        if metrics_file.is_file():
            import json

            metrics = {"training": json.loads(metrics_file.read_text())}
        version = ModelVersion(
            run_dir=str(run_dir),
            model=inspector.model,
            image_threshold=float(inspector.image_threshold),
            pixel_threshold=float(inspector.pixel_threshold),
            map_low=float(low),
            map_high=float(high),
            status="candidate" if has_active else "active",
            metrics=metrics,
            note="registered from the run",
        )
        session.add(version)
        session.flush()
        return version


def version_inspector(version: ModelVersion, device: str = "cpu") -> Inspector:
    """The run's inspector deciding with the version's thresholds (a recalibrated version
    shares its run's weights)."""
    inspector = open_inspector(version.run_dir, "torch", device)
    inspector.image_threshold = version.image_threshold
    inspector.pixel_threshold = version.pixel_threshold
    return inspector


def _small(heat: np.ndarray) -> np.ndarray:
    h, w = heat.shape
    scale = HEATMAP_MAX_SIDE / max(h, w)
    if scale < 1:
        heat = cv2.resize(
            heat, (max(1, round(w * scale)), max(1, round(h * scale))), cv2.INTER_AREA
        )
    return heat.astype(np.float16)


def store_result(
    session: Session,
    files: Path,
    version: ModelVersion,
    *,
    path: str,
    sha: str,
    size_bytes: int,
    image: np.ndarray,
    score: float,
    heat: np.ndarray,
    source: str = "folder",
) -> Inspection | None:
    """Write the mask and heat-map files, then add the image (if new) and its inspection
    to ``session``; ``None`` when this version already inspected these bytes."""
    record = session.scalars(select(Image).where(Image.sha256 == sha)).first()
    if record is not None:
        done = session.scalars(
            select(Inspection).where(
                Inspection.image_id == record.id, Inspection.model_version_id == version.id
            )
        ).first()
        if done is not None:
            return None
    mask = heat >= version.pixel_threshold
    relative = Path(f"v{version.id}") / sha[:2]
    mask_file, heat_file = relative / f"{sha}-mask.png", relative / f"{sha}-heat.npy"
    write_png(files / mask_file, mask.astype(np.uint8) * 255)
    small = _small(heat)
    atomic_write(files / heat_file, lambda tmp: np.save(tmp, small))
    if record is None:
        record = Image(
            sha256=sha,
            path=path,
            width=int(image.shape[1]),
            height=int(image.shape[0]),
            size_bytes=size_bytes,
            source=source,
        )
        session.add(record)
        session.flush()
    is_defect = bool(score >= version.image_threshold)
    inspection = Inspection(
        image_id=record.id,
        model_version_id=version.id,
        score=float(score),
        is_defect=is_defect,
        defect_area=round(float(mask.mean()), 6),
        mask_file=str(mask_file),
        heatmap_file=str(heat_file),
        audit=not is_defect and is_audit(sha),
    )
    session.add(inspection)
    session.flush()
    return inspection


def ingest_folder(
    db: Database,
    version: ModelVersion,
    input_path: str | Path,
    files: Path,
    *,
    inspector: Inspector | None = None,
    batch_size: int = 16,
    workers: int = 2,
    progress: bool = True,
    on_progress: Callable[[int, int], Any] | None = None,
) -> dict[str, Any]:
    """Inspect every image under ``input_path`` with ``version`` into the database;
    ``on_progress(done, total)`` follows it (the app's progress bar)."""
    return ingest_paths(
        db,
        version,
        list_input_images(Path(input_path)),
        files,
        inspector=inspector,
        batch_size=batch_size,
        workers=workers,
        progress=progress,
        on_progress=on_progress,
    )


def ingest_paths(
    db: Database,
    version: ModelVersion,
    paths: Sequence[Path],
    files: Path,
    *,
    inspector: Inspector | None = None,
    batch_size: int = 16,
    workers: int = 2,
    progress: bool = True,
    on_progress: Callable[[int, int], Any] | None = None,
) -> dict[str, Any]:
    """Inspect these image files with ``version`` into the database (see the module)."""
    if batch_size < 1 or workers < 1:
        raise ConfigError(f"batch size and workers must be at least 1 ({batch_size}, {workers})")
    inspector = inspector or version_inspector(version)
    started = time.perf_counter()
    hashes: dict[Path, str] = {}
    failures: list[tuple[str, str]] = []
    for path in paths:
        try:
            hashes[path] = sha256_file(path)
        except OSError as exc:
            failures.append((str(path), exc.strerror or str(exc)))
    with db.sessions() as session:
        done = set(
            session.scalars(
                select(Image.sha256)
                .join(Inspection, Inspection.image_id == Image.id)
                .where(Inspection.model_version_id == version.id)
            )
        )
    todo: list[Path] = []
    seen: set[str] = set(done)
    for path, sha in hashes.items():
        if sha not in seen:
            seen.add(sha)
            todo.append(path)
    bar = tqdm(
        total=len(paths),
        initial=len(paths) - len(todo),
        desc=f"inspecting (version {version.id})",
        unit="img",
        disable=not progress,
        file=sys.stderr,
    )
    added = flagged = 0
    finished = len(paths) - len(todo)  # tqdm counts nothing when disabled
    if on_progress:
        on_progress(finished, len(paths))
    for batch_paths, images, bad in iter_files(todo, inspector.channels, batch_size, workers):
        failures += bad
        outcomes = score_images(inspector, images, batch_size=batch_size)
        with db.transaction() as session:
            for path, image, (score, heat) in zip(batch_paths, images, outcomes, strict=True):
                try:
                    with session.begin_nested():
                        row = store_result(
                            session,
                            files,
                            version,
                            path=str(path.resolve()),
                            sha=hashes[path],
                            size_bytes=path.stat().st_size,
                            image=image,
                            score=score,
                            heat=heat,
                        )
                except IntegrityError:  # another ingest stored the same bytes meanwhile
                    row = None
                if row is not None:
                    added += 1
                    flagged += int(row.is_defect)
        bar.update(len(batch_paths) + len(bad))
        finished += len(batch_paths) + len(bad)
        if on_progress:
            on_progress(finished, len(paths))
        bar.set_postfix(flagged=flagged, skipped=len(failures))
    bar.close()
    record_failures(db, failures)
    return {
        "n_files": len(paths),
        "n_inspected": added,
        "n_flagged": flagged,
        "n_already": len(hashes) - len(todo),
        "n_skipped": len(failures),
        "seconds": time.perf_counter() - started,
    }


def record_failures(db: Database, failures: Sequence[tuple[str, str]]) -> None:
    """Remember unreadable files and why (a file named again updates its reason)."""
    if not failures:
        return
    with db.transaction() as session:
        for path, reason in failures:
            row = session.scalars(select(Skipped).where(Skipped.path == str(path))).first()
            if row is None:
                session.add(Skipped(path=str(path), reason=str(reason)[:512]))
            else:
                row.reason = str(reason)[:512]
