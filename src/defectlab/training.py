"""The training loop every model shares: seeded batches, logging, NaN guard, checkpoints and
resume.

The loop owns no optimiser: models step their own (GANs have several). It guarantees that
batch order depends only on (seed, epoch), and saves model, optimiser and RNG state every
``checkpoint_every`` steps and at each epoch end, so an interrupted run resumed with
``resume=True`` continues from the same step and ends with the same numbers.

With ``distributed=True`` each process of a torchrun launch trains on its share of every
global batch and the gradients are averaged across processes: see
:mod:`defectlab.distributed` for how and why.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from defectlab import distributed as dist
from defectlab.base import Model
from defectlab.data.io import remove_temporaries, write_csv
from defectlab.errors import CheckpointError, ConfigError, TrainingError
from defectlab.runs import LAST_CHECKPOINT, load_checkpoint, restore_model, save_checkpoint


def _batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return list(torch.randperm(n, generator=generator).split(batch_size))


def _shard(
    index: torch.Tensor, labels: torch.Tensor, rank: int, world_size: int
) -> tuple[torch.Tensor, float]:
    """This rank's items of global batch ``index`` and its share of the batch (the weight of
    its gradients and losses).

    Ordered by label first, so defect images spread evenly over the ranks. A rank left
    without an item (a last batch smaller than the number of ranks) gets a copy of one with
    weight 0: it takes part in every collective and changes nothing.
    """
    ordered = index[torch.argsort(labels[index], stable=True)]
    own = ordered[rank::world_size]
    if len(own) == 0:
        return ordered[rank % len(ordered)].reshape(1), 0.0
    return own, len(own) / len(ordered)


def _rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """Seed of rank ``rank``'s random stream (rank > 0, or any rank after a resume with
    another number of processes)."""
    return int(np.random.SeedSequence([seed % 2**32, rank, step]).generate_state(1)[0])


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
    distributed: bool = False,
) -> list[dict[str, Any]]:
    """Train ``model`` on ``images`` (N, H, W, C) float32 in [0, 1]; return the loss history.

    Batches are dicts with ``image`` (B, C, H, W), ``mask`` (B, H, W), ``label`` (B,) and
    ``index`` (B,), the images' positions in ``images``, on the model's device, plus one (B,)
    entry per array in ``extras`` (per-image weak labels such as ``area_ratio``).

    ``distributed=True`` (inside a process group, see :func:`defectlab.distributed.
    init_from_env`): this rank trains on its share of each global batch of ``batch_size``
    images, only rank 0 writes the checkpoint and log, and every rank returns the same
    history and ends with rank 0's model.
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
    checkpoint = run_dir / LAST_CHECKPOINT
    log_path = run_dir / "train_log.csv"
    epochs = int(model.config.epochs)
    if epochs < 1:
        raise TrainingError(f"{model.name}: epochs must be at least 1, got {epochs}")
    if distributed and not dist.is_initialized():
        raise TrainingError(
            "fit(distributed=True) needs a process group: call "
            "defectlab.distributed.init_from_env() first"
        )
    rank, world_size = (dist.rank(), dist.world()) if distributed else (0, 1)
    main = rank == 0
    if batch_size < world_size:
        raise ConfigError(
            f"train.batch_size {batch_size} is smaller than the {world_size} training "
            "processes: every process needs at least one image per step"
        )

    torch.manual_seed(seed)
    model.setup_training(n)
    start_epoch, start_step, global_step, history = 0, 0, 0, []
    if resume:
        if main:  # half-written files of the killed process
            for folder in (run_dir, checkpoint.parent):
                remove_temporaries(folder)
        payload = load_checkpoint(checkpoint, expected_model=model.name)
        restore_model(payload, model, checkpoint)
        model.load_training_state(payload["training"]["model"])
        progress_state = payload["training"]
        start_epoch, start_step = progress_state["epoch"], progress_state["step"]
        global_step = progress_state["global_step"]
        history = list(progress_state["history"])
        rank_states = progress_state.get("torch_rng_ranks")
        if rank_states is not None and len(rank_states) == world_size:
            torch.set_rng_state(rank_states[rank])
        elif main:
            torch.set_rng_state(progress_state["torch_rng"])
        else:  # saved by another number of processes: a fresh stream for this rank
            torch.manual_seed(_rank_seed(seed, rank, global_step))
        if progress_state["n_train"] != n:
            raise CheckpointError(
                f"{checkpoint}: was trained on {progress_state['n_train']} images, now {n}"
            )
    elif checkpoint.exists():
        raise CheckpointError(
            f"{checkpoint} exists: this run was started before. Resume it with --resume or "
            "train into a new --out folder"
        )
    sync = dist.sync_model(model) if distributed else None
    if sync is not None and not resume and not main:
        torch.manual_seed(_rank_seed(seed, rank))

    def save(epoch: int, step: int) -> None:
        if sync is not None:  # one well-defined model to save: the ranks' average buffers
            dist.average_buffers(model)
        rng_states = dist.gather(torch.get_rng_state()) if sync is not None else []
        if not main:
            return
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
                **({"torch_rng_ranks": rng_states} if sync is not None else {}),
            },
        )
        write_csv(log_path, history)

    steps_per_epoch = math.ceil(n / batch_size)
    bar = tqdm(
        total=epochs * steps_per_epoch,
        initial=global_step,
        desc=f"training {model.name}",
        disable=not (progress and main),
        file=sys.stderr,
        leave=False,
    )
    try:
        for epoch in range(start_epoch, epochs):
            for step, global_index in enumerate(_batch_order(n, batch_size, seed, epoch)):
                if epoch == start_epoch and step < start_step:
                    continue
                index, share = (
                    _shard(global_index, label_tensor, rank, world_size)
                    if sync is not None
                    else (global_index, 1.0)
                )
                batch = {
                    "image": image_tensor[index].to(model.device),
                    "mask": mask_tensor[index].to(model.device),
                    "label": label_tensor[index].to(model.device),
                    "index": index.to(model.device),
                    **{k: values[index].to(model.device) for k, values in extra_tensors.items()},
                }
                if sync is not None:
                    sync.weight = share
                losses = model.training_step(batch)
                if sync is not None:
                    losses = dist.all_reduce_losses(losses, share)
                bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
                if bad:
                    last = checkpoint if checkpoint.exists() else "none"
                    raise TrainingError(
                        f"{model.name}: non-finite loss {bad} at epoch {epoch + 1}, step "
                        f"{step + 1}; the last good checkpoint is {last}. Lower the learning "
                        "rate or check the input images."
                    )
                if sync is not None:
                    sync.check_parameters()
                global_step += 1
                history.append({"epoch": epoch + 1, "step": global_step, **losses})
                bar.update(1)
                if losses:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in list(losses.items())[:3]})
                if global_step % checkpoint_every == 0:
                    save(epoch, step + 1)
            model.end_epoch(epoch)
            if sync is not None:  # every epoch starts with one model on every rank
                dist.average_buffers(model)
                dist.broadcast_state(model)
            save(epoch + 1, 0)
        bar.close()
        model.finish_training()
        model.is_fitted = True
        if sync is not None:
            dist.broadcast_state(model)
    finally:
        if sync is not None:
            sync.close()
    return history
