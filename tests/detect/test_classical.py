"""Classical baselines: Canny edge difference and golden-template comparison."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from defectlab.detect.classical import CannyConfig, CannyDiff, GoldenTemplate, TemplateConfig
from defectlab.training import fit

SIZE = 64


def _parts(n: int, seed: int, shift: tuple[float, float] = (0.0, 0.0), line: bool = False):
    """Fixed-position parts (N, 1, H, W): a bright plate with a dark hole, slight noise;
    optionally translated by ``shift`` (x, y) pixels or with a bright scratch drawn on."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        image = np.full((SIZE, SIZE), 0.3, np.float32)
        cv2.rectangle(image, (16, 16), (47, 40), 0.8, -1)
        cv2.circle(image, (24, 28), 5, 0.1, -1)
        move = np.float32([[1, 0, shift[0]], [0, 1, shift[1]]])
        image = cv2.warpAffine(image, move, (SIZE, SIZE), borderMode=cv2.BORDER_REPLICATE)
        if line:
            cv2.line(image, (20, 52), (50, 57), 1.0, 2)
        images.append(np.clip(image + rng.normal(0, 0.02, image.shape), 0, 1))
    return torch.from_numpy(np.stack(images).astype(np.float32))[:, None]


def _train(model, n: int = 24):
    for chunk in _parts(n, seed=0).split(8):
        model.training_step({"image": chunk})
    model.finish_training()
    return model


def _round_trip(model, make):
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = make()
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    return clone


# --- canny ---------------------------------------------------------------------------------------


def test_canny_flags_a_scratch_and_locates_it() -> None:
    model = _train(CannyDiff(image_size=SIZE))
    # the plate's outline is a frequent edge, the background a rare one
    assert model.frequency[0, 16, 30] > 0.9 and model.frequency[0, 55, 35] < 0.05
    normal = model.predict(_parts(6, seed=1))
    defect = model.predict(_parts(6, seed=2, line=True))
    assert normal.maps.shape == (6, SIZE, SIZE) and normal.scores.shape == (6,)
    assert defect.scores.min() > 3 * normal.scores.max()
    for heat in defect.maps:
        row, col = np.unravel_index(heat.argmax().item(), (SIZE, SIZE))
        assert 48 <= row <= 61 and 18 <= col <= 52, (row, col)


def test_canny_missing_edges_are_flagged_only_when_asked() -> None:
    holed = _parts(4, seed=3)
    plain = holed.clone()
    plain[:, :, 20:37, 16:33] = 0.8  # the hole (and its edge) is missing
    scores = {}
    for weight in (0.0, 1.0):
        model = _train(CannyDiff(CannyConfig(missing_weight=weight), image_size=SIZE))
        scores[weight] = (model.predict(holed).scores, model.predict(plain).scores)
    assert scores[0.0][1].max() <= scores[0.0][0].max() + 1e-6  # fewer edges: nothing to see
    assert scores[1.0][1].min() > 3 * scores[1.0][0].max()


