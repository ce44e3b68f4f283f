"""Procedural defect painting: reproducibility, exact masks, placement, config."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from defectlab.components.painting import SHAPES, ProceduralConfig, ProceduralPainter

SEEDS = range(20)


def textured(size: int = 64, channels: int = 1, seed: int = 0) -> np.ndarray:
    """A mid-grey surface with stripes and fine noise, float32 (size, size, channels)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    base = 0.5 + 0.1 * np.sin(x / 5.0) + 0.05 * np.cos(y / 7.0)
    grey = np.clip(base + rng.normal(0, 0.02, (size, size)), 0, 1)
    tint = np.array([1.0, 0.9, 0.8])[:channels]
    return (grey[:, :, None] * tint).astype(np.float32)


def object_on_background(bright_object: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A disc (radius 18) on a contrasting background, and the disc's bool mask."""
    rng = np.random.default_rng(1)
    disc = np.zeros((64, 64), np.uint8)
    cv2.circle(disc, (30, 34), 18, 1, cv2.FILLED)
    inside, outside = (0.7, 0.1) if bright_object else (0.2, 0.8)
    grey = np.where(disc > 0, inside, outside) + rng.normal(0, 0.02, disc.shape)
    return np.clip(grey, 0, 1).astype(np.float32)[:, :, None], disc.astype(bool)


def synth(**config: object) -> ProceduralPainter:
    return ProceduralPainter(ProceduralConfig(**config))  # type: ignore[arg-type]


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def test_same_seed_same_output_different_seed_differs() -> None:
    image = textured()
    a = synth().synthesize(image, np.random.default_rng([0, 5]))
    b = synth().synthesize(image, np.random.default_rng([0, 5]))
    c = synth().synthesize(image, np.random.default_rng([0, 6]))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.record == b.record
    assert not np.array_equal(a.image, c.image)
    assert not np.array_equal(a.mask, c.mask)


def test_generate_reproduces_any_sample_alone() -> None:
    images = [textured(seed=0), textured(seed=1)]
    samples = [s for _, s in synth().generate(images, 4, seed=3)]
    alone = synth().synthesize(images[1], np.random.default_rng([3, 3]))
    assert np.array_equal(samples[3].image, alone.image)
    assert not np.array_equal(samples[1].image, samples[3].image)


@pytest.mark.parametrize("seed", SEEDS)
def test_mask_is_exact_and_outside_is_untouched(seed: int) -> None:
    image = textured()
    before = image.copy()
    config = ProceduralConfig()
    sample = ProceduralPainter(config).synthesize(image, np.random.default_rng(seed))
    assert np.array_equal(image, before), "the input image was modified"
    mask = sample.mask
    assert mask.dtype == bool and mask.shape == (64, 64)
    assert mask.sum() >= config.min_mask_pixels
    assert sample.image.shape == image.shape and sample.image.dtype == np.float32
    assert sample.image.min() >= 0.0 and sample.image.max() <= 1.0
    # the soft alpha reaches at most ~3 sigma beyond the mask; everything else is bit-identical
    support = dilate(mask, math.ceil(3 * config.edge_softness[1]) + 2)
    assert np.array_equal(sample.image[~support], image[~support])
    assert (sample.image[mask] != image[mask]).mean() > 0.9


@pytest.mark.parametrize("seed", SEEDS)
def test_intensity_inside_mask_changes_clearly(seed: int) -> None:
    image = textured()
    sample = synth(defects_per_image=(1, 1)).synthesize(image, np.random.default_rng(seed))
    mask = sample.mask
    # contrast >= 0.15 of a 0.5 background: a mean shift of at least ~0.04 survives noise
    assert abs(float(sample.image[mask].mean() - image[mask].mean())) > 0.04


@pytest.mark.parametrize("seed", SEEDS)
def test_defects_keep_off_the_border(seed: int) -> None:
    image = textured()
    config = ProceduralConfig(roi="none", border_margin=0.2, size_fraction=(0.1, 0.3))
    sample = ProceduralPainter(config).synthesize(image, np.random.default_rng(seed))
    margin = math.ceil(0.2 * 64)
    band = np.ones((64, 64), bool)
    band[margin:-margin, margin:-margin] = False
    assert sample.mask.any() and not sample.mask[band].any()
    assert np.array_equal(sample.image[band], image[band])


@pytest.mark.parametrize("bright_object", [True, False])
def test_defects_stay_inside_the_otsu_object(bright_object: bool) -> None:
    image, disc = object_on_background(bright_object)
    inside = synth(roi="otsu", border_margin=0.0, size_fraction=(0.2, 0.4))
    for seed in SEEDS:
        sample = inside.synthesize(image, np.random.default_rng(seed))
        assert sample.record["roi"] == "otsu"
        assert sample.mask.any() and not (sample.mask & ~disc).any()
        assert np.array_equal(sample.image[~disc], image[~disc])
    # the check has teeth: without the ROI, defects do land on the background
    anywhere = synth(roi="none", border_margin=0.0, size_fraction=(0.2, 0.4))
    outside = [
        (anywhere.synthesize(image, np.random.default_rng(s)).mask & ~disc).any() for s in SEEDS
    ]
    assert any(outside)


def test_otsu_falls_back_to_whole_image_on_plain_texture() -> None:
    sample = synth(roi="otsu").synthesize(textured(), np.random.default_rng(0))
    assert sample.record["roi"] == "whole"


def test_rgb_image() -> None:
    image = textured(channels=3)
    sample = synth().synthesize(image, np.random.default_rng(2))
    assert sample.image.shape == (64, 64, 3) and sample.image.dtype == np.float32
    assert sample.mask.shape == (64, 64) and sample.mask.any()
    changed = (sample.image != image).any(axis=2)
    assert changed[sample.mask].all()
    again = synth().synthesize(image, np.random.default_rng(2))
    assert np.array_equal(sample.image, again.image)


def test_plain_2d_and_float64_images_keep_their_form() -> None:
    image = textured()[:, :, 0].astype(np.float64)
    sample = synth().synthesize(image, np.random.default_rng(0))
    assert sample.image.shape == (64, 64) and sample.image.dtype == np.float64


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_each_shape_alone(shape: str) -> None:
    image = textured()
    maker = synth(shapes=(shape,), defects_per_image=(1, 1))  # crossing lines are thicker
    for seed in range(8):
        sample = maker.synthesize(image, np.random.default_rng(seed))
        assert sample.mask.sum() >= 12
        assert set(sample.record["shapes"].split("+")) == {shape}
        depth = cv2.distanceTransform(sample.mask.astype(np.uint8), cv2.DIST_L2, 3)
        if shape == "scratch":
            assert depth.max() <= 3.5, "a scratch should be a thin line"
        if shape == "crack":  # 1-2 px wide away from the junctions of its branches
            assert np.percentile(depth[sample.mask], 90) <= 1.4, "a crack should be 1-2 px wide"


def test_shape_generators_draw_near_the_centre() -> None:
    for name, generator in SHAPES.items():
        mask = generator(np.random.default_rng(0), 100, 120, (40.0, 70.0), 15.0)
        assert mask.dtype == bool and mask.shape == (100, 120), name
        ys, xs = np.nonzero(mask)
        assert ys.size > 10, name
        assert np.hypot(ys - 40, xs - 70).max() <= 15 * 1.3, name


def test_record_is_flat_and_consistent() -> None:
    sample = synth(defects_per_image=(2, 2)).synthesize(textured(), np.random.default_rng(4))
    record = sample.record
    json.dumps(record)
    assert all(isinstance(v, str | int | float) for v in record.values())
    assert record["n_defects"] == 2
    for key in ("shapes", "centres_yx", "radii", "contrasts", "softness", "textures"):
        assert len(str(record[key]).split(";" if key != "shapes" else "+")) == 2, key
    assert record["area_fraction"] == pytest.approx(sample.mask.mean(), abs=1e-6)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"shapes": ("bezier_blob", "star")}, "unknown shapes"),
        ({"shapes": ()}, "at least one"),
        ({"defects_per_image": (0, 2)}, "defects_per_image"),
        ({"defects_per_image": (3, 1)}, "above high"),
        ({"size_fraction": (0.0, 0.2)}, "size_fraction"),
        ({"contrast": (0.5, 0.2)}, "above high"),
        ({"contrast": (0.1, 1.5)}, "contrast"),
        ({"edge_softness": (-1.0, 1.0)}, "edge_softness"),
        ({"texture": (0.5,)}, "pair"),
        ({"border_margin": 0.5}, "border_margin"),
        ({"roi": "box"}, "roi"),
        ({"min_mask_pixels": 0}, "min_mask_pixels"),
    ],
)
def test_bad_config_is_refused(config: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProceduralConfig(**config)  # type: ignore[arg-type]


def test_tiny_image_is_refused_small_image_still_works() -> None:
    with pytest.raises(ValueError, match="too small"):
        synth().synthesize(textured(size=64)[:12], np.random.default_rng(0))
    for seed in range(10):
        sample = synth().synthesize(textured(size=16), np.random.default_rng(seed))
        assert sample.mask.any()


def test_fallback_when_no_defect_fits_the_roi() -> None:
    # a defect larger than the image allows can never reach 2000 px: the fallback disc is used
    sample = synth(min_mask_pixels=2000).synthesize(textured(), np.random.default_rng(0))
    assert sample.record["shapes"] == "disc" and sample.mask.any()


# --- shape families, blending modes, texture sources ------------------------------------------

NEW_FAMILIES = ("elastic_line", "elastic_circle", "perlin_region", "crack", "cutpaste", "scar")


def test_default_mix_has_every_family() -> None:
    assert set(ProceduralConfig().shapes) == set(SHAPES)
    assert set(NEW_FAMILIES) <= set(SHAPES)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_each_family_lands_inside_the_roi_and_off_the_margin(shape: str) -> None:
    image, disc = object_on_background()
    margin = math.ceil(0.25 * 64)
    inner = np.zeros((64, 64), bool)
    inner[margin:-margin, margin:-margin] = True
    maker = synth(shapes=(shape,), roi="otsu", border_margin=0.25, size_fraction=(0.15, 0.3))
    for seed in range(6):
        sample = maker.synthesize(image, np.random.default_rng(seed))
        assert sample.record["shapes"].split("+")[0] == shape
        assert sample.mask.sum() >= 12
        assert not (sample.mask & ~(disc & inner)).any(), "defect outside the ROI or in margin"
        assert np.array_equal(sample.image[~sample.mask], image[~sample.mask])


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("channels", [1, 3])
def test_alpha_blend_changes_exactly_the_mask(shape: str, channels: int) -> None:
    image = textured(channels=channels)
    maker = synth(shapes=(shape,), defects_per_image=(1, 3), blend="alpha")
    for seed in range(6):
        sample = maker.synthesize(image, np.random.default_rng(seed))
        changed = (sample.image != image).any(axis=2)
        assert np.array_equal(changed, sample.mask)
        assert sample.record["blend"] == "alpha"
        assert sample.record["outside_mask_changed"] is False


@pytest.mark.parametrize("channels", [1, 3])
def test_poisson_blend_records_changes_outside_the_mask(channels: int) -> None:
    from defectlab.components.painting import POISSON_RING_PX

    image = textured(channels=channels)
    maker = synth(blend="poisson", roi="none", border_margin=0.2)
    band = np.ones((64, 64), bool)
    band[13:-13, 13:-13] = False
    flags = []
    for seed in SEEDS:
        sample = maker.synthesize(image, np.random.default_rng(seed))
        changed = (sample.image != image).any(axis=2)
        outside = changed & ~sample.mask
        assert sample.record["blend"] == "poisson"
        assert sample.record["outside_mask_changed"] == bool(outside.any())
        flags.append(sample.record["outside_mask_changed"])
        # only a thin seamless ring around the defect changes, and only slightly
        assert not (changed & ~dilate(sample.mask, POISSON_RING_PX)).any()
        assert np.abs(sample.image - image).max(axis=2)[outside].max(initial=0.0) < 0.05
        assert not changed[band].any(), "Poisson blending reached the border margin"
        assert (changed[sample.mask]).mean() > 0.9
        assert sample.image.min() >= 0.0 and sample.image.max() <= 1.0
    assert any(flags)
    again = maker.synthesize(image, np.random.default_rng(3))
    first = maker.synthesize(image, np.random.default_rng(3))
    assert np.array_equal(again.image, first.image) and again.record == first.record


@pytest.mark.parametrize("shape", NEW_FAMILIES)
@pytest.mark.parametrize("blend", ["alpha", "poisson"])
def test_each_family_is_deterministic_by_seed(shape: str, blend: str) -> None:
    image = textured()
    maker = synth(shapes=(shape,), blend=blend)
    a = maker.synthesize(image, np.random.default_rng(11))
    b = synth(shapes=(shape,), blend=blend).synthesize(image, np.random.default_rng(11))
    c = maker.synthesize(image, np.random.default_rng(12))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.record == b.record
    assert not np.array_equal(a.mask, c.mask)


def test_shape_weights_pick_the_families() -> None:
    maker = synth(shapes=("crack", "perlin_region"), shape_weights=(0.0, 1.0))
    for seed in range(6):
        sample = maker.synthesize(textured(), np.random.default_rng(seed))
        assert set(sample.record["shapes"].split("+")) == {"perlin_region"}


def test_cutpaste_takes_a_whole_patch_from_the_same_image() -> None:
    maker = synth(shapes=("cutpaste", "scar"), defects_per_image=(2, 2))
    sample = maker.synthesize(textured(), np.random.default_rng(0))
    assert sample.record["texture_origins"] == "self;self"
    assert sample.record["textures"] == "1.00;1.00"


def checkerboard(size: int = 64) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    return (0.3 + 0.4 * (((y // 4) + (x // 4)) % 2)).astype(np.float32)[:, :, None]


def test_texture_from_another_normal_image() -> None:
    images = [textured(seed=0), checkerboard()]
    maker = synth(foreign_texture=1.0, texture=(1.0, 1.0), shapes=("bezier_blob",))
    samples = list(maker.generate(images, 4, seed=2))
    for index, (source, sample) in enumerate(samples):
        assert source == index % 2
        assert sample.record["texture_image"] == 1 - source
        assert set(sample.record["texture_origins"].split(";")) == {"other"}
    # reproducible alone when given the same texture image
    alone = maker.synthesize(images[0], np.random.default_rng([2, 2]), images[1])
    assert np.array_equal(alone.image, samples[2][1].image)
    # the texture really is the other image's: a different source gives a different fill
    own = maker.synthesize(images[0], np.random.default_rng([2, 2]), images[0])
    assert np.array_equal(own.mask, alone.mask)
    assert not np.array_equal(own.image, alone.image)
    # without another image the texture comes from elsewhere in the same one
    solo = maker.synthesize(images[0], np.random.default_rng([2, 2]))
    assert set(solo.record["texture_origins"].split(";")) == {"self"}


def test_default_generate_uses_no_foreign_texture() -> None:
    _, sample = next(synth().generate([textured(seed=0), textured(seed=1)], 1))
    assert sample.record["texture_image"] == -1


def test_texture_image_of_another_size_and_channels() -> None:
    maker = synth(foreign_texture=1.0)
    small_rgb = np.repeat(checkerboard(32), 3, axis=2)
    for seed in range(4):
        sample = maker.synthesize(textured(), np.random.default_rng(seed), small_rgb)
        changed = (sample.image != textured()).any(axis=2)
        assert np.array_equal(changed, sample.mask)


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"shapes": ("crack", "zigzag")}, "shapes"),
        ({"shape_weights": (1.0, 2.0)}, "shape_weights"),
        ({"shapes": ("crack", "scar"), "shape_weights": (-1.0, 2.0)}, "shape_weights"),
        ({"shapes": ("crack", "scar"), "shape_weights": (0.0, 0.0)}, "shape_weights"),
        ({"size_fraction": (0.3, 0.1)}, "size_fraction"),
        ({"edge_softness": (3.0, 1.0)}, "edge_softness"),
        ({"texture": (0.9, 0.1)}, "texture"),
        ({"foreign_texture": 1.5}, "foreign_texture"),
        ({"blend": "median"}, "blend"),
    ],
)
def test_bad_new_config_names_the_field(config: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ProceduralConfig(**config)  # type: ignore[arg-type]


def test_config_can_be_set_from_the_command_line() -> None:
    from defectlab.config import apply_overrides
    from defectlab.errors import ConfigError

    config = apply_overrides(
        ProceduralConfig(),
        {
            "shapes": "crack,scar",
            "shape_weights": "1,3",
            "blend": "poisson",
            "contrast": "0.2,0.3",
            "foreign_texture": "0.5",
            "defects_per_image": "2,4",
        },
    )
    assert config.shapes == ("crack", "scar") and config.shape_weights == (1.0, 3.0)
    assert config.blend == "poisson" and config.contrast == (0.2, 0.3)
    assert config.defects_per_image == (2, 4) and config.foreign_texture == 0.5
    with pytest.raises(ConfigError, match="size_fraction"):
        apply_overrides(ProceduralConfig(), {"size_fraction": "0.3,0.1"})
    with pytest.raises(ConfigError, match="shapes"):
        apply_overrides(ProceduralConfig(), {"shapes": "crack,zigzag"})


def test_shape_ranges_reach_the_generators(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, object]] = []
    crack = SHAPES["crack"]

    def spy(*args: object, **params: object) -> np.ndarray:
        seen.append(params)
        return crack(*args, **params)  # type: ignore[arg-type]

    monkeypatch.setitem(SHAPES, "crack", spy)
    synth(shapes=("crack",), crack_branches=(2, 2)).synthesize(textured(), np.random.default_rng(0))
    assert seen and all(p == {"branches": (2, 2)} for p in seen)
    config = ProceduralConfig(perlin_octaves=(1, 1), perlin_coverage=(0.5, 0.5))
    assert config.shape_params("perlin_region") == {"octaves": (1, 1), "coverage": (0.5, 0.5)}
    assert config.shape_params("bezier_blob") == {}


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"crack_branches": (0.5, 2)}, "crack_branches"),
        ({"crack_branches": (3, 1)}, "crack_branches"),
        ({"perlin_octaves": (0, 2)}, "perlin_octaves"),
        ({"perlin_coverage": (0.0, 0.5)}, "perlin_coverage"),
        ({"elastic_strength": (0.1, 0.5)}, "elastic_strength"),
    ],
)
def test_bad_shape_ranges_name_the_field(config: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ProceduralConfig(**config)  # type: ignore[arg-type]
