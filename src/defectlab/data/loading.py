"""Load samples into arrays, reporting and skipping files that cannot be read.

Decoding runs in a thread pool (OpenCV releases the GIL), so a folder loads on every core.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from defectlab.data.io import IMAGE_EXTENSIONS, ImageReadError, read_image, read_mask
from defectlab.data.layouts import Sample, is_mask_name
from defectlab.data.transforms import resize_image, resize_mask
from defectlab.errors import DataError


@dataclass
class LoadedImages:
    """Images (N, H, W, C) float32 in [0, 1], masks (N, H, W) bool, the samples kept, and
    the files that were skipped with the reason."""

    images: np.ndarray
    masks: np.ndarray
    samples: list[Sample]
    original_sizes: list[tuple[int, int]]
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def labels(self) -> np.ndarray:
        return np.array([s.label for s in self.samples], dtype=np.int64)


def _load_one(
    sample: Sample, size: int, channels: int, mask_threshold: int
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    image = read_image(sample.path, channels)
    original = image.shape[:2]
    if sample.mask_path is not None:
        mask = read_mask(sample.mask_path, mask_threshold)
        if mask.shape != original:
            raise DataError(
                f"{sample.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                f"{sample.path} is {original[1]}x{original[0]}"
            )
        mask = resize_mask(mask, size)
    else:
        mask = np.zeros((size, size), dtype=bool)
    return resize_image(image, size), mask, original


#: mean spread between an image's colour channels (max − min per pixel, averaged) at which
#: it counts as colour: a grey picture stored as RGB decodes to equal channels (spread 0)
COLOUR_SPREAD = 1.0 / 255
#: training images inspected by :func:`choose_channels` (spread evenly over the list)
CHANNEL_PROBE_IMAGES = 64


@dataclass(frozen=True)
class ChannelChoice:
    """The channel count chosen for ``data.channels=auto`` and why."""

    channels: int
    reason: str


def colour_spread(image: np.ndarray) -> float:
    """Mean over pixels of the spread between the colour channels of an (H, W, C) image in
    [0, 1]; 0 for a single-channel image or one whose channels are equal."""
    if image.ndim != 3 or image.shape[2] < 3:
        return 0.0
    rgb = image[:, :, :3]
    return float((rgb.max(axis=2) - rgb.min(axis=2)).mean())


def choose_channels(
    paths: Sequence[Path | str], max_images: int = CHANNEL_PROBE_IMAGES, workers: int = 2
) -> ChannelChoice:
    """``data.channels=auto``: 3 (RGB) when at least half of up to ``max_images`` of
    ``paths`` (spread evenly) are colour (:data:`COLOUR_SPREAD`), else 1 (grey).

    Colour carries information a grey conversion throws away, and grey images gain nothing
    from three equal channels but cost three times the input; unreadable files are left out
    (loading reports them)."""
    paths = list(paths)
    step = max(1, len(paths) // max(1, max_images))
    probe = paths[::step][:max_images]

    def spread(path: Path | str) -> float | None:
        try:
            return colour_spread(read_image(path, 3))
        except ImageReadError:
            return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        spreads = [v for v in pool.map(spread, probe) if v is not None]
    if not spreads:
        return ChannelChoice(1, "no training image could be read to tell colour from grey: grey")
    colour = sum(v >= COLOUR_SPREAD for v in spreads)
    rule = f"mean channel spread >= {COLOUR_SPREAD * 255:g}/255"
    if 2 * colour >= len(spreads):
        return ChannelChoice(
            3, f"{colour} of {len(spreads)} training images checked are colour ({rule}): RGB"
        )
    return ChannelChoice(
        1, f"{colour} of {len(spreads)} training images checked are colour ({rule}): grey"
    )


def report_failures(failures: Sequence[tuple[str, str]], total: int) -> None:
    """Print skipped files and a one-line summary to stderr."""
    for path, reason in failures[:20]:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if len(failures) > 20:
        print(f"... and {len(failures) - 20} more unreadable files", file=sys.stderr)
    if failures:
        print(f"{len(failures)} of {total} files skipped as unreadable", file=sys.stderr)


def load_samples(
    samples: Sequence[Sample],
    size: int,
    channels: int | str = 1,
    mask_threshold: int = 127,
    workers: int = 2,
    desc: str = "loading",
    progress: bool = True,
) -> LoadedImages:
    """Read, resize and stack samples. Unreadable images are skipped and reported; a mask that
    does not fit its image is an error (it means the labels are wrong, not the file).

    ``channels="auto"`` decides from these samples (:func:`choose_channels`); a run decides
    once, from its training images, and loads every split with the resolved count."""
    if not samples:
        raise DataError(f"{desc}: no images to load")
    if channels == "auto":
        channels = choose_channels([s.path for s in samples], workers=workers).channels
    if channels not in (1, 3):
        raise ValueError(f"channels must be 'auto', 1 or 3, got {channels!r}")
    depth = int(channels)
    results: list = [None] * len(samples)
    failures: list[tuple[str, str]] = []

    def task(i: int) -> None:
        try:
            results[i] = _load_one(samples[i], size, depth, mask_threshold)
        except ImageReadError as exc:
            if samples[i].mask_path is not None and exc.path == str(samples[i].mask_path):
                raise
            failures.append((exc.path, exc.reason))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(
            tqdm(
                pool.map(task, range(len(samples))),
                total=len(samples),
                desc=desc,
                disable=not progress,
                leave=False,
                file=sys.stderr,
            )
        )
    kept = [i for i, r in enumerate(results) if r is not None]
    report_failures(sorted(failures), len(samples))
    if not kept:
        raise DataError(f"{desc}: none of the {len(samples)} images could be read")
    return LoadedImages(
        images=np.stack([results[i][0] for i in kept]),
        masks=np.stack([results[i][1] for i in kept]),
        samples=[samples[i] for i in kept],
        original_sizes=[results[i][2] for i in kept],
        failures=sorted(failures),
    )


def list_input_images(path: Path) -> list[Path]:
    """The image file ``path``, or every image under the folder ``path`` (recursive, sorted)
    except masks: ``<stem>_mask.*`` files, and a PNG beside a same-stem JPEG/TIFF/BMP (the
    magnetic-tile convention)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: does not exist")
    if path.is_file():
        return [path]
    found = [p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    stems = {(p.parent, p.stem) for p in found if p.suffix.lower() != ".png"}
    files = sorted(
        p
        for p in found
        if not is_mask_name(p.stem)
        and not (p.suffix.lower() == ".png" and (p.parent, p.stem) in stems)
    )
    if not files:
        raise DataError(f"{path}: folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def iter_files(
    paths: Sequence[Path], channels: int, batch_size: int, workers: int = 2, prefetch: int = 2
) -> Iterator[tuple[list[Path], list[np.ndarray], list[tuple[str, str]]]]:
    """Stream full-resolution images in batches: (paths read, images, failures in batch).

    Decoding runs ``prefetch`` batches ahead of the consumer in a thread pool, so reading
    overlaps with the model, while at most ``(prefetch + 1) × batch_size`` images are held
    however many files there are.
    """

    def read(p: Path) -> np.ndarray | tuple[str, str]:
        try:
            return read_image(p, channels)
        except ImageReadError as exc:
            return (exc.path, exc.reason)

    starts = iter(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        pending: deque = deque()

        def submit_next() -> None:
            start = next(starts, None)
            if start is not None:
                chunk = list(paths[start : start + batch_size])
                pending.append((chunk, [pool.submit(read, p) for p in chunk]))

        for _ in range(max(0, prefetch) + 1):
            submit_next()
        while pending:
            chunk, futures = pending.popleft()
            out = [f.result() for f in futures]
            submit_next()
            good = [(p, o) for p, o in zip(chunk, out, strict=True) if isinstance(o, np.ndarray)]
            bad = [o for o in out if isinstance(o, tuple)]
            yield [p for p, _ in good], [o for _, o in good], bad
