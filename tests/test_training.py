"""The shared training loop: resume after an interruption, NaN guard, refusal to overwrite."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from defectlab.detect.pixelstats import PixelStats
from defectlab.errors import CheckpointError, TrainingError
from defectlab.runs import load_checkpoint, save_checkpoint
from defectlab.training import fit


def _images(n: int = 20, size: int = 16) -> np.ndarray:
    return np.random.default_rng(0).random((n, size, size, 1), dtype=np.float32)


def _train(run_dir: Path, **kwargs) -> PixelStats:
    model = PixelStats(image_size=16)
    fit(
        model,
        _images(),
        run_dir=run_dir,
        batch_size=4,
        checkpoint_every=2,
        progress=False,
        **kwargs,
    )
    return model


def test_interrupted_training_resumes_to_the_same_result(tmp_path: Path, monkeypatch) -> None:
    reference = _train(tmp_path / "ref")

    calls = {"n": 0}
    original = PixelStats.training_step

    def interrupted_step(self, batch):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(PixelStats, "training_step", interrupted_step)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "run")
    monkeypatch.setattr(PixelStats, "training_step", original)
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", "pixelstats")
    assert saved["training"]["global_step"] == 2  # checkpoint_every=2, died in step 4

    with pytest.raises(CheckpointError, match="--resume"):
        _train(tmp_path / "run")
    resumed = _train(tmp_path / "run", resume=True)
    assert resumed._count == reference._count == 20
    assert torch.equal(resumed.mean, reference.mean) and torch.equal(resumed.std, reference.std)


def test_nan_loss_stops_with_a_clear_message(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(PixelStats, "training_step", lambda self, batch: {"loss": float("nan")})
    with pytest.raises(TrainingError, match=r"non-finite loss .*loss.* epoch 1, step 1"):
        _train(tmp_path / "nan")


def test_checkpoint_from_another_model_or_version_is_refused(tmp_path: Path) -> None:
    model = _train(tmp_path / "a")
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model)
    with pytest.raises(CheckpointError, match="is for model 'pixelstats', not 'ae'"):
        load_checkpoint(path, expected_model="ae")
    payload = torch.load(path, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(path)


def test_corrupt_and_unsafe_checkpoints_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable defectlab checkpoint"):
        load_checkpoint(path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"format": "defectlab-checkpoint", "x": Evil()}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's own warning stays inside
        with pytest.raises(
            CheckpointError, match=r"refused: the file holds Python objects"
        ) as info:
            load_checkpoint(path)
    assert "weights_only" not in str(info.value)  # no advice to turn the safety off
    assert "\x1b" not in str(info.value)  # nor torch's terminal colours
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