def test_canny_state_round_trip() -> None:
    model = _train(CannyDiff(image_size=SIZE))
    clone = _round_trip(model, lambda: CannyDiff(image_size=SIZE))
    x = _parts(3, seed=4, line=True)
    a, b = model.predict(x), clone.predict(x)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    with pytest.raises(ValueError, match="shape"):
        CannyDiff(image_size=32).load_state_dict(model.state_dict())
    with pytest.raises(RuntimeError, match="before fit"):
        CannyDiff(image_size=SIZE).predict(x)
    with pytest.raises(ValueError, match="do not match"):
        model.predict(torch.rand(1, 1, 32, 32))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 2}, "single pass"),
        ({"low_threshold": 200.0, "high_threshold": 100.0}, "low_threshold <= high_threshold"),
        ({"low_threshold": -1.0}, "low_threshold"),
        ({"score_top_fraction": 1.5}, "score_top_fraction"),
        ({"missing_weight": -1.0}, "missing_weight"),
        ({"tolerance_sigma": -1.0}, "tolerance_sigma"),
    ],
)
def test_canny_bad_configs(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CannyConfig(**overrides)


# --- golden template -----------------------------------------------------------------------------


def test_template_flags_a_scratch_and_locates_it() -> None:
    model = _train(GoldenTemplate(image_size=SIZE))
    normal = model.predict(_parts(6, seed=1))
    defect = model.predict(_parts(6, seed=2, line=True))
    assert defect.scores.min() > 3 * normal.scores.max()
    for heat in defect.maps:
        row, col = np.unravel_index(heat.argmax().item(), (SIZE, SIZE))
        assert 48 <= row <= 61 and 18 <= col <= 52, (row, col)


@pytest.mark.parametrize("alignment", ["phase", "ecc"])
def test_template_alignment_absorbs_a_shift(alignment: str) -> None:
    aligned = _train(GoldenTemplate(TemplateConfig(alignment=alignment), image_size=SIZE))
    unaligned = _train(GoldenTemplate(TemplateConfig(alignment="none"), image_size=SIZE))
    normal, shifted = _parts(6, seed=1), _parts(6, seed=1, shift=(4.0, -3.0))
    # sub-pixel estimation error remains (about 0.2 px for phase correlation) and this
    # noise-free part has razor-sharp edges, hence "within 2×" rather than equal
    on = aligned.predict(shifted).scores
    assert on.max() < 2 * aligned.predict(normal).scores.max()
    off = unaligned.predict(shifted).scores
    assert off.min() > 10 * unaligned.predict(normal).scores.max()
    assert aligned.alignment_failures == 0


def test_template_aligns_a_jittered_training_set() -> None:
    model = GoldenTemplate(TemplateConfig(statistic="mean"), image_size=SIZE)
    for i, shift in enumerate([(0, 0), (3, 1), (-2, 2), (1, -3)] * 3):
        model.training_step({"image": _parts(2, seed=i, shift=shift)})
    model.finish_training()
    sharp = _train(GoldenTemplate(TemplateConfig(statistic="mean"), image_size=SIZE))
    # the template is as sharp as one built from unshifted parts (the reference is unshifted)
    assert (model.template - sharp.template).abs().max() < 0.1


def test_template_streaming_median_matches_the_exact_median() -> None:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.beta(2, 5, (41, 1, 16, 16)).astype(np.float32))
    config = TemplateConfig(alignment="none", blur_sigma=0.0, median_bins=128)
    model = GoldenTemplate(config, image_size=16)
    for chunk in images.split(10):
        model.training_step({"image": chunk})
    model.finish_training()
    exact = images.median(dim=0).values
    assert (model.template - exact).abs().max() < 1.0 / 128
    mean = GoldenTemplate(TemplateConfig(alignment="none", statistic="mean"), image_size=16)
    mean.training_step({"image": images})
    mean.finish_training()
    # skewed data: mean and median differ, and each model reports its own statistic
    assert (mean.template - model.template).mean() > 0.02


def test_template_ecc_failure_falls_back_to_no_warp(monkeypatch) -> None:
    model = _train(GoldenTemplate(TemplateConfig(alignment="ecc"), image_size=SIZE))
    x = _parts(3, seed=5, shift=(2.0, 1.0))
    expected = model.predict(x)  # real ECC works on these

    def broken(*args, **kwargs):
        raise cv2.error("simulated ECC failure")

    monkeypatch.setattr(cv2, "findTransformECC", broken)
    fallback = model.predict(x)
    assert model.alignment_failures == 3
    unwarped = GoldenTemplate(TemplateConfig(alignment="none"), image_size=SIZE)
    unwarped.load_state_dict(model.state_dict())
    assert torch.equal(fallback.scores, unwarped.predict(x).scores)
    assert fallback.scores.min() > expected.scores.max()
    monkeypatch.undo()

    flat = torch.full((2, 1, SIZE, SIZE), 0.5)  # a genuine ECC failure: no texture at all
    out = model.predict(flat)
    assert torch.isfinite(out.scores).all() and torch.isfinite(out.maps).all()


def test_template_state_round_trip_and_resume(tmp_path: Path, monkeypatch) -> None:
    model = _train(GoldenTemplate(image_size=SIZE))
    clone = _round_trip(model, lambda: GoldenTemplate(image_size=SIZE))
    x = _parts(3, seed=6, shift=(1.0, 2.0), line=True)
    a, b = model.predict(x), clone.predict(x)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    with pytest.raises(ValueError, match="shape"):
        GoldenTemplate(image_size=32).load_state_dict(model.state_dict())

    # an interrupted streaming pass resumes from the running histogram to the same template
    images = _parts(20, seed=7).numpy().transpose(0, 2, 3, 1)

    def run(run_dir: Path, **kwargs) -> GoldenTemplate:
        m = GoldenTemplate(image_size=SIZE)
        fit(m, images, run_dir=run_dir, batch_size=4, checkpoint_every=2, progress=False, **kwargs)
        return m

    reference = run(tmp_path / "ref")
    calls = {"n": 0}
    original = GoldenTemplate.training_step

    def interrupted(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(GoldenTemplate, "training_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run")
    monkeypatch.setattr(GoldenTemplate, "training_step", original)
    resumed = run(tmp_path / "run", resume=True)
    assert torch.equal(resumed.template, reference.template)
    assert torch.equal(resumed.std, reference.std)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 2}, "single pass"),
        ({"alignment": "sift"}, "alignment must be one of"),
        ({"statistic": "mode"}, "statistic must be one of"),
        ({"min_std": 0.0}, "min_std"),
        ({"median_bins": 1}, "median_bins"),
        ({"max_shift": 0.0}, "max_shift"),
        ({"map_sigma": -1.0}, "map_sigma"),
    ],
)
def test_template_bad_configs(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TemplateConfig(**overrides)
