"""memseg: memory and head folds, the head learns painted defects from the memory residual,
checkpoints and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from defectlab.detect import memseg as ms
from defectlab.detect.memseg import MemSeg, MemSegConfig
from defectlab.errors import TrainingError
from defectlab.evaluate.metrics import auroc, pixel_auroc
from defectlab.runs import load_checkpoint, restore_model, save_checkpoint
from defectlab.training import fit
from tests.conftest import striped_normals, to_nchw, with_square

SIZE = 64
PATCHES = (SIZE // 8) ** 2
SQUARE = (36, 16, 12)
SMALL = {"width": 16, "roi": "none"}

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**overrides) -> MemSeg:
    return MemSeg(MemSegConfig(**(SMALL | overrides)), image_size=SIZE)


def _fit(model: MemSeg, run_dir: Path, images: np.ndarray, **kwargs) -> list[dict]:
    return fit(model, images, run_dir=run_dir, batch_size=8, progress=False, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[MemSeg, list[dict]]:
    model = _model(epochs=9, lr=1e-2)
    history = _fit(model, tmp_path_factory.mktemp("memseg"), striped_normals(32))
    return model, history


def test_memory_is_built_from_the_memory_fold_only(trained) -> None:
    model, history = trained
    fold = model.memory_fold
    assert fold.sum() == 16 and len(fold) == 32  # memory_share 0.5, seeded
    assert model.memory_bank.patches_seen == 16 * PATCHES
    # first epoch (4 steps of 8) builds the memory; the head's losses come after it
    assert all("memory_patches" in h for h in history if h["epoch"] == 1)
    assert all("dice" in h for h in history if h["epoch"] > 1)
    again = _model(epochs=9)
    again.setup_training(32)
    assert torch.equal(again.memory_fold, fold)
    other = _model(epochs=9, seed=1)
    other.setup_training(32)
    assert not torch.equal(other.memory_fold, fold)


def test_head_never_trains_on_images_inside_the_memory(tmp_path: Path, monkeypatch) -> None:
    images = striped_normals(16, seed=2)
    painted_sources: list[torch.Tensor] = []
    original = ms.paint_defects

    def spy(batch, config, step, level):
        painted_sources.append(batch.clone())
        return original(batch, config, step, level)

    monkeypatch.setattr(ms, "paint_defects", spy)
    model = _model(epochs=3)
    _fit(model, tmp_path, images)
    seen = torch.cat(painted_sources)
    memory_images = to_nchw(images)[model.memory_fold]
    head_images = to_nchw(images)[~model.memory_fold]
    for image in seen:
        assert not any(torch.equal(image, m) for m in memory_images)
        assert any(torch.equal(image, h) for h in head_images)
    assert len(seen) == 2 * len(head_images)  # every head image in each of 2 head epochs


def test_head_learns_to_find_unseen_anomalies(trained) -> None:
    model, history = trained
    head = [h["loss"] for h in history if "loss" in h]
    assert np.mean(head[-4:]) < np.mean(head[:4])
    normals = striped_normals(8, seed=7)
    anomalous = with_square(striped_normals(8, seed=8), *SQUARE)
    prediction = model.predict(to_nchw(np.concatenate([normals, anomalous])))
    labels = np.r_[np.zeros(8), np.ones(8)]
    assert auroc(labels, prediction.scores.numpy()) > 0.95
    masks = np.zeros((8, SIZE, SIZE), bool)
    top, left, side = SQUARE
    masks[:, top : top + side, left : left + side] = True
    assert pixel_auroc(masks, prediction.maps[8:].numpy()) > 0.9
    assert prediction.maps.min() >= 0 and prediction.maps.max() <= 1


def test_save_load_gives_identical_predictions(trained, tmp_path: Path) -> None:
    model, _ = trained
    path = tmp_path / "model.pt"
    save_checkpoint(path, model)
    clone = _model(epochs=9)
    with pytest.raises(RuntimeError, match="before fit"):
        clone.predict(torch.rand(1, 1, SIZE, SIZE))
    restore_model(load_checkpoint(path, "memseg"), clone, path)
    images = to_nchw(with_square(striped_normals(4, seed=6), *SQUARE))
    a, b = model.predict(images), clone.predict(images)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.maps, b.maps)


def test_interrupted_training_resumes_to_the_same_head(tmp_path: Path, monkeypatch) -> None:
    images = striped_normals(16, seed=5)  # 2 steps an epoch
    reference = _model(epochs=3)
    _fit(reference, tmp_path / "ref", images, checkpoint_every=1)

    calls = {"n": 0}
    original = MemSeg.training_step

    def interrupted_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:  # the second step of the first head epoch
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(MemSeg, "training_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        _fit(_model(epochs=3), tmp_path / "run", images, checkpoint_every=1)
    monkeypatch.setattr(MemSeg, "training_step", original)
    resumed = _model(epochs=3)
    _fit(resumed, tmp_path / "run", images, checkpoint_every=1, resume=True)
    assert torch.equal(resumed.memory_bank.memory, reference.memory_bank.memory)
    for name, value in reference.head.state_dict().items():
        assert torch.equal(resumed.head.state_dict()[name], value), name


def test_grid_logits_never_fall_when_the_distance_grows() -> None:
    torch.manual_seed(0)
    head = ms.MonotoneDistanceHead(image_channels=1, width=8, refine_range=2.0)
    distance = torch.rand(4, 1, 8, 8) * 3
    images = torch.rand(4, 1, SIZE, SIZE)
    base, refined = head(distance, images)
    raised = distance + torch.rand_like(distance) * (torch.rand_like(distance) < 0.3)
    higher, _ = head(raised, images)
    assert (higher >= base - 1e-6).all() and (higher > base + 1e-4).any()
    # the refinement moves a logit by at most refine_range
    assert (refined - base).abs().max() <= 2.0 + 1e-6
    flat, same = ms.MonotoneDistanceHead(1, 8, refine_range=0.0)(distance, images)
    assert torch.equal(flat, same)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 1}, "at least 2 epochs"),
        ({"memory_share": 1.0}, "memory_share must be in"),
        ({"width": 0}, "width must be positive"),
        ({"refine_range": -1}, "refine_range must be a non-negative number"),
        ({"dice_weight": 0, "pixel_weight": 0}, "nothing to segment"),
        ({"patch_size": 2}, "patch_size must be a positive odd number"),
        ({"synth_share": 0}, "synth_share must be in"),
    ],
)
def test_bad_config_is_refused(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MemSegConfig(**overrides)


def test_one_training_image_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="at least 2 training images"):
        _fit(_model(), tmp_path, striped_normals(1))
