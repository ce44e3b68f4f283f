"""Image and mask reading, and atomic file writes.

Images are decoded with OpenCV (PNG, JPEG, BMP, TIFF; 8- and 16-bit; grey, RGB, RGBA) and
returned as float32 in [0, 1] with channels last. 16-bit data keeps its full precision: the
only conversion is the division by 65535 into float32, whose 24-bit mantissa holds it exactly.

Before anything is decoded, the header is read (:func:`read_header`) and the image is refused
when it declares more pixels than the budget (:class:`ImageLimits`, ``data.max_pixels``): a
small file can declare a huge image (a decompression bomb), and decoding it would take
memory in proportion to what it declares, not to its size on disk. Files whose format is not
one of the four supported ones are refused the same way, so no decoder runs on an image
whose size was not checked first.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import re
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np

from defectlab.errors import ConfigError, DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_UMASK = os.umask(0)
os.umask(_UMASK)


class ImageReadError(DataError):
    """One file could not be read as an image; ``path`` and ``reason`` say which and why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


#: the default pixel budget (``data.max_pixels``): larger images are refused before decoding
DEFAULT_MAX_PIXELS = 100_000_000
#: training and evaluation refuse images whose shorter side is below this rather than
#: up-scale them (``data.min_side``); single inspections (predict, serve) take any size
DEFAULT_MIN_SIDE = 8


class ImageTooLargeError(ImageReadError):
    """The header declares more pixels than the budget; nothing was decoded."""


class ImageTooSmallError(ImageReadError):
    """The image's shorter side is below the minimum: up-scaled, it would carry no detail."""


@dataclass(frozen=True)
class ImageLimits:
    """Bounds every decoded image must respect: at most ``max_pixels`` pixels (checked on
    the header, before decoding) and a shorter side of at least ``min_side`` pixels."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = 1

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be at least 1, got {self.max_pixels}")
        if self.min_side < 1:
            raise ConfigError(f"min_side must be at least 1, got {self.min_side}")


_limits = ImageLimits()


def current_limits() -> ImageLimits:
    """The limits :func:`read_image` and :func:`decode_image` apply when given none."""
    return _limits


@contextmanager
def image_limits(
    max_pixels: int | None = None, min_side: int | None = None
) -> Iterator[ImageLimits]:
    """Apply other limits to every image read inside the block (all threads), then restore
    the previous ones: how a run's ``data.max_pixels`` reaches the loaders."""
    global _limits
    previous = _limits
    _limits = ImageLimits(
        previous.max_pixels if max_pixels is None else max_pixels,
        previous.min_side if min_side is None else min_side,
    )
    try:
        yield _limits
    finally:
        _limits = previous


@dataclass(frozen=True)
class ImageHeader:
    """What a file declares about its first image, read without decoding any pixel."""

    format: str
    width: int
    height: int
    #: images in the file (TIFF pages); only the first is ever decoded
    frames: int = 1

    @property
    def pixels(self) -> int:
        return self.width * self.height


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_FORMATS = "PNG, JPEG, BMP or TIFF"
#: header segments (JPEG) or directory entries (TIFF) read at most before giving up
_MAX_SEGMENTS = 65_536


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise ValueError("truncated header")
    return data


def _png_header(stream: BinaryIO) -> ImageHeader:
    chunk = _read_exact(stream, 24)
    if chunk[12:16] != b"IHDR":
        raise ValueError("PNG without an IHDR chunk")
    width, height = struct.unpack(">II", chunk[16:24])
    return ImageHeader("PNG", width, height)


def _jpeg_header(stream: BinaryIO) -> ImageHeader:
    stream.seek(2)
    for _ in range(_MAX_SEGMENTS):
        marker = _read_exact(stream, 2)
        if marker[0] != 0xFF:
            raise ValueError("JPEG marker expected")
        for _ in range(_MAX_SEGMENTS):  # fill bytes before a marker
            if marker[1] != 0xFF:
                break
            marker = marker[1:] + _read_exact(stream, 1)
        if marker[1] in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            continue
        if marker[1] in (0xD9, 0xDA):
            raise ValueError("JPEG without a frame header")
        (length,) = struct.unpack(">H", _read_exact(stream, 2))
        if length < 2:
            raise ValueError("JPEG segment of negative length")
        if marker[1] in _JPEG_SOF:
            segment = _read_exact(stream, 5)
            height, width = struct.unpack(">HH", segment[1:5])
            return ImageHeader("JPEG", width, height)
        stream.seek(length - 2, os.SEEK_CUR)
    raise ValueError("JPEG without a frame header in its first segments")


