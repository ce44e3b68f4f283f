"""The decoder against hostile files: every file is decoded or refused with a reason, and
no file makes the decoder allocate for more pixels than the budget allows."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defectlab.data.io import (
    DEFAULT_MAX_PIXELS,
    ImageReadError,
    ImageTooLargeError,
    current_limits,
    decode_image,
    image_limits,
    image_size,
    read_header,
    read_image,
)
from tests.robustness.corpus import Case, bmp_rle_bomb, png_bytes

CASES = [
    "bomb.png",
    "huge-tiny.png",
    "huge-tiny.jpg",
    "bomb-rle.bmp",
    "bomb-strip.tif",
    "bomb-page1.tif",
    "multipage.tif",
    "zero-channels.tif",
    "five-channels.tif",
    "nan-inf.tif",
    "truncated.png",
    "truncated-header.png",
    "truncated-header.jpg",
    "png-as.jpg",
    "jpeg-magic.png",
    "gif-magic.png",
    "zero-width.png",
    "empty.png",
    "1x1.png",
    "1x100000.png",
]


def test_the_corpus_is_the_one_tested(corpus: tuple[Path, dict[str, Case]]) -> None:
    assert sorted(corpus[1]) == sorted(CASES)


@pytest.mark.parametrize("name", CASES)
def test_each_hostile_file_is_decoded_or_refused_with_its_reason(
    corpus: tuple[Path, dict[str, Case]], name: str
) -> None:
    folder, cases = corpus
    case = cases[name]
    if case.expect == "ok":
        assert read_image(folder / name).shape[:2] == case.shape
        return
    with pytest.raises(ImageReadError) as info:
        read_image(folder / name)
    assert info.value.path == str(folder / name)
    assert info.value.reason.startswith(case.expect), info.value.reason
    with pytest.raises(ImageReadError) as upload:  # an upload of the same bytes: same answer
        decode_image((folder / name).read_bytes(), name)
    assert upload.value.reason == info.value.reason


def test_bombs_name_their_size_and_the_limit(corpus: tuple[Path, dict[str, Case]]) -> None:
    folder, _ = corpus
    with pytest.raises(ImageTooLargeError, match="20000x20000 = 400000000 pixels") as info:
        read_image(folder / "bomb-rle.bmp")
    assert f"the limit is {DEFAULT_MAX_PIXELS}" in str(info.value)


_PEAK = """
import json, resource, sys
from defectlab.data.io import ImageReadError, read_image
outcomes = {}
for path in sys.argv[1:]:
    try:
        outcomes[path] = list(read_image(path).shape)
    except ImageReadError as exc:
        outcomes[path] = exc.reason
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "outcomes": outcomes}))
"""


def test_reading_the_whole_corpus_keeps_memory_flat(corpus: tuple[Path, dict[str, Case]]) -> None:
    """One process reads every hostile file: its peak resident memory stays that of the
    interpreter and its libraries (each bomb would need from 0.5 to 10 GB decoded)."""
    folder, cases = corpus
    baseline = subprocess.run(
        [sys.executable, "-c", _PEAK], capture_output=True, text=True, check=True
    )
    result = subprocess.run(
        [sys.executable, "-c", _PEAK, *(str(folder / n) for n in sorted(cases))],
        capture_output=True,
        text=True,
        check=True,
    )
    report = json.loads(result.stdout)
    assert len(report["outcomes"]) == len(cases)
    grown = report["peak_mb"] - json.loads(baseline.stdout)["peak_mb"]
    assert grown < 100, f"reading the corpus took {grown:.0f} MB more than importing"


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif"])
@pytest.mark.parametrize("shape", [(5, 7), (64, 33), (300, 2), (17, 17, 3), (9, 40, 4)])
def test_headers_agree_with_the_decoder(tmp_path: Path, ext: str, shape: tuple[int, ...]) -> None:
    if ext == ".jpg" and len(shape) == 3 and shape[2] == 4:  # JPEG has no alpha
        shape = (*shape[:2], 3)
    array = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / f"x{ext}"
    assert cv2.imwrite(str(path), array)
    with path.open("rb") as handle:
        header = read_header(handle, path)
    assert (header.height, header.width) == shape[:2] == image_size(path)
    assert read_image(path).shape[:2] == shape[:2]


def test_the_budget_is_overridable_and_restored(tmp_path: Path) -> None:
    path = tmp_path / "wide.png"
    assert cv2.imwrite(str(path), np.zeros((10, 200), np.uint8))
    with image_limits(max_pixels=1999), pytest.raises(ImageTooLargeError, match="limit is 1999"):
        read_image(path)
    assert current_limits().max_pixels == DEFAULT_MAX_PIXELS
    with image_limits(max_pixels=2000):
        assert read_image(path).shape == (10, 200, 1)
    with image_limits(min_side=11), pytest.raises(ImageReadError, match="image too small"):
        read_image(path)


def _seeds() -> list[bytes]:
    array = np.random.default_rng(1).integers(0, 256, (24, 20, 3), dtype=np.uint8)
    encoded = [cv2.imencode(ext, array)[1].tobytes() for ext in (".png", ".jpg", ".bmp", ".tif")]
    return [*encoded, png_bytes(64, 64, None), bmp_rle_bomb(64, 64)]


SEEDS = _seeds()
BUDGET = 50_000


def _decode_within_budget(data: bytes) -> None:
    """Decoded or refused with a reason, and never more pixels than the budget."""
    with image_limits(max_pixels=BUDGET):
        try:
            image = decode_image(data, "upload")
        except ImageReadError as exc:
            assert exc.reason and "Traceback" not in exc.reason
            return
    assert image.ndim == 3 and image.shape[2] == 1 and image.dtype == np.float32
    assert image.shape[0] * image.shape[1] <= BUDGET
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_decoder(data: bytes) -> None:
    _decode_within_budget(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(SEEDS),
    st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), max_size=6),
    st.integers(0, 4096),
)
def test_mutated_headers_never_crash_the_decoder_nor_pass_the_budget(
    seed: bytes, edits: list[tuple[int, int]], cut: int
) -> None:
    """Real files of each format with header bytes overwritten (sizes, depths, offsets) and
    the tail cut off at random."""
    data = bytearray(seed)
    for at, value in edits:
        if at < len(data):
            data[at] = value
    _decode_within_budget(bytes(data[: len(data) - cut] if cut < len(data) else data))


def test_header_reading_stops_at_a_looping_tiff_directory() -> None:
    """A TIFF whose directory points at itself is read once, not forever."""
    tiff = bytearray(b"II*\x00\x08\x00\x00\x00")
    entries = [(256, 4, 1, 8), (257, 4, 1, 8)]
    tiff += len(entries).to_bytes(2, "little")
    for tag, kind, count, value in entries:
        tiff += tag.to_bytes(2, "little") + kind.to_bytes(2, "little")
        tiff += count.to_bytes(4, "little") + value.to_bytes(4, "little")
    tiff += (8).to_bytes(4, "little")  # next directory: this one again
    header = read_header(io.BytesIO(bytes(tiff)), "loop.tif")
    assert (header.width, header.height, header.frames) == (8, 8, 1)
