"""Deep SVDD: the seed's bias-free CNN (features=pixels) and the version on frozen Lite
patch features (the default, Lite0): fixed centre, both objectives, collapse guard, maps, score
normaliser, state, resume and ONNX export."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from defectlab.detect.deepsvdd import DeepSVDD, DeepSVDDConfig
from defectlab.detect.nuisance import image_statistics
from defectlab.runs import load_checkpoint, restore_model, save_checkpoint
from defectlab.training import fit
from tests.conftest import (
    interrupt_on_call,
    striped_normals,
    to_nchw,
    with_square,
    write_folder_dataset,
)

SIZE = 32
SMALL = {"features": "pixels", "width": 8, "depth": 2, "rep_dim": 16, "kernel_size": 3}


pytestmark = pytest.mark.usefixtures("one_thread")


def _normals(n: int, seed: int = 0) -> np.ndarray:
    """Smooth images (N, H, W, 1): a random-phase gentle wave plus slight noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    images = []
    for _ in range(n):
        phase, level = rng.uniform(0, 2 * np.pi), rng.uniform(0.35, 0.5)
        image = level + 0.1 * np.sin(2 * np.pi * x + phase) + 0.05 * y
        images.append(image + rng.normal(0, 0.01, (SIZE, SIZE)))
    return np.clip(np.stack(images), 0, 1)[..., None].astype(np.float32)


def _model(**overrides) -> DeepSVDD:
    torch.manual_seed(0)
    return DeepSVDD(DeepSVDDConfig(**(SMALL | overrides)), image_size=SIZE)


def _fit(model: DeepSVDD, run_dir: Path, n: int = 48, **kwargs) -> list[dict]:
    return fit(model, _normals(n), run_dir=run_dir, batch_size=16, progress=False, **kwargs)


def test_network_is_bias_free_with_non_affine_batchnorm() -> None:
    model = _model(epochs=3, pretrain_epochs=1)
    assert model.decoder is not None
    modules = [*model.encoder.modules(), *model.decoder.modules()]
    names = [n for net in (model.encoder, model.decoder) for n, _ in net.named_parameters()]
    assert names and not any("bias" in n for n in names)
    assert all(getattr(m, "bias", None) is None for m in modules)
    batch_norms = [m for m in modules if isinstance(m, nn.BatchNorm2d)]
    assert batch_norms and not any(m.affine for m in batch_norms)
    assert any(isinstance(m, nn.LeakyReLU) for m in modules)
    # stride 4: a 32-pixel image gives an 8×8 grid of feature vectors
    assert model.encoder(torch.rand(2, 1, SIZE, SIZE)).shape == (2, 16, 8, 8)


def test_center_is_the_guarded_mean_of_initial_features_and_stays_fixed(tmp_path: Path) -> None:
    images = _normals(32)
    model = _model(epochs=2, eps=0.1)
    initial = DeepSVDD(model.config, image_size=SIZE)
    initial.load_state_dict(model.state_dict())
    # one batch holding all images: BatchNorm statistics then do not depend on batch order
    fit(model, images, run_dir=tmp_path / "a", batch_size=32, progress=False)
    initial.encoder.train()
    with torch.no_grad():
        expected = initial.encoder(to_nchw(images)).mean(dim=(0, 2, 3))
    guarded = torch.where(expected.abs() < 0.1, torch.where(expected < 0, -0.1, 0.1), expected)
    assert (expected.abs() < 0.1).any()  # the guard was exercised
    assert torch.allclose(model.center, guarded, atol=1e-5)
    assert (model.center.abs() >= 0.1 - 1e-7).all()

    # same seed → same centre; more SVDD epochs do not move it
    short, long = _model(epochs=3), _model(epochs=6)
    _fit(short, tmp_path / "short")
    _fit(long, tmp_path / "long")
    assert torch.equal(short.center, long.center)
    assert not torch.equal(
        short.encoder.state_dict()["0.weight"], long.encoder.state_dict()["0.weight"]
    )


def test_one_class_training_lowers_the_mean_distance(tmp_path: Path) -> None:
    model = _model(epochs=8, lr=3e-3)
    history = _fit(model, tmp_path / "run")
    assert not any("mean_dist" in row for row in history if row["epoch"] == 1)  # centre pass
    first = np.mean([r["mean_dist"] for r in history if r["epoch"] == 2])
    last = np.mean([r["mean_dist"] for r in history if r["epoch"] == 8])
    assert last < 0.5 * first

    x = to_nchw(_normals(16, seed=1))
    untrained = _model(epochs=8, lr=3e-3)
    untrained.center = model.center  # same centre, initial weights
    untrained.encoder.train()
    with torch.no_grad():  # batch statistics for both: the regime the loss was computed in
        before = untrained._distances(untrained.encoder(x)).mean()
    model.encoder.train()
    with torch.no_grad():
        after = model._distances(model.encoder(x)).mean()
    assert after < 0.5 * before