def _bmp_header(stream: BinaryIO) -> ImageHeader:
    head = _read_exact(stream, 26)
    (size,) = struct.unpack("<I", head[14:18])
    if size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sides
        width, height = struct.unpack("<HH", head[18:22])
    else:
        width, height = struct.unpack("<ii", head[18:26])
    return ImageHeader("BMP", abs(width), abs(height))  # negative height: top-down rows


def _tiff_header(stream: BinaryIO) -> ImageHeader:
    head = _read_exact(stream, 16)
    order = "<" if head[:2] == b"II" else ">"
    (version,) = struct.unpack(order + "H", head[2:4])
    big = version == 43
    if big:
        (offset,) = struct.unpack(order + "Q", head[8:16])
        count_fmt, entry_size, value_at = "Q", 20, 12
    else:
        (offset,) = struct.unpack(order + "I", head[4:8])
        count_fmt, entry_size, value_at = "H", 12, 8
    sides: dict[int, int] = {}
    frames, seen = 0, set()
    while offset and offset not in seen and frames < _MAX_SEGMENTS:
        if offset >= 1 << 62:  # BigTIFF offsets are 64-bit; no file reaches this far
            raise ValueError(f"TIFF directory offset {offset} beyond any file")
        seen.add(offset)
        stream.seek(offset)
        (count,) = struct.unpack(order + count_fmt, _read_exact(stream, struct.calcsize(count_fmt)))
        if count > _MAX_SEGMENTS:
            raise ValueError(f"TIFF directory of {count} entries")
        if frames == 0:
            entries = _read_exact(stream, count * entry_size)
            for i in range(count):
                entry = entries[i * entry_size : (i + 1) * entry_size]
                tag, kind = struct.unpack(order + "HH", entry[:4])
                if tag in (256, 257):  # ImageWidth, ImageLength: SHORT, LONG or LONG8
                    fmt = {3: "H", 4: "I", 16: "Q"}.get(kind)
                    if fmt is None:
                        raise ValueError(f"TIFF tag {tag} of type {kind}")
                    size = struct.calcsize(fmt)
                    sides[tag] = struct.unpack(order + fmt, entry[value_at : value_at + size])[0]
        else:
            stream.seek(count * entry_size, os.SEEK_CUR)
        frames += 1
        next_fmt = "Q" if big else "I"
        (offset,) = struct.unpack(order + next_fmt, _read_exact(stream, struct.calcsize(next_fmt)))
    if 256 not in sides or 257 not in sides:
        raise ValueError("TIFF without image width and length")
    return ImageHeader("TIFF", sides[256], sides[257], frames)


_SIGNATURES: tuple[tuple[bytes, Callable[[BinaryIO], ImageHeader]], ...] = (
    (b"\x89PNG\r\n\x1a\n", _png_header),
    (b"\xff\xd8", _jpeg_header),
    (b"BM", _bmp_header),
    (b"II*\x00", _tiff_header),
    (b"MM\x00*", _tiff_header),
    (b"II+\x00", _tiff_header),
    (b"MM\x00+", _tiff_header),
)


def read_header(stream: BinaryIO, name: str | Path) -> ImageHeader:
    """Format, width, height and frame count from the first bytes of an image, without
    decoding it. Raises :class:`ImageReadError` for any other format or a broken header."""
    start = stream.read(8)
    stream.seek(0)
    for signature, reader in _SIGNATURES:
        if start.startswith(signature):
            try:
                return reader(stream)
            except (ValueError, struct.error, OSError, OverflowError) as exc:
                raise ImageReadError(name, f"not a decodable image ({exc})") from exc
    raise ImageReadError(name, f"not a decodable image (not a {_FORMATS} file)")


def _check_header(header: ImageHeader, name: str | Path, limits: ImageLimits) -> None:
    if header.width == 0 or header.height == 0:
        raise ImageReadError(
            name, f"not a decodable image ({header.format} declares {header.width}x{header.height})"
        )
    if header.pixels > limits.max_pixels:
        raise ImageTooLargeError(
            name,
            f"image too large: {header.format} declares {header.width}x{header.height} = "
            f"{header.pixels} pixels, the limit is {limits.max_pixels} pixels",
        )


