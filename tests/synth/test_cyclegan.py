"""CycleGAN baseline: networks, budget against CrossGAN, losses, state, masks, API round trip."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from defectlab import api
from defectlab.base import Scorer
from defectlab.cli import main
from defectlab.errors import ConfigError
from defectlab.runs import load_checkpoint, save_checkpoint
from defectlab.synth.crossgan import CrossGAN, CrossGANConfig
from defectlab.synth.cyclegan import CycleGAN, CycleGANConfig
from tests.synth.test_crossgan import SIZE, TINY, batch_of, fit_tiny, reference_mask, surfaces
from tests.synth.test_crossgan import make as make_any


def make(channels: int = 1, **overrides: object) -> CycleGAN:
    return make_any(channels, CycleGAN, **{"res_blocks": 1, **overrides})


@pytest.mark.parametrize("channels", [1, 3])
def test_network_shapes(channels: int) -> None:
    model = make(channels)
    images = torch.rand(2, channels, SIZE, SIZE) * 2 - 1
    assert model.to_defect(images).shape == images.shape
    assert model.to_normal(images).shape == images.shape
    maps = model.nets["defect_discriminator"](images)
    assert [m.shape[-1] for m in maps] == [8, 4, 2]


def test_parameter_budget_is_comparable_to_crossgan() -> None:
    cycle = CycleGAN(CycleGANConfig(), image_size=128).parameter_counts()
    cross = CrossGAN(CrossGANConfig(), image_size=128).parameter_counts()
    generator_side = ("content_encoder", "detail_encoder", "defect_generator", "normal_generator")
    cross_gen = sum(cross[k] for k in generator_side)
    cycle_gen = cycle["defect_generator"] + cycle["normal_generator"]
    print(
        f"\n128 px, width 32: crossgan {sum(cross.values())} total, {cross_gen} encoders + "
        f"generators; cyclegan {sum(cycle.values())} total, {cycle_gen} generators"
    )
    assert 0.8 < cycle_gen / cross_gen < 1.25
    assert cycle["defect_discriminator"] == cross["defect_discriminator"]  # same D_Y


def test_losses_and_identity_term() -> None:
    batch = batch_of(surfaces(2, 2), [0, 1, 0, 1])
    with_identity = make().training_step(batch)
    assert {"cycle", "g_adv", "identity", "d_normal", "d_defect"} <= set(with_identity)
    without = make(identity_weight=0.0).training_step(batch)
    assert "identity" not in without
    assert make().config.gan_loss == "lsgan"  # the CycleGAN paper's choice


def test_overfit_lowers_cycle_loss() -> None:
    model = make(lr=2e-3, weight_decay=0.0)
    batch = batch_of(surfaces(2, 2), [0, 0, 1, 1])
    history = [model.training_step(batch)["cycle"] for _ in range(30)]
    assert np.mean(history[-5:]) < 0.75 * np.mean(history[:5]), history


def test_same_seed_same_losses_and_resume(tmp_path: Path) -> None:
    first = fit_tiny(make(epochs=2, lr_decay_epochs=1), tmp_path / "a")
    assert first == fit_tiny(make(epochs=2, lr_decay_epochs=1), tmp_path / "b")
    fit_tiny(make(epochs=1, lr_decay_epochs=1), tmp_path / "c")
    resumed = fit_tiny(make(epochs=2, lr_decay_epochs=1, seed=7), tmp_path / "c", resume=True)
    assert resumed == first


def test_state_round_trip_and_mask_rule(tmp_path: Path) -> None:
    model = make(3, mask_k=1.0)
    batch = batch_of(surfaces(2, 2, 3), [0, 0, 1, 1])
    model.training_step(batch)
    model.is_fitted = True  # one step by hand, not through fit(); saved with the checkpoint
    save_checkpoint(tmp_path / "m.pt", model)
    loaded = make(3, mask_k=1.0, seed=5)
    loaded.load_state_dict(load_checkpoint(tmp_path / "m.pt")["state"])
    loaded.is_fitted = True  # the state alone; load_run restores the flag
    source = surfaces(1, 0, 3, seed=5)[0]
    a = model.synthesize(source, np.random.default_rng(0))
    b = loaded.synthesize(source, np.random.default_rng(1))  # deterministic: no detail code
    np.testing.assert_array_equal(a.image, b.image)
    expected, threshold = reference_mask(a.image, source, k=1.0, floor=0.02)
    np.testing.assert_array_equal(a.mask, expected)
    assert a.record["detail"] == "none" and a.record["mask_threshold"] == pytest.approx(
        threshold, abs=1e-5
    )
    assert a.record["mask_area"] == int(expected.sum())


def test_refusals() -> None:
    model = make()
    with pytest.raises(ConfigError, match="takes no --defects"):
        model.use_defect_examples([np.zeros((SIZE, SIZE, 1), np.float32)])
    assert not isinstance(model, Scorer) and not hasattr(model, "predict")


@pytest.mark.parametrize(
    ("field", "value"),
    [("res_blocks", 0), ("cycle_weight", -1.0), ("identity_weight", -0.5), ("disc_scales", 0)],
)
def test_bad_config_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        CycleGANConfig(**{field: value})


def test_train_from_the_command_line_and_synthesize_through_the_api(
    folder_root: Path, tmp_path: Path
) -> None:
    overrides = [
        "data.defects_per_class=2",
        "epochs=1",
        "train.batch_size=8",
        "res_blocks=1",
        *(f"model.{k}={v}" for k, v in TINY.items() if k in ("width", "disc_layers")),
    ]
    out = tmp_path / "run"
    code = main(
        ["train", "--model", "cyclegan", "--data", str(folder_root), "--out", str(out)]
        + ["--image-size", str(SIZE)]
        + [arg for override in overrides for arg in ("--set", override)]
    )
    assert code == 0  # the command line's summary has no thresholds to print for a GAN
    with pytest.raises(ConfigError, match="not crossgan"):
        CrossGAN.from_run(out)
    out2 = tmp_path / "synth"
    api.synthesize("cyclegan", folder_root, out2, 4, run=out, image_size=SIZE, progress=False)
    with open(out2 / "manifest.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["method"] for r in rows} == {"cyclegan"}
    assert len(list((out2 / "masks").glob("*.png"))) == 4