def test_soft_boundary_radius_is_the_epoch_distance_quantile(monkeypatch) -> None:
    nu = 0.2
    model = _model(epochs=5, objective="soft-boundary", nu=nu)
    seen: list[torch.Tensor] = []
    original = DeepSVDD._distances

    def recording(self, features):
        dist = original(self, features)
        seen.append(dist.detach().clone())
        return dist

    monkeypatch.setattr(DeepSVDD, "_distances", recording)
    model.setup_training(32)
    batches = to_nchw(_normals(32)).split(8)
    radii = []
    for epoch in range(5):
        seen.clear()
        for batch in batches:
            losses = model.training_step({"image": batch})
        model.end_epoch(epoch)
        radii.append(model.radius)
        if epoch >= 1:  # SVDD epochs: R² is the (1 − ν) quantile of this epoch's distances
            quantile = np.quantile(torch.cat(seen).flatten().numpy(), 1 - nu)
            assert model.radius**2 == pytest.approx(quantile, rel=0.02)
            assert np.isfinite(losses["loss"])
    assert radii[0] == 0.0 and radii[1] > 0
    assert len(set(radii[1:])) == 4  # updated after every SVDD epoch
    # soft-boundary scores are distances minus R²: a share of normal locations is negative
    out = model.predict(to_nchw(_normals(8, seed=3)))
    assert (out.maps < 0).any() and (out.maps > 0).any()


def test_separates_bright_squares_and_the_map_peaks_on_them(tmp_path: Path) -> None:
    model = _model(epochs=8, lr=3e-3)
    _fit(model, tmp_path / "run", n=64)
    normals = _normals(8, seed=7)
    out_normal = model.predict(to_nchw(normals))
    out_defect = model.predict(to_nchw(with_square(normals, 18, 8, 6)))
    assert out_normal.maps.shape == (8, SIZE, SIZE) and out_normal.scores.shape == (8,)
    assert out_defect.scores.min() > out_normal.scores.max()
    for heat in out_defect.maps:
        row, col = np.unravel_index(heat.argmax().item(), (SIZE, SIZE))
        assert 14 <= row <= 28 and 4 <= col <= 18, (row, col)

    # "global": the distance of the global-average-pooled feature to c
    model.config.score = "global"
    x = to_nchw(with_square(normals, 18, 8, 6))
    model.encoder.eval()
    with torch.no_grad():
        pooled = model.encoder(x).mean(dim=(2, 3))
    expected = ((pooled - model.center) ** 2).sum(dim=1)
    assert torch.allclose(model.predict(x).scores, expected, rtol=1e-5)


def test_state_round_trip_gives_identical_scores(tmp_path: Path) -> None:
    model = _model(epochs=3, objective="soft-boundary")
    _fit(model, tmp_path / "run")
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    clone = _model(epochs=3, objective="soft-boundary")
    clone.load_state_dict(state)
    x = to_nchw(with_square(_normals(4, seed=2), 18, 8, 6))
    a, b = model.predict(x), clone.predict(x)
    assert model.radius > 0 and clone.radius == model.radius
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    with pytest.raises(ValueError, match="do not fit"):
        DeepSVDD(DeepSVDDConfig(**(SMALL | {"width": 4})), image_size=SIZE).load_state_dict(state)