def _check_shape(array: np.ndarray, name: str | Path, limits: ImageLimits) -> None:
    height, width = array.shape[:2]
    if min(height, width) < limits.min_side:
        raise ImageTooSmallError(
            name,
            f"image too small: {width}x{height} pixels, the shorter side must be at least "
            f"{limits.min_side} (data.min_side)",
        )
    if array.ndim == 3 and array.shape[2] not in (1, 3, 4):
        raise ImageReadError(name, f"{array.shape[2]} channels; grey, RGB or RGBA expected")


def _decode(path: str | Path, limits: ImageLimits | None = None) -> np.ndarray:
    """Decode a file with its bit depth and channel count untouched, after its header has
    passed the pixel budget."""
    path = Path(path)
    if not path.exists():
        reason = "dangling symbolic link" if path.is_symlink() else "file does not exist"
        raise ImageReadError(path, reason)
    if path.is_dir():
        raise ImageReadError(path, "is a directory, not an image file")
    try:
        with path.open("rb") as handle:
            if not handle.read(1):
                raise ImageReadError(path, "empty file (0 bytes)")
            handle.seek(0)
            header = read_header(handle, path)
        _check_header(header, path, limits or _limits)
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(path, f"cannot read file ({exc.strerror or exc})") from exc
    return _decode_buffer(raw, path, checked=True)


def _decode_buffer(
    raw: np.ndarray, name: str | Path, limits: ImageLimits | None = None, checked: bool = False
) -> np.ndarray:
    """Decode encoded bytes (a file's or an upload's) with bit depth and channels untouched;
    the header is checked against ``limits`` first unless the caller already did."""
    if raw.size == 0:
        raise ImageReadError(name, "empty file (0 bytes)")
    if not checked:
        _check_header(read_header(io.BytesIO(raw.tobytes()), name), name, limits or _limits)
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


def read_image(
    path: str | Path, channels: int = 1, limits: ImageLimits | None = None
) -> np.ndarray:
    """Read an image as float32 ``(H, W, channels)`` in [0, 1].

    ``channels=1`` converts colour to luminance; ``channels=3`` replicates grey. Alpha is
    dropped. Raises :class:`ImageReadError` naming the file when it cannot be decoded, and
    its subclasses when it breaks ``limits`` (default :func:`current_limits`).
    """
    _check_channels(channels)
    limits = limits or _limits
    array = _decode(path, limits)
    _check_shape(array, path, limits)
    return _normalise(array, path, channels)


def decode_image(
    data: bytes, name: str, channels: int = 1, limits: ImageLimits | None = None
) -> np.ndarray:
    """Decode an image held in memory (an HTTP upload) exactly as :func:`read_image` decodes a
    file, so a served model sees the same pixels as ``predict`` on the same file. ``name``
    only labels errors: :class:`ImageReadError` says ``name: reason``."""
    _check_channels(channels)
    limits = limits or _limits
    if not data:
        raise ImageReadError(name, "empty file (0 bytes)")
    _check_header(read_header(io.BytesIO(data), name), name, limits)
    array = _decode_buffer(np.frombuffer(data, dtype=np.uint8), name, checked=True)
    _check_shape(array, name, limits)
    return _normalise(array, name, channels)


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
    """Height and width of an image file, from its header (nothing is decoded)."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            header = read_header(handle, path)
    except OSError as exc:
        raise ImageReadError(path, f"cannot read file ({exc.strerror or exc})") from exc
    return header.height, header.width


def broken_links(root: str | Path) -> list[tuple[str, str]]:
    """Symbolic links under ``root`` that lead nowhere (dangling) or to themselves (a loop):
    the layouts skip them, so they are reported here rather than lost without a word."""
    found = []
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            link = Path(folder) / name
            if not link.is_symlink():
                continue
            try:
                link.resolve(strict=True)
            except RuntimeError:  # Python < 3.13 reports a loop so
                found.append((str(link), "symbolic link loops back on itself"))
            except OSError as exc:
                looping = exc.errno == errno.ELOOP
                reason = "loops back on itself" if looping else "is dangling (target missing)"
                found.append((str(link), f"symbolic link {reason}"))
    return found


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


_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}(?P<suffix>\.[A-Za-z0-9]+)?")


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete what :func:`atomic_path` left in ``folder`` when its process was killed
    mid-write (``.<name>.<random><suffix>``); the finished files are untouched. Call it
    before resuming work in a folder that no other process writes into."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        found = _TEMPORARY.fullmatch(path.name)
        if found and path.is_file() and found["name"].endswith(found["suffix"] or ""):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


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
