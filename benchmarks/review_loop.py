"""Simulated review session on magnetic tile: does reviewing the parts a normal-only model
flags, then retraining from those reviews, make a better model?

A script replays the dataset's real labels as the reviewer's decisions (verdict, class, the
real mask as the corrected mask). Split "MT-review-loop v1" (seed 0, stems sorted, then
``default_rng(0).permutation``): MT_Free → first 466 train the normal-only model, next 200 join
the stream, last 286 are test normals (the test normals of MT-normal-only v1); each defect class
→ first half to the stream, second half to the test. The stream is inspected into a workbench
database; for N in (10, 20, 40) the reviewer reviews the top-N flagged stream parts (by score)
plus the first ``--audit`` parts of the audit sample, then ``retrain`` runs from the normal-only
model. Every version is measured on the fixed test part, which no step touches.

    .venv/bin/python benchmarks/review_loop.py --write-docs
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from _common import (
    DEFAULT_DATA,
    add_write_docs,
    fmt_number,
    job_rows,
    markdown_table,
    write_section,
)
from sqlalchemy import delete, select

from defectlab import api
from defectlab.app.db import Database, Image, Inspection, ModelVersion, Review
from defectlab.app.ingest import ingest_folder, register_version, version_inspector
from defectlab.app.retrain import retrain
from defectlab.components.fusion import MAP_FUSIONS
from defectlab.data.io import read_image, read_mask, write_png
from defectlab.deploy.backends import score_images
from defectlab.evaluate.metrics import auroc, dice_iou, pixel_auroc

CLASSES = ("Blowhole", "Break", "Crack", "Fray", "Uneven")
#: the segmenter's synthetic pairs by default (retrain's default); MaskGAN is a setting
SYNTHESIS_DEFAULT = "procedural,copy-paste"


def shuffled(paths: list[Path]) -> list[Path]:
    paths = sorted(paths, key=lambda p: p.stem)
    return [paths[i] for i in np.random.default_rng(0).permutation(len(paths))]


def link_all(paths: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        (folder / path.name).symlink_to(path.resolve())


def split(data: Path) -> dict[str, Any]:
    normals = shuffled(list((data / "MT_Free" / "Imgs").glob("*.jpg")))
    stream_defects, test_defects = [], []
    for cls in CLASSES:
        files = shuffled(list((data / f"MT_{cls}" / "Imgs").glob("*.jpg")))
        half = len(files) // 2
        stream_defects += files[:half]
        test_defects += files[half:]
    return {
        "train": normals[:466],
        "stream": normals[466:666] + stream_defects,
        "test_normal": normals[666:],
        "test_defect": test_defects,
    }


def truth_of(path: Path) -> tuple[str, np.ndarray | None]:
    """(class or 'normal', mask or None) from the dataset's own layout."""
    cls = path.resolve().parent.parent.name.removeprefix("MT_")
    if cls == "Free":
        return "normal", None
    return cls, read_mask(path.resolve().with_suffix(".png"))


def measure(version: ModelVersion, test: list[Path], batch: int = 16) -> dict[str, Any]:
    """Image AUROC, pixel AUROC and micro Dice at the version's thresholds on ``test``, and
    the micro Dice over each defect class's test images (``dice_<class>``): a segmenter
    trained on the reviewed classes can only help on those."""
    inspector = version_inspector(version)
    labels, scores, masks, maps, classes = [], [], [], [], []
    for start in range(0, len(test), batch):
        chunk = test[start : start + batch]
        images = [read_image(p, inspector.channels) for p in chunk]
        for path, (score, heat) in zip(chunk, score_images(inspector, images), strict=True):
            cls, mask = truth_of(path)
            labels.append(int(cls != "normal"))
            classes.append(cls)
            scores.append(score)
            masks.append((mask if mask is not None else np.zeros(heat.shape, bool)).ravel())
            maps.append(heat.astype(np.float32).ravel())

    def dice_over(keep: list[int]) -> float:
        flat_masks = np.concatenate([masks[i] for i in keep]).reshape(1, 1, -1)
        flat_maps = np.concatenate([maps[i] for i in keep]).reshape(1, 1, -1)
        return dice_iou(flat_masks, flat_maps >= version.pixel_threshold)[0]

    flat_masks = np.concatenate(masks).reshape(1, 1, -1)
    flat_maps = np.concatenate(maps).reshape(1, 1, -1)
    by_class = {
        f"dice_{cls}": dice_over([i for i, c in enumerate(classes) if c == cls])
        for cls in CLASSES
        if cls in classes
    }
    return {
        "image_auroc": auroc(labels, scores),
        "pixel_auroc": pixel_auroc(flat_masks, flat_maps),
        "dice": dice_over(list(range(len(classes)))),
        **by_class,
        "image_threshold": version.image_threshold,
    }