def test_predict_before_fit_and_bad_image_sizes() -> None:
    with pytest.raises(RuntimeError, match="before fit"):
        _model().predict(torch.rand(1, 1, SIZE, SIZE))
    with pytest.raises(ValueError, match="divisible by the network's stride 8"):
        DeepSVDD(DeepSVDDConfig(features="pixels", depth=3), image_size=36)
    model = _model(epochs=2)
    model.center = torch.ones(16)
    with pytest.raises(ValueError, match="not divisible"):
        model.predict(torch.rand(1, 1, 30, 30))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"objective": "hard"}, "objective must be one of"),
        ({"nu": 0.0}, "nu must be in"),
        ({"nu": 1.5}, "nu must be in"),
        ({"features": "pixels", "epochs": 3, "pretrain_epochs": 2}, "pretrain_epochs \\+ 2 = 4"),
        ({"epochs": 1}, "at least pretrain_epochs"),
        ({"pretrain_epochs": -1}, "pretrain_epochs must be"),
        ({"kernel_size": 4}, "odd"),
        ({"score": "max"}, "score must be one of"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"score_top_fraction": 0.0}, "score_top_fraction"),
        ({"depth": 0}, "depth must be"),
        ({"features": "resnet50"}, "features must be one of lite0, lite1, lite2, pixels"),
        ({"pretrain_epochs": 1, "epochs": 4}, "applies to features=pixels only"),
        ({"variance_weight": 1.0}, "variance_weight must be above 1"),
        ({"variance_floor": 1.0}, "variance_floor must be in"),
        ({"center": "median"}, "center must be one of auto, global, position"),
        ({"patch_size": 2}, "patch_size must be a positive odd"),
        ({"feature_blocks": (10, 4)}, "strictly increasing"),
        ({"score_normalization": "zscore"}, "score_normalization must be one of"),
        ({"normalization_samples": 2}, "normalization_samples must be at least"),
        ({"finetune_blocks": -1}, "finetune_blocks must be >= 0"),
        ({"finetune_blocks": 12}, "finetune_blocks=12 exceeds the 11 backbone blocks"),
        (
            {"features": "lite2", "finetune_blocks": 16},
            "finetune_blocks=16 exceeds the 15 backbone blocks",
        ),
        ({"features": "pixels", "finetune_blocks": 1}, "pretrained features only"),
        ({"finetune_lr": 0.0}, "finetune_lr must be positive"),
        ({"anchor_weight": -1.0}, "anchor_weight must be >= 0"),
    ],
)
def test_bad_configs_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DeepSVDDConfig(**overrides)


def _resumable_run(run_dir: Path, **kwargs) -> tuple[DeepSVDD, list[dict]]:
    model = _model(epochs=4, pretrain_epochs=1, objective="soft-boundary")
    history = fit(
        model,
        _normals(24),
        run_dir=run_dir,
        batch_size=8,
        checkpoint_every=2,
        progress=False,
        **kwargs,
    )
    return model, history


# steps 1-3: autoencoder epoch, 4-6: centre pass, 7-12: SVDD epochs. Dying in step k leaves the
# checkpoint of step k - 1 rounded down to even: mid pre-training, mid centre pass, mid SVDD.
@pytest.mark.parametrize("die_at", [3, 6, 11])
def test_resume_after_interruption_reproduces_the_run(
    tmp_path: Path, monkeypatch, die_at: int
) -> None:
    reference, ref_history = _resumable_run(tmp_path / "ref")

    original = interrupt_on_call(monkeypatch, DeepSVDD, "training_step", die_at)
    with pytest.raises(KeyboardInterrupt):
        _resumable_run(tmp_path / "run")
    monkeypatch.setattr(DeepSVDD, "training_step", original)
    resumed, history = _resumable_run(tmp_path / "run", resume=True)

    assert history == ref_history
    assert resumed.radius == reference.radius > 0
    assert torch.equal(resumed.center, reference.center)
    for key, value in reference.state_dict()["encoder"].items():
        assert torch.equal(resumed.state_dict()["encoder"][key], value), key
    x = to_nchw(_normals(4, seed=9))
    assert torch.equal(resumed.predict(x).scores, reference.predict(x).scores)


# --- the version on frozen pretrained features ------------------------------------------------
FSIZE = 64
# the mechanism tests below run on Lite0, the default backbone and the one their tolerances
# were set on
FEAT = {"features": "lite0", "rep_dim": 16, "head_width": 32, "lr": 3e-3}
DEFAULT_FEAT = {k: v for k, v in FEAT.items() if k != "features"}
SQUARE = (36, 16, 12)  # top, left, side of the synthetic defect


def _feature_model(**overrides) -> DeepSVDD:
    torch.manual_seed(0)
    return DeepSVDD(DeepSVDDConfig(**(FEAT | {"epochs": 8} | overrides)), image_size=FSIZE)


def _feature_fit(model: DeepSVDD, run_dir: Path, **kwargs) -> list[dict]:
    return fit(model, striped_normals(32), run_dir=run_dir, batch_size=8, progress=False, **kwargs)


@pytest.fixture(scope="module")
def feature_run(tmp_path_factory) -> tuple[DeepSVDD, list[dict]]:
    model = _feature_model(epochs=10)
    return model, _feature_fit(model, tmp_path_factory.mktemp("dsvdd-lite0"))


