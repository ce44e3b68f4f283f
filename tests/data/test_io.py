import io
import struct
from pathlib import Path

import cv2
import numpy as np
import pytest

from defectlab.data.io import (
    ImageReadError,
    atomic_write_text,
    decode_image,
    read_header,
    read_image,
    read_mask,
)
from tests.conftest import write_image


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif"])
def test_reads_8bit_grey_in_every_format(tmp_path: Path, ext: str) -> None:
    array = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1))
    path = write_image(tmp_path / f"img{ext}", array)
    image = read_image(path)
    assert image.shape == (16, 64, 1) and image.dtype == np.float32
    tolerance = 3 / 255 if ext == ".jpg" else 1e-6
    np.testing.assert_allclose(image[:, :, 0], array / 255.0, atol=tolerance)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16bit_keeps_full_precision(tmp_path: Path, ext: str) -> None:
    array = np.array([[0, 1, 2, 65534, 65535, 30001]], dtype=np.uint16)
    path = write_image(tmp_path / f"x{ext}", array)
    image = read_image(path)
    # neighbouring 16-bit codes stay distinct: no 8-bit round trip anywhere
    np.testing.assert_allclose(image[0, :, 0] * 65535.0, array[0].astype(np.float64), atol=1e-2)
    assert len(np.unique(image)) == 6


def test_rgb_and_rgba_conversions(tmp_path: Path) -> None:
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255  # pure red
    path = write_image(tmp_path / "red.png", rgb)
    colour = read_image(path, channels=3)
    np.testing.assert_allclose(colour[0, 0], [1.0, 0.0, 0.0])
    grey = read_image(path, channels=1)
    np.testing.assert_allclose(grey[0, 0, 0], 0.299, atol=1e-6)
    rgba = np.dstack([rgb[..., ::-1], np.full((4, 4), 7, np.uint8)])  # BGRA on disk
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    np.testing.assert_allclose(read_image(tmp_path / "a.png", channels=3)[0, 0], [1.0, 0.0, 0.0])
    grey_path = write_image(tmp_path / "g.png", np.full((2, 2), 128, np.uint8))
    assert read_image(grey_path, channels=3).shape == (2, 2, 3)


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"", "empty file"), (b"not an image at all", "not a decodable image")],
)
def test_bad_files_name_path_and_reason(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as info:
        read_image(path)
    assert info.value.path == str(path)


def test_truncated_png_is_reported(tmp_path: Path) -> None:
    path = write_image(
        tmp_path / "t.png", np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    )
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(ImageReadError, match=r"t\.png"):
        read_image(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "nope.png")


def test_mask_threshold_8_and_16_bit(tmp_path: Path) -> None:
    values = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    mask = read_mask(write_image(tmp_path / "m.png", values))
    assert mask.tolist() == [[False, False, True, True]]
    assert read_mask(tmp_path / "m.png", threshold=0).tolist() == [[False, True, True, True]]
    wide = values.astype(np.uint16) * 257
    assert read_mask(write_image(tmp_path / "m16.png", wide)).tolist() == mask.tolist()


def test_atomic_write_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    atomic_write_text(target, "first")

    class Boom(Exception):
        pass

    from defectlab.data.io import atomic_path

    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise Boom
    assert target.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


@pytest.mark.parametrize("channels", [1, 3])
def test_decode_image_matches_read_image(tmp_path: Path, channels: int) -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    paths = [
        write_image(tmp_path / "grey.png", grey),
        write_image(tmp_path / "deep.png", grey.astype(np.uint16) * 257 + 3),
        write_image(tmp_path / "rgb.jpg", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)),
    ]
    cv2.imwrite(str(tmp_path / "rgba.png"), rng.integers(0, 256, (8, 8, 4), dtype=np.uint8))
    for path in [*paths, tmp_path / "rgba.png"]:
        decoded = decode_image(path.read_bytes(), path.name, channels)
        np.testing.assert_array_equal(decoded, read_image(path, channels))
    for content, reason in [(b"", "empty file"), (b"text", "not a decodable image")]:
        with pytest.raises(ImageReadError, match=f"upload.txt: {reason}"):
            decode_image(content, "upload.txt")


@pytest.mark.parametrize("offset", [2**62, 2**64 - 1])
def test_a_bigtiff_directory_offset_beyond_any_file_is_a_read_error(offset: int) -> None:
    """A 64-bit BigTIFF offset too large to seek to is a broken header, not a crash."""
    data = b"II" + struct.pack("<HHHQ", 43, 8, 0, offset)
    with pytest.raises(ImageReadError, match="beyond any file"):
        read_header(io.BytesIO(data), "huge.tif")
