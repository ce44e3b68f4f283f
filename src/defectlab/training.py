"""The training loop every model shares: seeded batches, logging, NaN guard, checkpoints and
resume.

The loop owns no optimiser: models step their own (GANs have several). It guarantees that
batch order depends only on (seed, epoch), and saves model, optimiser and RNG state every
``checkpoint_every`` steps and at each epoch end, so an interrupted run resumed with
``resume=True`` continues from the same step and ends with the same numbers.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from defectlab.base import Model
from defectlab.data.io import write_csv
from defectlab.errors import CheckpointError, TrainingError
from defectlab.runs import load_checkpoint, restore_model, save_checkpoint


def _batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(torch.randperm(n, generator=generator).split(batch_size))


def fit(
    model: Model,
    images: np.ndarray,
    *,
    run_dir: Path,
    masks: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    extras: dict[str, np.ndarray] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    checkpoint_every: int = 100,
    resume: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train ``model`` on ``images`` (N, H, W, C) float32 in [0, 1]; return the loss history.

    Batches are dicts with ``image`` (B, C, H, W), ``mask`` (B, H, W) and ``label`` (B,) on
    the model's device, plus one (B,) entry per array in ``extras`` (per-image weak labels
    such as ``area_ratio``).
    """
    n = len(images)
    if n == 0:
        raise TrainingError("no training images")
    image_tensor = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    mask_tensor = (
        torch.from_numpy(masks.astype(np.float32))
        if masks is not None
        else torch.zeros((n, *images.shape[1:3]))
    )
    label_tensor = (
        torch.from_numpy(labels.astype(np.int64)) if labels is not None else torch.zeros(n).long()
    )
    extra_tensors = {
        name: torch.from_numpy(np.asarray(values, dtype=np.float32))
        for name, values in (extras or {}).items()
    }
    for name, values in extra_tensors.items():
        if len(values) != n:
            raise TrainingError(f"{name}: {len(values)} values for {n} training images")
    checkpoint = run_dir / "checkpoints" / "last.pt"
    log_path = run_dir / "train_log.csv"
    epochs = int(model.config.epochs)
    if epochs < 1:
        raise TrainingError(f"{model.name}: epochs must be at least 1, got {epochs}")

    torch.manual_seed(seed)
    model.setup_training(n)
    start_epoch, start_step, global_step, history = 0, 0, 0, []
    if resume:
        payload = load_checkpoint(checkpoint, expected_model=model.name)
        restore_model(payload, model, checkpoint)
        model.load_training_state(payload["training"]["model"])
        progress_state = payload["training"]
        start_epoch, start_step = progress_state["epoch"], progress_state["step"]
        global_step = progress_state["global_step"]
        history = list(progress_state["history"])
        torch.set_rng_state(progress_state["torch_rng"])
        if progress_state["n_train"] != n:
            raise CheckpointError(
                f"{checkpoint}: was trained on {progress_state['n_train']} images, now {n}"
            )
    elif checkpoint.exists():
        raise CheckpointError(
            f"{checkpoint} exists: this run was started before. Resume it with --resume or "
            "train into a new --out folder"
        )

    def save(epoch: int, step: int) -> None:
        save_checkpoint(
            checkpoint,
            model,
            training={
                "epoch": epoch,
                "step": step,
                "global_step": global_step,
                "history": history,
                "torch_rng": torch.get_rng_state(),
                "n_train": n,
                "model": model.training_state(),
            },
        )
        write_csv(log_path, history)

    steps_per_epoch = math.ceil(n / batch_size)
    bar = tqdm(
        total=epochs * steps_per_epoch,
        initial=global_step,
        desc=f"training {model.name}",
        disable=not progress,
        file=sys.stderr,
        leave=False,
    )
    for epoch in range(start_epoch, epochs):
        for step, index in enumerate(_batch_order(n, batch_size, seed, epoch)):
            if epoch == start_epoch and step < start_step:
                continue
            batch = {
                "image": image_tensor[index].to(model.device),
                "mask": mask_tensor[index].to(model.device),
                "label": label_tensor[index].to(model.device),
                **{name: values[index].to(model.device) for name, values in extra_tensors.items()},
            }
            losses = model.training_step(batch)
            bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
            if bad:
                raise TrainingError(
                    f"{model.name}: non-finite loss {bad} at epoch {epoch + 1}, step {step + 1}; "
                    f"the last good checkpoint is {checkpoint if checkpoint.exists() else 'none'}."
                    " Lower the learning rate or check the input images."
                )
            global_step += 1
            history.append({"epoch": epoch + 1, "step": global_step, **losses})
            bar.update(1)
            if losses:
                bar.set_postfix({k: f"{v:.4g}" for k, v in list(losses.items())[:3]})
            if global_step % checkpoint_every == 0:
                save(epoch, step + 1)
        model.end_epoch(epoch)
        save(epoch + 1, 0)
    bar.close()
    model.finish_training()
    return history