def _initial_std(model: DeepSVDD) -> torch.Tensor:
    """Each head output dimension's standard deviation at the centre pass."""
    mean = model._center_sum / model._center_count
    variance = (model._center_sq / model._center_count - mean.pow(2)).clamp_min(0)
    return variance.mean(dim=(1, 2)).sqrt().float()


def test_the_default_is_the_frozen_backbone_with_a_bias_free_head() -> None:
    model = DeepSVDD(DeepSVDDConfig(**DEFAULT_FEAT), image_size=FSIZE)
    assert model.config.features == "lite0" and model.config.per_position
    assert model.backbone is not None
    assert not any(p.requires_grad for p in model.backbone.parameters())
    names = [n for n, _ in model.encoder.named_parameters()]
    assert names and not any("bias" in n for n in names)
    batch_norms = [m for m in model.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batch_norms and not any(m.affine for m in batch_norms)
    # stride 8: a 64-pixel image gives an 8×8 grid; one centre per grid location
    assert model.embed(torch.rand(2, 1, FSIZE, FSIZE)).shape == (2, 16, 8, 8)
    assert model.center_shape == (16, 8, 8)
    with pytest.raises(ValueError, match="multiple of 32"):
        DeepSVDD(DeepSVDDConfig(**DEFAULT_FEAT), image_size=48)


def test_features_centre_is_the_per_location_mean_of_the_initial_head(tmp_path: Path) -> None:
    model = _feature_model(epochs=2, eps=0.0)
    initial = _feature_model(epochs=2, eps=0.0)  # the same seeded initial head
    images = striped_normals(32)
    fit(model, images, run_dir=tmp_path / "run", batch_size=32, progress=False)
    initial.encoder.train()
    with torch.no_grad():
        expected = initial.embed(to_nchw(images)).mean(dim=0)
    assert model.center.shape == (16, 8, 8)
    assert torch.allclose(model.center, expected, atol=1e-5)
    # the floor is the chosen share of the initial within-location spread
    assert torch.allclose(model.std_floor, 0.5 * _initial_std(model), rtol=1e-5)


def test_features_separate_an_obvious_anomaly_and_localise_it(feature_run) -> None:
    model, _ = feature_run
    normals = striped_normals(8, seed=5)
    defects = with_square(normals, *SQUARE)
    out_normal, out_defect = model.predict(to_nchw(normals)), model.predict(to_nchw(defects))
    assert out_defect.maps.shape == (8, FSIZE, FSIZE) and out_defect.scores.shape == (8,)
    assert out_defect.scores.min() > out_normal.scores.max()
    top, left, side = SQUARE
    for heat in out_defect.maps:
        row, col = np.unravel_index(heat.argmax().item(), (FSIZE, FSIZE))
        assert top - 8 <= row < top + side + 8 and left - 8 <= col < left + side + 8


def test_each_location_distance_is_scaled_to_one_on_the_kept_training_images(
    feature_run,
) -> None:
    model, _ = feature_run
    assert model.dist_scale is not None and model.dist_scale.shape == (8, 8)
    assert len(model._kept) == 32
    model.encoder.eval()
    with torch.no_grad():
        scaled = model._distances(model.embed(model._kept)) / model.dist_scale
    assert torch.allclose(scaled.mean(dim=0), torch.ones(8, 8), atol=1e-4)


def test_variance_floor_keeps_the_head_from_collapsing(feature_run, tmp_path: Path) -> None:
    """With the guard, every output dimension keeps at least (about) the floor's share of its
    initial spread on unseen normal images; without it, the same training shrinks them."""
    model, history = feature_run
    images = to_nchw(striped_normals(16, seed=5))
    guarded = (model.head_output_std(images) / _initial_std(model)).min()
    assert guarded >= 0.9 * model.config.variance_floor, guarded
    assert all(row["std_ratio"] > 0.5 for row in history if "std_ratio" in row)

    free = _feature_model(epochs=10, variance_floor=0.0)
    _feature_fit(free, tmp_path / "free")
    assert free.std_floor is None
    collapsed = (free.head_output_std(images) / _initial_std(free)).min()
    assert collapsed < 0.7 * model.config.variance_floor < guarded, (collapsed, guarded)


def test_a_last_batch_of_one_image_trains_without_the_floor(tmp_path: Path) -> None:
    """One image has no spread within a location: the floor skips that batch (its root of
    a zero variance would make the gradient infinite)."""
    model = _feature_model(epochs=3)
    history = fit(model, striped_normals(17), run_dir=tmp_path, batch_size=8, progress=False)
    svdd = [row for row in history if "loss" in row]
    assert all(np.isfinite(row["loss"]) for row in svdd)
    assert ["std_ratio" in row for row in svdd] == [True, True, False] * 2
    assert torch.isfinite(model.predict(to_nchw(striped_normals(2, seed=3))).scores).all()


def test_features_state_round_trip_and_foreign_backbone(feature_run, tmp_path: Path) -> None:
    model, _ = feature_run
    path = tmp_path / "model.pt"
    save_checkpoint(path, model)
    clone = _feature_model(epochs=10)
    restore_model(load_checkpoint(path, "deepsvdd"), clone, path)
    x = to_nchw(with_square(striped_normals(4, seed=2), *SQUARE))
    a, b = model.predict(x), clone.predict(x)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)
    assert torch.equal(clone.std_floor, model.std_floor)
    assert torch.equal(clone.dist_scale, model.dist_scale)
    state = model.state_dict()
    assert not any(key.startswith("backbone.") for key in state["encoder"])  # weights not copied
    foreign = state | {"backbone": state["backbone"] | {"sha256": "0" * 64}}
    with pytest.raises(ValueError, match="EfficientNet-Lite0 weights"):
        _feature_model(epochs=10).load_state_dict(foreign)
    with pytest.raises(ValueError, match="features=pixels"):
        _feature_model(epochs=10).load_state_dict(_model().state_dict())
    with pytest.raises(ValueError, match="differs from the model's 64"):
        model.predict(torch.rand(1, 1, 96, 96))


