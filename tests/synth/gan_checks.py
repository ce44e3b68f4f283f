"""Checks every GAN synthesizer must pass, written once: CrossGAN and MaskGAN share their
training loop, checkpoints and sample grids (:class:`defectlab.synth.gan.GANSynthesizer`),
so their tests must hold them to the same standard."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import pytest
import torch

from defectlab.synth.gan import GANSynthesizer


class Interrupted(Exception):
    pass


def assert_resume_reproduces_the_uninterrupted_run(
    make: Callable[..., GANSynthesizer],
    fit_tiny: Callable[..., list[dict[str, Any]]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    stop_after: int,
) -> None:
    """Training stopped after ``stop_after`` steps and resumed from its per-step checkpoint
    logs the losses, and ends with the weights, of the run that never stopped. ``make`` builds
    a tiny model (``seed`` sets its initial weights), ``fit_tiny`` trains it for 3 steps per
    epoch; lr decays every epoch, so the scheduler state matters too."""
    straight = make(epochs=2, lr_decay_epochs=1)
    expected = fit_tiny(straight, tmp_path / "straight")

    interrupted = make(epochs=2, lr_decay_epochs=1)
    step = interrupted.training_step
    calls = []

    def stop(batch: dict[str, torch.Tensor]) -> dict[str, float]:
        if len(calls) == stop_after:
            raise Interrupted
        calls.append(1)
        return step(batch)

    monkeypatch.setattr(interrupted, "training_step", stop)
    with pytest.raises(Interrupted):
        fit_tiny(interrupted, tmp_path / "resumed", checkpoint_every=1)
    resumed = make(epochs=2, lr_decay_epochs=1, seed=123)  # weights come from the checkpoint
    assert fit_tiny(resumed, tmp_path / "resumed", resume=True) == expected
    for name, net in straight.nets.items():
        for key, value in net.state_dict().items():
            assert torch.equal(value, resumed.nets[name].state_dict()[key]), (name, key)


def assert_sample_grids(
    model: GANSynthesizer, batch: dict[str, torch.Tensor], grids: Path, size: int
) -> None:
    """With ``sample_every=2`` and ``sample_dir=grids``, two steps on a batch of 2 normal + 2
    defect images and the end of training write a step grid and a final one: 2 pairs × 2
    rows, 3 columns of ``size`` px images with 2 px gaps."""
    torch.manual_seed(0)
    for _ in range(2):
        model.training_step(batch)
    model.finish_training()
    assert sorted(p.name for p in grids.iterdir()) == ["final.png", "step_0000002.png"]
    grid = cv2.imread(str(grids / "final.png"), cv2.IMREAD_UNCHANGED)
    assert grid.shape == (4 * (size + 2) + 2, 3 * (size + 2) + 2)
