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

from defectlab.data.io import IMAGE_EXTENSIONS, ImageReadError, image_size, read_image, read_mask
from defectlab.data.layouts import Sample, is_mask_name
from defectlab.data.transforms import pad_to_tile, resize_image, resize_mask, tile_grid
from defectlab.errors import ConfigError, DataError


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


#: training images whose header sizes :func:`choose_image_size` reads (spread evenly)
SIZE_PROBE_IMAGES = 64
#: ``data.image_size=auto`` for models that learn from pixels, and for mixed-size images
FIXED_SIZE = 128
#: images count as mixed sizes when the 90th over the 10th percentile of their long sides
#: reaches this
MIXED_SIZE_RATIO = 1.5
#: ``data.tile=auto`` tiles when the median long side is at least this many model inputs
TILE_FACTOR = 2
#: training cost cap of ``data.image_size=auto`` for whole images: training images × side²
#: (the patches a memory or flow model fits grow with it); the size steps down by
#: :data:`SIZE_STEP` until it fits, never below :data:`FIXED_SIZE`
TRAIN_PIXEL_BUDGET = 1 << 24
#: the feature backbones take sides in multiples of this
SIZE_STEP = 32


@dataclass(frozen=True)
class SizeChoice:
    """``data.image_size`` and ``data.tile`` as decided from the training images, each with
    the reason (``None``: the setting was given, nothing was decided)."""

    image_size: int
    tile: str
    size_reason: str | None
    tile_reason: str | None