def test_image_statistics_normaliser_removes_brightness(tmp_path: Path) -> None:
    model = _feature_model(epochs=4, score_normalization="image_statistics")
    _feature_fit(model, tmp_path / "run")
    assert model.score_normalizer.fitted
    x = to_nchw(striped_normals(6, seed=4))
    raw, _ = model._raw(x)
    expected = model.score_normalizer(raw, image_statistics(x))
    assert torch.allclose(model.predict(x).scores, expected)
    assert not torch.allclose(model.predict(x).scores, raw)


# steps 1-4: centre pass, 5-8: first SVDD epoch ... dying in step k leaves the checkpoint of
# step k - 1 rounded down to even: mid centre pass, mid SVDD.
@pytest.mark.parametrize("die_at", [3, 7])
def test_features_resume_after_interruption_reproduces_the_run(
    tmp_path: Path, monkeypatch, die_at: int
) -> None:
    def run(run_dir: Path, **kwargs) -> tuple[DeepSVDD, list[dict]]:
        model = _feature_model(epochs=3, objective="soft-boundary")
        history = fit(
            model,
            striped_normals(32),
            run_dir=run_dir,
            batch_size=8,
            checkpoint_every=2,
            progress=False,
            **kwargs,
        )
        return model, history

    reference, ref_history = run(tmp_path / "ref")
    original = interrupt_on_call(monkeypatch, DeepSVDD, "training_step", die_at)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run")
    monkeypatch.setattr(DeepSVDD, "training_step", original)
    resumed, history = run(tmp_path / "run", resume=True)
    assert history == ref_history
    assert resumed.radius == reference.radius > 0
    assert torch.equal(resumed.center, reference.center)
    assert torch.equal(resumed.std_floor, reference.std_floor)
    x = to_nchw(striped_normals(4, seed=9))
    assert torch.equal(resumed.predict(x).scores, reference.predict(x).scores)


def test_features_version_trains_evaluates_predicts_and_exports(tmp_path: Path) -> None:
    """End to end through the API on a folder of images, the ONNX graph included (with the
    score normaliser in it)."""
    import defectlab.api as dl
    from defectlab.deploy.onnx import export_onnx

    root = write_folder_dataset(tmp_path / "data", np.random.default_rng(3), 24, 6, FSIZE)
    settings = ["model.epochs=3", "model.rep_dim=16", "model.head_width=32"]
    settings += ["model.score_normalization=image_statistics", "model.normalization_samples=8"]
    run = dl.train(
        "deepsvdd",
        root,
        tmp_path / "run",
        image_size=FSIZE,
        device="cpu",
        overrides=settings,
        progress=False,
    )
    metrics = dl.evaluate(run.run_dir, root, tmp_path / "eval", device="cpu")
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    meta = export_onnx(run.run_dir, tmp_path / "export")
    assert meta["check"]["score_within_tolerance"] and meta["check"]["anomaly_map_within_tolerance"]


