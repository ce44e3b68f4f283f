"""Image and mask reading, and atomic file writes.

Images are decoded with OpenCV (PNG, JPEG, BMP, TIFF; 8- and 16-bit; grey, RGB, RGBA) and
returned as float32 in [0, 1] with channels last. 16-bit data keeps its full precision: the
only conversion is the division by 65535 into float32, whose 24-bit mantissa holds it exactly.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from defectlab.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_UMASK = os.umask(0)
os.umask(_UMASK)


class ImageReadError(DataError):
    """One file could not be read as an image; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _decode(path: str | Path) -> np.ndarray:
    """Decode a file with its bit depth and channel count untouched."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "file does not exist")
    if path.is_dir():
        raise ImageReadError(path, "is a directory, not an image file")
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(path, f"cannot read file ({exc.strerror or exc})") from exc
    return _decode_buffer(raw, path)


def _decode_buffer(raw: np.ndarray, name: str | Path) -> np.ndarray:
    """Decode encoded bytes (a file's or an upload's) with bit depth and channels untouched."""
    if raw.size == 0:
        raise ImageReadError(name, "empty file (0 bytes)")
    try:
        array = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:  # e.g. a header claiming more pixels than OpenCV allows
        raise ImageReadError(name, f"not a decodable image ({exc.err or exc})") from exc
    if array is None or array.size == 0:
        raise ImageReadError(name, "not a decodable image (corrupt or unsupported format)")
    return array


def _to_unit_float(array: np.ndarray, path: str | Path) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if array.dtype in (np.float32, np.float64):
        out = array.astype(np.float32)
        if not np.isfinite(out).all():
            raise ImageReadError(path, "floating-point image contains NaN or infinity")
        lo, hi = float(out.min()), float(out.max())
        return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
    raise ImageReadError(path, f"unsupported pixel type {array.dtype}")


def read_image(path: str | Path, channels: int = 1) -> np.ndarray:
    """Read an image as float32 ``(H, W, channels)`` in [0, 1].

    ``channels=1`` converts colour to luminance; ``channels=3`` replicates grey. Alpha is
    dropped. Raises :class:`ImageReadError` naming the file when it cannot be decoded.
    """
    _check_channels(channels)
    return _normalise(_decode(path), path, channels)


def decode_image(data: bytes, name: str, channels: int = 1) -> np.ndarray:
    """Decode an image held in memory (an HTTP upload) exactly as :func:`read_image` decodes a
    file, so a served model sees the same pixels as ``predict`` on the same file. ``name``
    only labels errors: :class:`ImageReadError` says ``name: reason``."""
    _check_channels(channels)
    return _normalise(_decode_buffer(np.frombuffer(data, dtype=np.uint8), name), name, channels)


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")


def _normalise(array: np.ndarray, name: str | Path, channels: int) -> np.ndarray:
    """A decoded array (any depth, grey/BGR/BGRA) → float32 ``(H, W, channels)`` RGB in [0, 1]."""
    if array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, :3]
    if array.ndim == 3 and array.shape[2] == 3:
        array = array[:, :, ::-1]  # OpenCV decodes BGR
    elif array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    image = _to_unit_float(np.ascontiguousarray(array), name)
    if image.ndim == 2:
        image = image[:, :, None]
    if channels == 1 and image.shape[2] == 3:
        image = (image @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[:, :, None]
    elif channels == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image, dtype=np.float32)


def read_mask(path: str | Path, threshold: int = 127) -> np.ndarray:
    """Read a mask of any format as bool ``(H, W)``: a pixel is defect when its value > threshold.

    ``threshold`` is on the 8-bit scale; it is scaled by 257 for 16-bit masks. Colour masks
    count a pixel as defect when any channel passes.
    """
    array = _decode(path)
    if array.ndim == 3:
        array = array.max(axis=2)
    if array.dtype == np.uint16:
        return array > threshold * 257
    if array.dtype == np.uint8:
        return array > threshold
    return array.astype(np.float32) > threshold / 255.0


def image_size(path: str | Path) -> tuple[int, int]:
    """Height and width of an image file (decodes it; OpenCV has no header-only read)."""
    array = _decode(path)
    return int(array.shape[0]), int(array.shape[1])


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text so that readers see the old file or the whole new one, never a part."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write dict rows as CSV atomically; columns are the union of keys in first-seen order."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Run ``writer(tmp_path)`` and move the result to ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Write a uint8/uint16 array (H, W) or (H, W, 3 RGB) as PNG, atomically."""
    if image.ndim == 3 and image.shape[2] == 3:
        image = image[:, :, ::-1]
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image))
    if not ok:
        raise DataError(f"{path}: could not encode PNG")
    atomic_write(path, lambda tmp: buf.tofile(tmp))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0, 1] (H, W[, C]) → uint8, grey squeezed to (H, W)."""
    out = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    if out.ndim == 3 and out.shape[2] == 1:
        out = out[:, :, 0]
    return out
