"""Localised edits (``generator=residual_attention``) of CrossGAN and CycleGAN: the source is
copied bit for bit outside the attention mask, the mask is the thresholded map, the priors,
state round trip, resume and the API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defectlab import api
from defectlab.components.gan_layers import attention_blend, attention_priors
from defectlab.errors import ConfigError
from defectlab.runs import load_checkpoint, save_checkpoint
from defectlab.synth.crossgan import CrossGAN
from defectlab.synth.cyclegan import CycleGAN
from defectlab.synth.translation import MaskRule, attention_mask
from tests.synth.gan_checks import assert_resume_reproduces_the_uninterrupted_run
from tests.synth.test_crossgan import SIZE, TINY, batch_of, fit_tiny, make, surfaces

LOCAL = {"generator": "residual_attention"}


def half_open(model, source: np.ndarray, seed: int) -> None:
    """Threshold at the median of the map the sample will use: about half the pixels pass,
    so a sample has both an edited and an untouched region."""
    model.nets.eval()
    with torch.no_grad():
        _, attention, _ = model.translate(model._to_tensor(source), np.random.default_rng(seed))
    median = float(attention.median())
    model.configure_synthesis({"attention_threshold": repr(median)})


@pytest.mark.parametrize("cls", [CrossGAN, CycleGAN])
@pytest.mark.parametrize("channels", [1, 3])
def test_outside_the_mask_the_source_is_copied_bit_for_bit(cls: type, channels: int) -> None:
    model = make(channels, cls=cls, **LOCAL, mask_open=0, mask_min_area=1)
    model.is_fitted = True  # untrained networks on purpose: the rule, not the quality
    source = surfaces(1, 0, channels, seed=3)[0]
    half_open(model, source, 1)
    sample = model.synthesize(source, np.random.default_rng(1))
    mask = sample.mask
    assert 0 < mask.sum() < mask.size
    outside = ~mask
    np.testing.assert_array_equal(sample.image[outside], source[outside])
    assert (sample.image[mask] != source[mask]).any()
    assert sample.record["mask_rule"].startswith("a>")
    assert sample.record["mask_area"] == int(mask.sum())


@pytest.mark.parametrize("cls", [CrossGAN, CycleGAN])
def test_mask_is_the_thresholded_attention_map(cls: type) -> None:
    model = make(1, cls=cls, **LOCAL)
    model.is_fitted = True  # untrained networks on purpose
    source = surfaces(1, 0, seed=4)[0]
    half_open(model, source, 2)
    threshold = model.config.attention_threshold
    sample = model.synthesize(source, np.random.default_rng(2))
    model.nets.eval()
    with torch.no_grad():
        _, attention, _ = model.translate(model._to_tensor(source), np.random.default_rng(2))
    a = attention[0, 0].numpy()
    expected = attention_mask(a, threshold, MaskRule(open_radius=1, min_area=8))
    assert expected.any()
    np.testing.assert_array_equal(sample.mask, expected)
    assert np.all(a[sample.mask] > threshold)


def test_full_generator_has_no_attention_and_still_runs() -> None:
    model = make(1, generator="full")
    model.is_fitted = True  # untrained networks on purpose
    _, attention, _ = model.translate(model._to_tensor(surfaces(1, 0)[0]), np.random.default_rng(0))
    assert attention is None
    assert (
        "|g-x|" in model.synthesize(surfaces(1, 0)[0], np.random.default_rng(0)).record["mask_rule"]
    )


def test_blend_and_priors() -> None:
    source, image = torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8)
    attention = torch.zeros(1, 1, 8, 8)
    attention[..., 2:4, 2:4] = 0.7
    out = attention_blend(source, image, attention)
    assert torch.equal(out[attention == 0], source[attention == 0])
    inside = attention > 0
    torch.testing.assert_close(out[inside], 0.7 * image[inside] + 0.3 * source[inside])
    blob = torch.zeros(1, 1, 8, 8)
    blob[..., :4, :4] = 1.0
    checker = torch.zeros(1, 1, 8, 8)
    checker[..., ::2, ::2] = 1.0
    checker[..., 1::2, 1::2] = 1.0
    sparsity_blob, tv_blob = attention_priors([blob])
    sparsity_checker, tv_checker = attention_priors([checker])
    assert sparsity_blob == pytest.approx(0.25) and sparsity_checker == pytest.approx(0.5)
    assert tv_checker > 4 * tv_blob
    assert attention_priors([torch.zeros(1, 1, 4, 4)])[1] == 0


@pytest.mark.parametrize("cls", [CrossGAN, CycleGAN])
def test_sparsity_prior_is_in_the_loss_and_shrinks_the_map(cls: type) -> None:
    torch.manual_seed(0)
    batch = batch_of(surfaces(2, 2), [0, 0, 1, 1])
    means = {}
    for weight in (0.0, 50.0):
        model = make(1, cls=cls, **LOCAL, attention_sparsity_weight=weight, lr=1e-3)
        torch.manual_seed(0)
        rows = [model.training_step(batch) for _ in range(4)]
        assert all("attention_mean" in r and "attention_tv" in r for r in rows)
        means[weight] = rows[-1]["attention_mean"]
    assert means[50.0] < means[0.0]


@pytest.mark.parametrize("cls", [CrossGAN, CycleGAN])
def test_state_round_trip_gives_identical_samples(tmp_path: Path, cls: type) -> None:
    model = make(1, cls=cls, **LOCAL)
    torch.manual_seed(0)
    model.training_step(batch_of(surfaces(2, 2), [0, 0, 1, 1]))
    model.is_fitted = True  # one step by hand, not through fit()
    save_checkpoint(tmp_path / "m.pt", model)
    loaded = make(1, cls=cls, seed=9, **LOCAL)
    loaded.load_state_dict(load_checkpoint(tmp_path / "m.pt")["state"])
    loaded.is_fitted = True  # the state alone; load_run restores the flag
    source = surfaces(1, 0, seed=5)[0]
    a = model.synthesize(source, np.random.default_rng(3))
    b = loaded.synthesize(source, np.random.default_rng(3))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    with pytest.raises(ValueError, match="do not fit"):
        make(1, cls=cls, generator="full").load_state_dict(model.state_dict())


@pytest.mark.parametrize("stop_after", [3])
def test_resume_reproduces_the_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stop_after: int
) -> None:
    def make_local(**overrides: object) -> CrossGAN:
        return make(**LOCAL, **overrides)

    assert_resume_reproduces_the_uninterrupted_run(
        make_local, fit_tiny, tmp_path, monkeypatch, stop_after
    )


def test_threshold_changes_after_training_the_generator_does_not(
    folder_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    overrides = [
        "data.defects_per_class=2",
        "model.epochs=1",
        "train.batch_size=8",
        "generator=residual_attention",
        *(f"{k}={v}" for k, v in TINY.items()),
    ]
    run = api.train(
        "crossgan", folder_root, out, image_size=SIZE, overrides=overrides, progress=False
    )
    assert run.model.config.generator == "residual_attention"
    synth = tmp_path / "synth"
    api.synthesize(
        "crossgan",
        folder_root,
        synth,
        2,
        run=out,
        image_size=SIZE,
        overrides=["attention_threshold=0.2"],
        progress=False,
    )
    assert (synth / "manifest.csv").read_text().count("a>0.2") == 2
    with pytest.raises(ConfigError, match="cannot change after training"):
        api.synthesize(
            "crossgan", folder_root, tmp_path / "x", 1, run=out, overrides=["generator=full"]
        )