def review(db: Database, files: Path, n: int, audit: int) -> dict[str, int]:
    """The reviewer: top-n flagged stream parts of the base version, plus audit parts."""
    with db.sessions() as session:
        base = db.active_version(session)
        rows = session.execute(
            select(Inspection, Image)
            .join(Image, Image.id == Inspection.image_id)
            .where(Inspection.model_version_id == base.id)
            .order_by(Inspection.score.desc())
        ).all()
    flagged = [r for r in rows if r[0].is_defect][:n]
    audited = [r for r in rows if r[0].audit][:audit]
    counts = {"defect": 0, "normal": 0}
    with db.transaction() as session:
        done = set(session.scalars(select(Review.image_id)))
        for _, image in flagged + audited:
            if image.id in done:
                continue
            done.add(image.id)
            cls, mask = truth_of(Path(image.path))
            mask_file = ""
            if mask is not None:
                mask_file = f"reviews/{image.sha256}.png"
                write_png(files / mask_file, mask.astype(np.uint8) * 255)
            session.add(
                Review(
                    image_id=image.id,
                    verdict="normal" if mask is None else "defect",
                    defect_class="" if mask is None else cls,
                    mask_file=mask_file,
                    reviewer="replay",
                )
            )
    with db.sessions() as session:
        for verdict in counts:
            counts[verdict] = len(
                session.scalars(select(Review.id).where(Review.verdict == verdict)).all()
            )
    return counts


def round_copy(work: Path, n: int) -> tuple[Database, Path]:
    """Round ``n``'s own database and files: copies of the inspected stream before any review
    (so rounds are independent and may run at once; reviews of N include those of smaller N
    anyway, since the reviewer takes the top-N of the same base scores)."""
    folder = work / f"N{n}"
    folder.mkdir(parents=True, exist_ok=True)
    db_file = folder / "workbench.db"
    db_file.unlink(missing_ok=True)
    source = sqlite3.connect(work / "workbench.db")
    target = sqlite3.connect(db_file)
    source.backup(target)
    source.close()
    target.close()
    files = folder / "workbench-files"
    shutil.rmtree(files, ignore_errors=True)
    shutil.copytree(work / "workbench-files", files)
    return Database(f"sqlite:///{db_file.resolve()}"), files


