"""Copy-paste baseline: exact masks, the pasted pixels are the real defect's, blending only at
the mask edge, flips and positions from the rng, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from defectlab.errors import DataError
from defectlab.synth.copypaste import CopyPaste, CopyPasteConfig, extract_patches


def defect(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((size, size, 1), 0.3, np.float32)
    mask = np.zeros((size, size), bool)
    mask[10:14, 5:20] = True  # an asymmetric bar: flips are visible
    mask[10, 5] = False
    image[mask] = 0.9
    return image, mask


def test_patches_are_the_mask_components() -> None:
    image, mask = defect()
    mask2 = mask.copy()
    mask2[25:30, 25:30] = True
    mask2[0, 31] = True  # 1 px: below min_area
    patches = extract_patches([image], [mask2], margin=2, min_area=4)
    assert len(patches) == 2
    assert sorted(int(p.mask.sum()) for p in patches) == [25, int(mask.sum())]
    assert patches[0].image.shape[:2] == patches[0].mask.shape


def test_hard_paste_copies_the_defect_and_the_mask_is_exact() -> None:
    image, mask = defect()
    model = CopyPaste.from_examples(
        [image], [mask], CopyPasteConfig(feather=0, match_brightness=False)
    )
    normal = np.full((32, 32, 1), 0.5, np.float32)
    sample = model.synthesize(normal, np.random.default_rng(0))
    assert sample.mask.sum() == mask.sum() == sample.record["mask_area"]
    np.testing.assert_array_equal(sample.image[sample.mask], np.float32(0.9))
    np.testing.assert_array_equal(sample.image[~sample.mask], np.float32(0.5))


def test_feather_blends_just_outside_the_mask_only() -> None:
    image, mask = defect()
    config = CopyPasteConfig(feather=1.5, match_brightness=False)
    model = CopyPaste.from_examples([image], [mask], config)
    normal = np.full((32, 32), 0.5, np.float32)
    sample = model.synthesize(normal, np.random.default_rng(1))
    assert sample.image.shape == normal.shape
    np.testing.assert_allclose(sample.image[sample.mask], 0.9, atol=1e-6)
    changed = np.abs(sample.image - normal) > 1e-6
    assert (changed & ~sample.mask).any()  # a soft edge …
    from scipy.ndimage import binary_dilation

    near = binary_dilation(sample.mask, np.ones((3, 3)), iterations=4)  # the patch margin
    visible = np.abs(sample.image - normal) > 1e-3
    assert not (visible & ~near).any()  # … but nothing visible far from the mask


def test_brightness_match_and_flips_and_reproducibility() -> None:
    image, mask = defect()
    model = CopyPaste.from_examples([image], [mask], CopyPasteConfig(feather=0))
    normal = np.full((32, 32, 1), 0.5, np.float32)
    sample = model.synthesize(normal, np.random.default_rng(2))
    # the ring around the defect was 0.3 in the source, 0.5 here: +0.2
    assert sample.record["brightness_shift"] == pytest.approx(0.2, abs=1e-6)
    np.testing.assert_allclose(sample.image[sample.mask], 1.0, atol=1e-6)  # 0.9 + 0.2, clipped
    flips = {
        (s.record["flip_h"], s.record["flip_v"], s.record["top"], s.record["left"])
        for s in (model.synthesize(normal, np.random.default_rng(i)) for i in range(12))
    }
    assert len(flips) > 4
    again = model.synthesize(normal, np.random.default_rng(2))
    np.testing.assert_array_equal(again.image, sample.image)


def test_no_defect_pixels_is_an_error() -> None:
    image, _ = defect()
    with pytest.raises(DataError, match="at least one real defect"):
        CopyPaste.from_examples([image], [np.zeros((32, 32), bool)])
