"""A generated corpus of hostile image files: decompression bombs of each supported format,
huge dimensions with tiny payloads, truncated streams, wrong magic bytes, NaN/inf floats,
odd channel counts and degenerate sizes. Every file is a few kilobytes to a megabyte on disk;
the bombs declare far more pixels than the default budget (:data:`DEFAULT_MAX_PIXELS`).
"""

from __future__ import annotations

import itertools
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from defectlab.data.io import DEFAULT_MAX_PIXELS

#: the side of the real bombs: over the budget, yet quick to compress
BOMB_SIDE = 12_000
assert BOMB_SIDE**2 > DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class Case:
    """One hostile file and what reading it must give: ``"ok"`` (decoded, shape given) or the
    start of the refusal's reason."""

    name: str
    expect: str
    shape: tuple[int, int] | None = None


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, body: bytes | None) -> bytes:
    """A grey 8-bit PNG declaring ``width`` × ``height``; ``body`` is the zlib stream
    (``None``: the real one for an all-black image, streamed so it is never held raw)."""
    if body is None:
        compressor = zlib.compressobj(9)
        row = bytes(width + 1)  # filter byte + pixels
        parts = [compressor.compress(row) for _ in range(height)]
        body = b"".join(parts) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", body)
        + _chunk(b"IEND", b"")
    )


def jpeg_header_only(width: int, height: int) -> bytes:
    """SOI, a baseline frame header declaring ``width`` × ``height`` grey, then nothing."""
    sof = struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0])
    return b"\xff\xd8" + b"\xff\xc0" + struct.pack(">H", len(sof) + 2) + sof + b"\xff\xd9"


def bmp_rle_bomb(width: int, height: int) -> bytes:
    """An 8-bit RLE BMP whose pixel data is just 'end of bitmap': a whole image of zeros."""
    palette = b"".join(bytes([i, i, i, 0]) for i in range(256))
    data = b"\x00\x01"
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(data), 2835, 2835, 256, 0)
    head = b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset)
    return head + info + palette + data


def tiff_bytes(pages: list[tuple[int, int, int, bytes, int]]) -> bytes:
    """A little-endian TIFF of grey pages ``(width, height, samples, strip, compression)``,
    each page one strip (all rows in it)."""
    out = bytearray(b"II*\x00\x00\x00\x00\x00")
    ifd_offsets = []
    for width, height, samples, strip, compression in pages:
        strip_at = len(out)
        out += strip
        if len(out) % 2:
            out += b"\x00"
        entries = [
            (256, 4, 1, width),
            (257, 4, 1, height),
            (258, 3, 1, 8),
            (259, 3, 1, compression),
            (262, 3, 1, 1),
            (273, 4, 1, strip_at),
            (277, 3, 1, samples),
            (278, 4, 1, height),
            (279, 4, 1, len(strip)),
        ]
        ifd_offsets.append(len(out))
        out += struct.pack("<H", len(entries))
        for tag, kind, count, value in entries:
            packed = (
                struct.pack("<H", value) + b"\x00\x00" if kind == 3 else struct.pack("<I", value)
            )
            out += struct.pack("<HHI", tag, kind, count) + packed
        out += b"\x00\x00\x00\x00"  # next IFD, patched below
    struct.pack_into("<I", out, 4, ifd_offsets[0])
    for here, following in itertools.pairwise(ifd_offsets):
        count = struct.unpack_from("<H", out, here)[0]
        struct.pack_into("<I", out, here + 2 + 12 * count, following)
    return bytes(out)


def _deflated_zeros(n: int) -> bytes:
    compressor = zlib.compressobj(9)
    block = bytes(1 << 20)
    parts = [compressor.compress(block) for _ in range(n >> 20)]
    parts.append(compressor.compress(bytes(n & ((1 << 20) - 1))))
    return b"".join(parts) + compressor.flush()


def _encoded(ext: str, array: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, array)
    assert ok, ext
    return buf.tobytes()


def build(folder: Path) -> dict[str, Case]:
    """Write every hostile file into ``folder``; return the cases by file name."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    good = rng.integers(0, 256, (64, 64), dtype=np.uint8)
    good_png, good_jpeg = _encoded(".png", good), _encoded(".jpg", good)
    nan = np.full((32, 32), 0.5, np.float32)
    nan[3, 4], nan[5, 6] = np.nan, np.inf
    big = BOMB_SIDE
    files: dict[str, tuple[bytes, Case]] = {
        "bomb.png": (png_bytes(big, big, None), Case("bomb.png", "image too large")),
        "huge-tiny.png": (
            png_bytes(30_000, 30_000, zlib.compress(b"\x00" * 100)),
            Case("huge-tiny.png", "image too large"),
        ),
        "huge-tiny.jpg": (
            jpeg_header_only(30_000, 30_000),
            Case("huge-tiny.jpg", "image too large"),
        ),
        "bomb-rle.bmp": (bmp_rle_bomb(20_000, 20_000), Case("bomb-rle.bmp", "image too large")),
        "bomb-strip.tif": (
            tiff_bytes([(big, big, 1, _deflated_zeros(big * big), 8)]),
            Case("bomb-strip.tif", "image too large"),
        ),
        "bomb-page1.tif": (
            tiff_bytes([(50_000, 50_000, 1, b"\x00" * 64, 1), (64, 64, 1, good.tobytes(), 1)]),
            Case("bomb-page1.tif", "image too large"),
        ),
        "multipage.tif": (  # only the first page is ever decoded
            tiff_bytes([(64, 64, 1, good.tobytes(), 1), (50_000, 50_000, 1, b"\x00" * 64, 1)]),
            Case("multipage.tif", "ok", (64, 64)),
        ),
        "zero-channels.tif": (
            tiff_bytes([(64, 64, 0, good.tobytes(), 1)]),
            Case("zero-channels.tif", "not a decodable image"),
        ),
        "five-channels.tif": (
            tiff_bytes([(16, 16, 5, bytes(16 * 16 * 5), 1)]),
            Case("five-channels.tif", "not a decodable"),
        ),
        "nan-inf.tif": (_encoded(".tiff", nan), Case("nan-inf.tif", "floating-point image")),
        "truncated.png": (good_png[: len(good_png) // 2], Case("truncated.png", "not a decodable")),
        "truncated-header.png": (good_png[:20], Case("truncated-header.png", "not a decodable")),
        "truncated-header.jpg": (good_jpeg[:40], Case("truncated-header.jpg", "not a decodable")),
        "png-as.jpg": (good_png, Case("png-as.jpg", "ok", (64, 64))),  # the content decides
        "jpeg-magic.png": (b"\xff\xd8" + good_png, Case("jpeg-magic.png", "not a decodable")),
        "gif-magic.png": (b"GIF89a" + good_png[6:], Case("gif-magic.png", "not a decodable")),
        "zero-width.png": (png_bytes(0, 64, None), Case("zero-width.png", "not a decodable")),
        "empty.png": (b"", Case("empty.png", "empty file")),
        "1x1.png": (_encoded(".png", good[:1, :1]), Case("1x1.png", "ok", (1, 1))),
        "1x100000.png": (
            _encoded(".png", np.zeros((1, 100_000), np.uint8)),
            Case("1x100000.png", "ok", (1, 100_000)),
        ),
    }
    for name, (data, _) in files.items():
        (folder / name).write_bytes(data)
    return {name: case for name, (_, case) in files.items()}
