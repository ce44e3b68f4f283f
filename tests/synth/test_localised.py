"""Localised edits (``generator=residual_attention``) of CrossGAN and CycleGAN: the source is
copied bit for bit outside the attention mask, the mask is the thresholded map, the priors,
state round trip, resume and the API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defectlab import api
from defectlab.components.gan_layers import AttentionOutput, attention_blend, attention_priors
from defectlab.errors import ConfigError
from defectlab.runs import load_checkpoint, load_run, save_checkpoint
from defectlab.synth.crossgan import CrossGAN
from defectlab.synth.cyclegan import CycleGAN
from defectlab.synth.translation import MaskRule, area_target, attention_mask
from tests.synth.gan_checks import assert_resume_reproduces_the_uninterrupted_run
from tests.synth.test_crossgan import (
    SIZE,
    TINY,
    batch_of,
    fit_tiny,
    make,
    surfaces,
    train_tiny_run,
)

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


@pytest.mark.parametrize("cls", [CrossGAN, CycleGAN])
def test_localised_edits_are_the_default_and_the_seed_design_one_setting_away(cls: type) -> None:
    assert cls.Config().generator == "residual_attention"
    assert cls.Config(generator="full").attention is False


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
    run = train_tiny_run(
        "crossgan",
        folder_root,
        out,
        *(f"{k}={v}" for k, v in TINY.items()),
        "generator=residual_attention",  # after TINY, which holds the seed's generator
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


def test_a_run_saved_before_the_generator_setting_loads_as_the_seed_design(
    folder_root: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    train_tiny_run("cyclegan", folder_root, out, "width=4", "disc_layers=2", "generator=full")
    payload = load_checkpoint(out / "model.pt")
    del payload["run_config"]["model_config"]["generator"]  # as saved before the setting
    torch.save(payload, out / "model.pt")
    run = load_run(out)
    assert run.model.config.generator == "full"
    sample = run.model.synthesize(surfaces(1, 0)[0], np.random.default_rng(0))
    assert "|g-x|" in sample.record["mask_rule"]


# --- what keeps the map from collapsing (attention priors) --------------------------------------


def disc_batch(n_normal: int, n_defect: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Striped normal surfaces and defect surfaces with one bright disc each, the discs'
    masks as the defect masks (normal masks empty)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    images = list(surfaces(n_normal + n_defect, 0, seed=seed))
    masks = [np.zeros((SIZE, SIZE), np.float32)] * n_normal
    for image in images[n_normal:]:
        cy, cx = rng.integers(10, SIZE - 10, 2)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 36
        image[disc] = 0.95
        masks.append(disc.astype(np.float32))
    batch = batch_of(np.stack(images), [0] * n_normal + [1] * n_defect)
    batch["mask"] = torch.from_numpy(np.stack(masks))
    return batch


#: the loss terms switched off to isolate one attention prior
NO_PRIORS = {
    "attention_sparsity_weight": 0.0,
    "attention_tv_weight": 0.0,
    "attention_area_weight": 0.0,
    "attention_mask_weight": 0.0,
}


def defect_map(model, images: torch.Tensor) -> torch.Tensor:
    """The normal → defect generator's attention map on ``images`` (eval mode, prior code 0
    for CrossGAN)."""
    model.nets.eval()
    with torch.no_grad():
        if isinstance(model, CrossGAN):
            code = torch.zeros(len(images), model.config.detail_dim)
            return model.nets["defect_generator"](model.content(images), code)[1]
        return model.nets["defect_generator"](images)[1]


def normal_map(model, images: torch.Tensor) -> torch.Tensor:
    """The defect → normal generator's attention map on ``images`` (eval mode)."""
    model.nets.eval()
    with torch.no_grad():
        if isinstance(model, CrossGAN):
            return model.nets["normal_generator"](model.content(images))[1]
        return model.nets["normal_generator"](images)[1]


