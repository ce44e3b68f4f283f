"""Batch inspection of large folders: streaming, batched, resumable.

Memory stays bounded whatever the folder holds: images are decoded a few batches ahead in a
thread pool (:func:`defectlab.data.loading.iter_files`), scored in one model call per batch,
and each result is appended to ``results.jsonl`` as soon as its mask and overlay files are
on disk. So an interrupted call resumes where it stopped: a second call with the same
``out`` skips every image already in ``results.jsonl`` (a half-written last line is
dropped). ``scores.csv`` is rebuilt from ``results.jsonl`` at the end of every call.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from defectlab.data.io import (
    atomic_path,
    atomic_write_text,
    broken_links,
    remove_temporaries,
    write_png,
)
from defectlab.data.loading import iter_files, list_input_images, report_failures
from defectlab.deploy.backends import Inspector, score_images, use_tiles
from defectlab.errors import ConfigError, DataError
from defectlab.evaluate.visualize import heatmap_overlay, mask_outline

RESULTS = "results.jsonl"
SCORES = "scores.csv"
IDENTITY = "inspection.json"
CSV_FIELDS = (
    "path",
    "score",
    "is_defect",
    "defect_area_fraction",
    "width",
    "height",
    "mask",
    "overlay",
)


def output_name(path: Path, root: Path) -> str:
    """A flat, collision-free file name for ``path``: its folders below ``root`` joined by
    ``__`` (images with the same name in different folders stay apart)."""
    relative = path.relative_to(root) if root.is_dir() else Path(path.name)
    return "__".join(relative.with_suffix("").parts)


def _read_results(path: Path) -> Iterator[dict[str, Any]]:
    """Complete rows of a results file; a torn last line (interrupted write) is ignored."""
    if not path.exists():
        return
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                break


def _drop_torn_tail(path: Path) -> None:
    """Cut a results file back to its last complete line before appending to it."""
    if not path.exists():
        return
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with path.open("r+b") as handle:
            handle.truncate(keep)


def _check_identity(out: Path, identity: dict[str, Any]) -> None:
    """Refuse to mix the results of two models (or settings) in one output folder."""
    path = out / IDENTITY
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != identity:
            changed = sorted(k for k in identity if previous.get(k) != identity[k])
            raise ConfigError(
                f"{out} holds results of another inspection (different {', '.join(changed)}); "
                "use a new --out folder or delete it"
            )
    else:
        atomic_write_text(path, json.dumps(identity, indent=2) + "\n")


def _write_scores_csv(out: Path) -> tuple[int, int]:
    """Rebuild ``scores.csv`` from ``results.jsonl`` row by row (bounded memory)."""
    rows = defects = 0
    with atomic_path(out / SCORES) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in _read_results(out / RESULTS):
            writer.writerow(row)
            rows += 1
            defects += int(row["is_defect"])
    return rows, defects


def inspect_folder(
    inspector: Inspector,
    input_path: str | Path,
    out: str | Path,
    *,
    tile: bool | None = None,
    batch_size: int = 16,
    workers: int = 2,
    overlays: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Inspect an image or a folder (recursive) into ``out``.

    Per image: a row in ``results.jsonl`` and ``scores.csv`` (score, decision at the
    calibrated threshold, predicted defect area, size), ``masks/<name>.png`` at the image's
    own size and, with ``overlays``, ``overlays/<name>.png`` (heat map + mask outline).
    Unreadable files are reported, listed in ``skipped.csv`` and skipped. ``tile=None``
    scores as the model was trained (stitched tiles for a run trained on tiles).
    """
    tile = use_tiles(inspector, tile)
    if batch_size < 1 or workers < 1:
        raise ConfigError(f"batch size and workers must be at least 1 ({batch_size}, {workers})")
    input_path, out = Path(input_path), Path(out)
    files = list_input_images(input_path)
    broken = broken_links(input_path) if input_path.is_dir() else []  # named, not skipped mute
    out.mkdir(parents=True, exist_ok=True)
    _check_identity(
        out,
        {
            "input": str(input_path.resolve()),
            "tile": tile,
            **{k: v for k, v in inspector.info().items() if k != "defectlab"},
        },
    )
    results = out / RESULTS
    for folder in (out, out / "masks", out / "overlays"):  # half-written by a killed run
        remove_temporaries(folder)
    _drop_torn_tail(results)
    done = {row["path"] for row in _read_results(results)}
    todo = [p for p in files if str(p) not in done]
    low, high = inspector.map_range
    started = time.perf_counter()
    scored = flagged = 0
    failures: list[tuple[str, str]] = list(broken)

    def write_outputs(path: Path, image: np.ndarray, heat: np.ndarray, mask: np.ndarray) -> None:
        name = output_name(path, input_path)
        write_png(out / "masks" / f"{name}.png", mask.astype(np.uint8) * 255)
        if overlays:
            overlay = mask_outline(heatmap_overlay(image, heat, low, high), mask)
            write_png(out / "overlays" / f"{name}.png", overlay)

    bar = tqdm(
        total=len(files),
        initial=len(files) - len(todo),
        desc=f"inspecting ({inspector.backend})",
        unit="img",
        disable=not progress,
        file=sys.stderr,
    )
    with (
        ThreadPoolExecutor(max_workers=workers) as writers,
        results.open("a", encoding="utf-8") as log,
    ):
        for paths, images, bad in iter_files(todo, inspector.channels, batch_size, workers):
            failures += bad
            outcomes = score_images(inspector, images, tile=tile, batch_size=batch_size)
            rows, pending = [], []
            for path, image, (score, heat) in zip(paths, images, outcomes, strict=True):
                mask = heat >= inspector.pixel_threshold
                pending.append(writers.submit(write_outputs, path, image, heat, mask))
                name = output_name(path, input_path)
                is_defect = int(score >= inspector.image_threshold)
                rows.append(
                    {
                        "path": str(path),
                        "score": float(f"{score:.6g}"),
                        "is_defect": is_defect,
                        "defect_area_fraction": round(float(mask.mean()), 6),
                        "width": image.shape[1],
                        "height": image.shape[0],
                        "mask": f"masks/{name}.png",
                        "overlay": f"overlays/{name}.png" if overlays else "",
                    }
                )
                flagged += is_defect
            for future in pending:  # a row is written only once its files exist
                future.result()
            log.write("".join(json.dumps(row) + "\n" for row in rows))
            log.flush()
            os.fsync(log.fileno())
            scored += len(rows)
            bar.update(len(paths) + len(bad))
            bar.set_postfix(defective=flagged, skipped=len(failures))
    bar.close()
    elapsed = time.perf_counter() - started
    report_failures(failures, len(todo))
    if failures:
        with atomic_path(out / "skipped.csv") as tmp, tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "reason"])
            writer.writerows(failures)
    total, total_defect = _write_scores_csv(out)
    if total == 0:
        raise DataError(f"{input_path}: none of the {len(files)} images could be read")
    return {
        "n_images": scored,
        "n_resumed": len(files) - len(todo),
        "n_total": total,
        "n_defect": total_defect,
        "n_skipped": len(failures),
        "images_per_second": scored / elapsed if elapsed > 0 else 0.0,
        "backend": inspector.backend,
        "out": str(out),
    }