# --- fine-tuning the backbone's last block (finetune_blocks) ------------------------------------
@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory) -> tuple[DeepSVDD, list[dict]]:
    model = _feature_model(epochs=10, finetune_blocks=1, finetune_lr=1e-3)
    return model, _feature_fit(model, tmp_path_factory.mktemp("dsvdd-tuned"))


def test_finetuning_trains_a_copy_of_the_last_block_only(tuned_run) -> None:
    model, history = tuned_run
    assert model.tuned is not None and len(model.tuned) == 1 and not model.tuned.training
    assert not any(p.requires_grad for p in model.backbone.parameters())  # the anchor
    moved = model.anchor_penalty().item()
    assert moved > 0 and history[-1]["anchor"] == pytest.approx(moved, rel=0.5)
    frozen = _feature_model(epochs=10)
    x = to_nchw(striped_normals(2, seed=3))
    with torch.no_grad():  # the blocks before the tuned one are the frozen backbone's
        first = model.backbone_maps(x)[0]
        assert torch.equal(first, frozen.backbone(x)[0])


def test_finetuning_keeps_the_collapse_guards(tuned_run, tmp_path: Path) -> None:
    """The variance floor still holds the head's output spread with a trainable block, and
    the anchor keeps the block near its pretrained weights (a larger anchor weight, less
    drift)."""
    model, _ = tuned_run
    images = to_nchw(striped_normals(16, seed=5))
    guarded = (model.head_output_std(images) / _initial_std(model)).min()
    assert guarded >= 0.9 * model.config.variance_floor, guarded
    pulled = _feature_model(epochs=10, finetune_blocks=1, finetune_lr=1e-3, anchor_weight=100.0)
    _feature_fit(pulled, tmp_path / "pulled")
    assert pulled.anchor_penalty().item() < 0.5 * model.anchor_penalty().item()


def test_finetuned_state_round_trip(tuned_run, tmp_path: Path) -> None:
    model, _ = tuned_run
    path = tmp_path / "model.pt"
    save_checkpoint(path, model)
    clone = _feature_model(epochs=10, finetune_blocks=1, finetune_lr=1e-3)
    restore_model(load_checkpoint(path, "deepsvdd"), clone, path)
    x = to_nchw(with_square(striped_normals(4, seed=2), *SQUARE))
    assert torch.equal(model.predict(x).scores, clone.predict(x).scores)
    with pytest.raises(ValueError, match="this model's backbone is frozen"):
        _feature_model(epochs=10).load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="no fine-tuned backbone blocks"):
        clone.load_state_dict(_feature_model(epochs=10).state_dict())


def test_finetuned_resume_after_interruption_reproduces_the_run(
    tmp_path: Path, monkeypatch
) -> None:
    def run(run_dir: Path, **kwargs) -> tuple[DeepSVDD, list[dict]]:
        model = _feature_model(epochs=3, finetune_blocks=1, finetune_lr=1e-3)
        history = fit(
            model,
            striped_normals(32),
            run_dir=run_dir,
            batch_size=8,
            checkpoint_every=2,
            progress=False,
            **kwargs,
        )
        return model, history

    reference, ref_history = run(tmp_path / "ref")
    original = interrupt_on_call(monkeypatch, DeepSVDD, "training_step", 7)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run")
    monkeypatch.setattr(DeepSVDD, "training_step", original)
    resumed, history = run(tmp_path / "run", resume=True)
    assert history == ref_history
    x = to_nchw(striped_normals(4, seed=9))
    assert torch.equal(resumed.predict(x).scores, reference.predict(x).scores)


def test_finetuned_version_exports_to_onnx(tmp_path: Path) -> None:
    import defectlab.api as dl
    from defectlab.deploy.onnx import export_onnx

    root = write_folder_dataset(tmp_path / "data", np.random.default_rng(3), 24, 6, FSIZE)
    settings = ["model.epochs=3", "model.rep_dim=16", "model.head_width=32"]
    settings += ["model.finetune_blocks=1"]
    run = dl.train(
        "deepsvdd",
        root,
        tmp_path / "run",
        image_size=FSIZE,
        device="cpu",
        overrides=settings,
        progress=False,
    )
    meta = export_onnx(run.run_dir, tmp_path / "export")
    assert meta["check"]["score_within_tolerance"] and meta["check"]["anomaly_map_within_tolerance"]