def run_round(args: argparse.Namespace, n: int, test: list[Path]) -> dict[str, Any]:
    """Review the top-``n`` flagged parts plus the audit parts, retrain, measure on ``test``."""
    work = Path(args.work)
    db, files = round_copy(work, n)
    counts = review(db, files, n, args.audit)
    started = time.perf_counter()
    result = retrain(
        db,
        files,
        from_run=work / "base",
        out=work / f"N{n}" / "retrain",
        min_per_class=args.k,
        segmenter_epochs=args.epochs,
        segmenter_size=args.image_size,
        synthesis=tuple(m for m in args.synthesis.split(",") if m),
        maskgan_epochs=args.maskgan_epochs,
    )
    seconds = time.perf_counter() - started
    print(result["summary"], file=sys.stderr, flush=True)
    with db.sessions() as session:
        version = session.get(ModelVersion, result["version"])
    fusion = result["fusion"] or {}
    candidates = fusion.get("candidates", {})
    row = {
        "n": n,
        "reviewed": f"{counts['defect']} defects, {counts['normal']} normals",
        "kind": result["kind"],
        "fusion": fusion.get("fusion", "none"),
        "holdout": f"{fusion.get('n_masks', 0)} of {fusion.get('n_parts', 0)}" if fusion else "n/a",
        **{f"holdout_{name}": candidates.get(name, {}).get("dice") for name in MAP_FUSIONS},
        "retrain_seconds": round(seconds),
        **measure(version, test),
    }
    db.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--work", default="runs/review-loop")
    parser.add_argument("--model", default="patchmemory", help="the normal-only model")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--n", type=int, nargs="+", default=[10, 20, 40])
    parser.add_argument("--audit", type=int, default=30, help="audit-sample parts reviewed")
    parser.add_argument("--k", type=int, default=3, help="masks a class needs to train the U-Net")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument(
        "--synthesis",
        default=SYNTHESIS_DEFAULT,
        help="the segmenter's synthetic defects (retrain --synthesis); maskgan is slow on a CPU",
    )
    parser.add_argument("--maskgan-epochs", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=1, help="rounds run at once, as child jobs")
    parser.add_argument("--round", type=int, help=argparse.SUPPRESS)  # a child job: one round
    add_write_docs(parser, "review_loop")
    args = parser.parse_args()
    work = Path(args.work)
    data = Path(args.data)
    if not data.is_dir():
        sys.exit(f"{data}: magnetic tile not found (see ../shared/data/README.md)")
    parts = split(data)
    test = parts["test_normal"] + parts["test_defect"]
    if args.round is not None:  # a child job: its row as one JSON line
        print(json.dumps(run_round(args, args.round, test)), flush=True)
        return
    base_data = work / "base-data"
    if not (work / "base" / "model.pt").exists():
        shutil.rmtree(base_data, ignore_errors=True)
        link_all(parts["train"], base_data / "normal")
        api.train(args.model, base_data, work / "base", image_size=args.image_size, seed=0)
    if not (work / "stream").exists():
        link_all(parts["stream"], work / "stream")
    db_file = work / "workbench.db"
    db = Database(f"sqlite:///{db_file.resolve()}")
    files = work / "workbench-files"
    base = register_version(db, work / "base")
    ingest_folder(db, base, work / "stream", files)
    with db.transaction() as session:  # a rerun starts again from no reviews
        session.execute(delete(Review))
        later = select(ModelVersion.id).where(ModelVersion.id != base.id)
        session.execute(delete(Inspection).where(Inspection.model_version_id.in_(later)))
        session.execute(delete(ModelVersion).where(ModelVersion.id != base.id))

    def child_command(n: int) -> list[str]:
        command = [sys.executable, __file__, "--round", str(n)]
        for key in ("data", "work", "model", "image_size", "audit", "k", "epochs"):
            command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        command += ["--synthesis", args.synthesis, "--maskgan-epochs", str(args.maskgan_epochs)]
        return command

    started = time.perf_counter()
    todo = sorted(args.n, reverse=True)  # the longest round first
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        if args.jobs > 1:  # rounds as child jobs, while this process measures the base
            futures = {n: pool.submit(job_rows, child_command(n), f"N={n}") for n in todo}
        rows = [
            {
                "n": 0,
                "reviewed": "none",
                "kind": f"{args.model} (normal-only)",
                "fusion": "n/a",
                "holdout": "n/a",
                **measure(base, test),
            }
        ]
        print(rows[-1], file=sys.stderr, flush=True)
        if args.jobs > 1:
            found = {n: got[0] for n, f in futures.items() if (got := f.result())}
        else:
            found = {n: run_round(args, n, test) for n in todo}
    missing = [n for n in args.n if n not in found]
    if missing:
        sys.exit(f"rounds N={missing} failed; see the messages above")
    rows += [found[n] for n in sorted(found)]
    columns = [
        ("n", "top-N flagged reviewed", str),
        ("reviewed", "reviews (with audit)", str),
        ("kind", "new version", str),
        ("fusion", "map (hold-out choice)", str),
        ("holdout", "hold-out: defects with masks of parts", str),
        *((f"holdout_{name}", f"hold-out Dice, {name}", fmt_number()) for name in MAP_FUSIONS),
        ("image_auroc", "image AUROC", fmt_number()),
        ("pixel_auroc", "pixel AUROC", fmt_number()),
        ("dice", "Dice at its threshold", fmt_number()),
        ("retrain_seconds", "retrain s", fmt_number()),
    ]
    table = markdown_table(rows, columns)
    class_columns = [
        ("n", "top-N flagged reviewed", str),
        ("kind", "new version", str),
        *((f"dice_{cls}", f"Dice, {cls}", fmt_number()) for cls in CLASSES),
    ]
    table += "\n\nDice at each version's threshold over each defect class's test images:\n\n"
    table += markdown_table(rows, class_columns)
    print(table)
    print(f"review loop: {len(args.n)} rounds in {time.perf_counter() - started:.0f} s")
    for row in rows[1:]:
        print(f"N={row['n']}: {row['kind']}", file=sys.stderr)
    # the default synthesis owns the main section; another one gets its own
    variant = title = ""
    if args.synthesis != SYNTHESIS_DEFAULT:
        variant = "-" + (args.synthesis.replace(",", "+") or "no-synthesis")
        title = f", synthesis {args.synthesis or 'none'}"
    maskgan = (
        f"; MaskGAN trained {args.maskgan_epochs} epochs on the same reviewed defects first"
        if "maskgan" in args.synthesis
        else ""
    )
    if args.write_docs:
        write_section(
            args.write_docs,
            f"review-loop-{args.model}-{args.image_size}{variant}",
            f"Magnetic tile, review loop from {args.model} at {args.image_size} px{title}",
            table,
            notes=(
                f"Split MT-review-loop v1 (see the script): test = {len(parts['test_normal'])} "
                f"normals + {len(parts['test_defect'])} defects, never reviewed nor trained on. "
                f"Each round reviews the top-N flagged stream parts plus {args.audit} audit "
                f"parts with their real labels and masks; one review in 4 is the retrain's own "
                f"hold-out. A Lite0 U-Net ({args.epochs} epochs) trains on the classes with "
                f"{args.k} masks or more outside that hold-out, with synthetic defects on the "
                f"reviewed normals ({args.synthesis or 'none'}: max(20, 4 × the largest "
                f"class) pairs shared equally{maskgan}); with no such class, the thresholds are "
                "recalibrated only. The new version is a `fused` run: the normal-only "
                "model's image score with the image threshold recalibrated on the reviews, "
                "and a map fused from the U-Net's probability and the detector's map; the "
                "fusion and its pixel threshold are those with the highest Dice on the "
                "retrain's own hold-out (the hold-out Dice columns, each at its Dice-optimal "
                "threshold, so in-sample), never on the test part. Image and pixel AUROC "
                "and Dice are on the test part; pixel metrics on each mask's native grid. "
                "Retrain s: wall time of the retrain (training, choice, inspecting the stream "
                f"again), {max(1, args.jobs)} round(s) at once. Seed 0."
            ),
            page_title="Review loop",
        )


if __name__ == "__main__":
    main()