@pytest.mark.parametrize("cls", [CrossGAN, CycleGAN])
def test_area_prior_keeps_the_map_from_collapsing(cls: type) -> None:
    """The reconstruction terms reward an empty map: through the blend (attention_recon=
    "blend") and without the area prior the normal → defect map shrinks from its start and
    no pixel passes the threshold; with the area prior some pixels of every normal image
    pass it and the mean rises towards the discs' area."""
    batch = disc_batch(4, 4)
    normals = batch["image"][:4] * 2 - 1
    target = float(batch["mask"][4:].mean())
    start = float(defect_map(make(1, cls=cls, **LOCAL), normals).mean())
    maps = {}
    for weight in (0.0, 10.0):
        model = make(
            1,
            cls=cls,
            **LOCAL,
            **{**NO_PRIORS, "attention_area_weight": weight},
            attention_recon="blend",
            lr=1e-3,
        )
        torch.manual_seed(0)
        for _ in range(15):
            model.training_step(batch)
        maps[weight] = defect_map(model, normals)
    assert start < target / 2
    assert float(maps[0.0].mean()) < start
    assert not (maps[0.0] > 0.5).any()
    assert float(maps[10.0].mean()) > target / 2
    assert (maps[10.0] > 0.5).flatten(1).any(dim=1).all()


@pytest.mark.parametrize("cls", [CrossGAN, CycleGAN])
def test_mask_supervision_makes_the_removal_map_match_the_defect_masks(cls: type) -> None:
    """With mask supervision the defect → normal map of the training defects is high on
    their disc masks and low elsewhere; without it the map stays near its empty start."""
    batch = disc_batch(2, 4)
    defects, masks = batch["image"][2:] * 2 - 1, batch["mask"][2:, None] > 0.5
    inside, outside = {}, {}
    for weight in (0.0, 1.0):
        model = make(1, cls=cls, **LOCAL, **{**NO_PRIORS, "attention_mask_weight": weight}, lr=1e-3)
        torch.manual_seed(0)
        for _ in range(100):
            model.training_step(batch)
        found = normal_map(model, defects)
        inside[weight], outside[weight] = float(found[masks].mean()), float(found[~masks].mean())
    assert inside[1.0] > 4 * outside[1.0]
    assert inside[1.0] > 10 * inside[0.0]


def test_area_target_marks_the_blurred_maps_top_pixels() -> None:
    a = torch.full((2, 1, 32, 32), 0.05)
    a[0, 0, 4:10, 20:26] = 0.3  # a 36-pixel blob
    a[0, 0, 30, 1] = 0.9  # one stray pixel, outweighed by the blob once blurred
    target = area_target(a, torch.tensor([36 / 1024, 0.0]))
    assert target.shape == a.shape and not target.requires_grad
    assert int(target[0].sum()) == 36 and int(target[1].sum()) == 0
    assert target[0, 0, 4:10, 20:26].sum() > 20
    assert target[0, 0, 30, 1] == 0


@pytest.mark.parametrize("cls", [CrossGAN, CycleGAN])
@pytest.mark.parametrize("recon", ["image", "blend"])
def test_self_reconstruction_on_the_image_leaves_the_map_alone(cls: type, recon: str) -> None:
    """With every other generator term off, a step of the self-reconstruction (CrossGAN) or
    identity (CycleGAN) term changes the attention channel's weights only when it is applied
    to the blend: on the image G alone it cannot reward an empty map."""
    terms = (
        {"adv_weight": 0.0, "content_adv_weight": 0.0, "cross_cycle_weight": 0.0}
        | {"kl_weight": 0.0, "latent_weight": 0.0, "self_recon_weight": 10.0}
        if cls is CrossGAN
        else {"adv_weight": 0.0, "cycle_weight": 0.0, "identity_weight": 5.0}
    )
    model = make(1, cls=cls, **LOCAL, **NO_PRIORS, **terms, attention_recon=recon, weight_decay=0.0)
    net = model.nets["normal_generator"]
    head = next(m for m in net.modules() if isinstance(m, AttentionOutput))
    before = head.conv.weight[1:].clone()
    torch.manual_seed(0)
    model.training_step(disc_batch(2, 2))
    changed = not torch.equal(before, head.conv.weight[1:])
    assert changed == (recon == "blend")


