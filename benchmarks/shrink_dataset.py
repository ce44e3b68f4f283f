"""Write a copy of a dataset folder with every image shrunk to at most ``--max-side`` pixels on
its long side, keeping the folder layout and file names (so layout detection still works).

Why: a remote GPU machine may take only a small upload (the GPU runs in docs/results moved
magnetic tile as a 28 MB copy at 256 px, since the benchmarks train at 128 px anyway).
Masks (files whose path relative to the source matches ``--masks``) are resized with nearest
neighbour, so thresholding them later gives the same answer as before; other images with
area averaging. Every image is re-encoded (JPEGs at quality 95), also one already small
enough; non-image files are copied unchanged.

    .venv/bin/python benchmarks/shrink_dataset.py ../shared/data/magnetic-tile \\
        .devdata/magnetic-tile --max-side 256 --masks '*.png'
"""

from __future__ import annotations

import argparse
import fnmatch
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

from defectlab.data.io import IMAGE_EXTENSIONS


def shrink(image: np.ndarray, max_side: int, is_mask: bool) -> np.ndarray:
    """``image`` scaled so its long side is at most ``max_side``."""
    h, w = image.shape[:2]
    scale = max_side / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_NEAREST if is_mask else cv2.INTER_AREA)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path)
    parser.add_argument("target", type=Path)
    parser.add_argument("--max-side", type=int, default=256)
    parser.add_argument(
        "--masks", default="*mask*", help="glob (on the relative path) naming the mask files"
    )
    args = parser.parse_args()
    if not args.source.is_dir():
        parser.error(f"{args.source}: not a folder")
    if args.max_side < 8:
        parser.error("--max-side must be at least 8")
    files = sorted(p for p in args.source.rglob("*") if p.is_file())
    if not files:
        parser.error(f"{args.source}: empty folder")
    failed = []
    for path in files:
        out = args.target / path.relative_to(args.source)
        out.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            shutil.copy2(path, out)
            continue
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            failed.append(path)
            print(f"skipped {path}: not a readable image", file=sys.stderr)
            continue
        params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.suffix.lower() in {".jpg", ".jpeg"} else []
        is_mask = fnmatch.fnmatch(path.relative_to(args.source).as_posix(), args.masks)
        cv2.imwrite(str(out), shrink(image, args.max_side, is_mask), params)
    print(f"wrote {len(files) - len(failed)} files to {args.target} ({len(failed)} skipped)")


if __name__ == "__main__":
    main()