def probe_sizes(
    paths: Sequence[Path | str], max_images: int = SIZE_PROBE_IMAGES, workers: int = 2
) -> list[tuple[int, int]]:
    """(height, width) of up to ``max_images`` of ``paths`` (spread evenly), read from the file
    headers without decoding; unreadable files are left out (loading reports them)."""
    paths = list(paths)
    step = max(1, len(paths) // max(1, max_images))

    def size(path: Path | str) -> tuple[int, int] | None:
        try:
            return image_size(path)
        except ImageReadError:
            return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [v for v in pool.map(size, paths[::step][:max_images]) if v is not None]


def _describe_sizes(sizes: Sequence[tuple[int, int]]) -> tuple[int, bool, str]:
    """Median long side, whether the sizes are mixed, and a phrase saying so."""
    longs = np.array([max(h, w) for h, w in sizes], float)
    median = int(np.median(longs))
    low, high = np.percentile(longs, [10, 90])
    mixed = bool(high >= MIXED_SIZE_RATIO * low)
    text = f"{len(sizes)} training images checked, long side median {median} px"
    if mixed:
        smallest = min(sizes, key=lambda s: s[0] * s[1])
        largest = max(sizes, key=lambda s: s[0] * s[1])
        text += (
            f", mixed sizes ({smallest[1]}x{smallest[0]} to {largest[1]}x{largest[0]}; 90th/10th"
            f" percentile of long sides {high / low:.2f} >= {MIXED_SIZE_RATIO})"
        )
    return median, mixed, text


def choose_image_size(
    paths: Sequence[Path | str],
    image_size: int | str,
    tile: str,
    working_size: int | None,
    model: str,
    workers: int = 2,
) -> SizeChoice:
    """Resolve ``data.image_size`` and ``data.tile`` from the training images' header sizes.

    ``working_size`` is the pretrained backbone's input side (``None`` for a model that
    learns from pixels). ``image_size="auto"``:

    * pixel models: :data:`FIXED_SIZE`, whole images (their aligned / learned statistics
      are per position);
    * median long side >= :data:`TILE_FACTOR` x ``working_size``: the working size, and
      ``tile="auto"`` trains and scores native-resolution tiles of it, so a few-pixel defect
      is not averaged away by the down-scaling;
    * mixed sizes (:data:`MIXED_SIZE_RATIO`): :data:`FIXED_SIZE`: squeezing each image to a
      square puts every image at its own scale, so a larger input adds no detail shared
      across images;
    * otherwise the working size, up-scaling smaller images (the stride-8 features then see
      finer detail), stepped down while training images × side² exceeds
      :data:`TRAIN_PIXEL_BUDGET` (many images: cost, not detail, is the limit on a CPU).

    ``tile="auto"`` tiles exactly in the large-image case above. With an explicit size it
    resizes whole images (tiling is asked for with
    ``tile="on"``) and records no reason: nothing was decided. ``tile="on"`` with a tile
    larger than every training image is refused.
    """
    sizes = probe_sizes(paths, workers=workers)
    if not sizes:
        raise DataError(
            f"{paths[0] if paths else 'training set'}: no training image header could be read "
            "to choose data.image_size"
        )
    median, mixed, described = _describe_sizes(sizes)
    size_reason = tile_reason = None
    if image_size != "auto":
        size = int(image_size)
    elif working_size is None:
        size = FIXED_SIZE
        size_reason = f"{model} learns from pixels: {FIXED_SIZE} px whole images ({described})"
    elif median >= TILE_FACTOR * working_size:
        size = working_size
        size_reason = (
            f"{described} >= {TILE_FACTOR} x the backbone's {working_size} px working size: "
            f"{working_size} px"
            + (" tiles at native resolution" if tile != "off" else " (data.tile=off: resized)")
        )
    elif mixed:
        size = FIXED_SIZE
        size_reason = (
            f"{described}: each image is squeezed to a square at its own scale, so a larger "
            f"input adds no common detail: {FIXED_SIZE} px"
        )
    else:
        size = working_size
        while size - SIZE_STEP >= FIXED_SIZE and len(paths) * size**2 > TRAIN_PIXEL_BUDGET:
            size -= SIZE_STEP
        size_reason = f"{described}, one scale: the backbone's {working_size} px working size" + (
            " (up-scaled: stride-8 features see finer detail)" if median < size else ""
        )
        if size < working_size:
            size_reason += (
                f", lowered to {size} px so that {len(paths)} training images x side² stay "
                f"within the training budget of {TRAIN_PIXEL_BUDGET / 1e6:.1f} M pixels"
            )
    if tile == "auto":
        if image_size != "auto":  # a given size means resized whole images: nothing decided
            tile = "off"
        elif working_size is None:
            tile = "off"
            tile_reason = f"{model} learns from pixels: whole images resized to {size} px"
        elif median >= TILE_FACTOR * working_size:
            tile = "on"
            tile_reason = (
                f"long side median {median} px >= {TILE_FACTOR} x the {size} px input: "
                f"overlapping native-resolution {size} px tiles, maps stitched"
            )
        else:
            tile = "off"
            tile_reason = (
                f"long side median {median} px < {TILE_FACTOR} x the backbone's {working_size} px "
                f"working size: whole images resized to {size} px"
            )
    if tile == "on":
        largest = max(sizes, key=min)
        if min(largest) < size:
            raise ConfigError(
                f"data.tile=on: the {size} px tile is larger than every training image checked "
                f"(largest {largest[1]}x{largest[0]}); use data.tile=off or a smaller "
                "data.image_size"
            )
    return SizeChoice(size, tile, size_reason, tile_reason)


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
    if not isinstance(size, int):
        raise ConfigError(
            f"image size {size!r}: data.image_size=auto is decided when a run is trained; "
            "load a run's images with its resolved config"
        )
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


#: bytes of training tiles held at once at most; beyond it tiles are sampled (seeded, spread
#: over every image)
TRAIN_TILE_BYTES = 1 << 30


def load_tiles(
    samples: Sequence[Sample],
    tile: int,
    channels: int,
    mask_threshold: int = 127,
    workers: int = 2,
    desc: str = "loading tiles",
    progress: bool = True,
    seed: int = 0,
) -> LoadedImages:
    """Cut samples into overlapping native-resolution ``tile`` px tiles (the grid that
    scoring stitches, :func:`~defectlab.data.transforms.tile_grid`; images smaller than a tile
    mirrored out), with their masks: one entry per tile, each tile's sample and native size
    repeated. At most :data:`TRAIN_TILE_BYTES` of tiles are kept, sampled evenly by ``seed``
    when the images hold more. Unreadable images are skipped and reported."""
    if not samples:
        raise DataError(f"{desc}: no images to load")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    failures: list[tuple[str, str]] = []
    candidates: list[tuple[int, tuple[int, int]]] = []
    for i, sample in enumerate(samples):
        try:
            shape = image_size(sample.path)
        except ImageReadError as exc:
            failures.append((exc.path, exc.reason))
            continue
        candidates += [(i, pos) for pos in tile_grid(shape, tile)]
    budget = max(1, TRAIN_TILE_BYTES // (tile * tile * channels * 4))
    if len(candidates) > budget:
        keep = np.sort(np.random.default_rng(seed).choice(len(candidates), budget, replace=False))
        candidates = [candidates[k] for k in keep]
    by_sample: dict[int, list[tuple[int, int]]] = {}
    for i, pos in candidates:
        by_sample.setdefault(i, []).append(pos)
    order = sorted(by_sample)
    results: dict[int, tuple[np.ndarray, np.ndarray, tuple[int, int]]] = {}

    def task(i: int) -> None:
        sample = samples[i]
        try:
            image = read_image(sample.path, channels)
        except ImageReadError as exc:
            failures.append((exc.path, exc.reason))
            return
        original = image.shape[:2]
        mask = np.zeros(original, bool)
        if sample.mask_path is not None:
            mask = read_mask(sample.mask_path, mask_threshold)
            if mask.shape != original:
                raise DataError(
                    f"{sample.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                    f"{sample.path} is {original[1]}x{original[0]}"
                )
        image, mask = pad_to_tile(image, tile), pad_to_tile(mask, tile)
        positions = by_sample[i]
        results[i] = (
            np.stack([image[t : t + tile, left : left + tile] for t, left in positions]),
            np.stack([mask[t : t + tile, left : left + tile] for t, left in positions]),
            original,
        )

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(
            tqdm(
                pool.map(task, order),
                total=len(order),
                desc=desc,
                disable=not progress,
                leave=False,
                file=sys.stderr,
            )
        )
    kept = [i for i in order if i in results]
    report_failures(sorted(failures), len(samples))
    if not kept:
        raise DataError(f"{desc}: none of the {len(samples)} images could be read")
    counts = [len(results[i][0]) for i in kept]
    return LoadedImages(
        images=np.concatenate([results[i][0] for i in kept]),
        masks=np.concatenate([results[i][1] for i in kept]),
        samples=[samples[i] for i, n in zip(kept, counts, strict=True) for _ in range(n)],
        original_sizes=[results[i][2] for i, n in zip(kept, counts, strict=True) for _ in range(n)],
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