def test_attention_gain_keeps_the_initial_map_and_speeds_its_logit() -> None:
    """Gain g: the same map at initialisation, and one plain SGD step on the attention row
    moves the logit g² times as far (g on the weights' gradient, g on the output)."""
    torch.manual_seed(0)
    plain = AttentionOutput(4, 1, gain=1.0)
    torch.manual_seed(0)
    fast = AttentionOutput(4, 1, gain=10.0)
    h = torch.rand(1, 4, 8, 8)
    torch.testing.assert_close(plain(h)[1], fast(h)[1])
    moves = []
    for head in (plain, fast):
        start = torch.logit(head(h)[1]).mean()
        head(h)[1].mean().backward()
        with torch.no_grad():
            head.conv.bias -= 1e-3 * head.conv.bias.grad
        moves.append(float((torch.logit(head(h)[1]).mean() - start).detach()))
    assert moves[1] == pytest.approx(100 * moves[0], rel=1e-3)


def test_masks_stay_paired_with_their_defect_images() -> None:
    """A batch short of defects is topped up from the buffer: every paired defect image
    still comes with its own mask (the disc is where the image is bright)."""
    model = make(1, **LOCAL)
    model.training_step(disc_batch(0, 3, seed=1))  # fills the defect buffer only
    _, y, y_mask = model._pair(disc_batch(4, 1, seed=2))
    assert len(y) == 4 and y_mask.shape == (4, 1, SIZE, SIZE)
    np.testing.assert_array_equal((y > 0.8).numpy(), y_mask.bool().numpy())


@pytest.mark.parametrize("cls", [CrossGAN, CycleGAN])
def test_after_training_with_the_priors_the_source_is_still_copied_outside(cls: type) -> None:
    model = make(1, cls=cls, **LOCAL, mask_open=0, mask_min_area=1, lr=1e-3)
    torch.manual_seed(0)
    for _ in range(3):
        model.training_step(disc_batch(2, 2))
    source = surfaces(1, 0, seed=3)[0]
    half_open(model, source, 1)
    sample = model.synthesize(source, np.random.default_rng(1))
    assert 0 < sample.mask.sum() < sample.mask.size
    np.testing.assert_array_equal(sample.image[~sample.mask], source[~sample.mask])


def test_attention_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="attention_recon"):
        make(1, **LOCAL, attention_recon="both")
    with pytest.raises(ValueError, match="attention_gain"):
        make(1, **LOCAL, attention_gain=0.0)


def test_the_gain_travels_with_the_weights() -> None:
    """The gain is saved with the weights: a state trained at gain 10 loads into a head built
    with gain 1 and gives the same map; a state saved before the gain existed (no ``gain``
    key) loads as the plain conv it was trained as."""
    torch.manual_seed(0)
    trained = AttentionOutput(4, 1, gain=10.0)
    with torch.no_grad():
        trained.conv.bias[1:] += 0.2  # as if trained: no longer the shared initial map
    h = torch.rand(1, 4, 8, 8)
    other = AttentionOutput(4, 1, gain=1.0)
    other.load_state_dict(trained.state_dict())
    torch.testing.assert_close(other(h)[1], trained(h)[1])
    legacy = {k: v for k, v in trained.state_dict().items() if k != "gain"}
    old = AttentionOutput(4, 1, gain=10.0)
    old.load_state_dict(legacy)
    assert float(old.gain) == 1.0
    with torch.no_grad():
        torch.testing.assert_close(old(h)[1], torch.sigmoid(trained.conv(h)[:, 1:]))
