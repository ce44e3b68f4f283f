"""Training base of the GAN synthesizers: :class:`GANTrainingConfig` (the settings every GAN
shares) and :class:`GANSynthesizer` (networks, optimisers, batch pairing, collapse detection,
sample grids, synthesis settings and checkpoint state).

The translators (:mod:`defectlab.synth.translation`: CrossGAN, CycleGAN) and MaskGAN build on
it, so a comparison between them holds the optimiser recipe (one Adam per network, step
decay), the pairing of normal and defect images within a batch and discriminator-collapse
detection equal.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import torch
from torch import nn

from defectlab import distributed
from defectlab.base import Model, ModelConfig, Synthesizer
from defectlab.components.gan_layers import (
    ENCODER_NORMS,
    count_parameters,
    image_grid,
    min_image_size,
    to_image,
)
from defectlab.components.gan_losses import GAN_LOSSES
from defectlab.config import apply_overrides, check_choice, check_fields
from defectlab.data.io import write_png
from defectlab.errors import ConfigError, TrainingError


@dataclass
class GANTrainingConfig(ModelConfig):
    """The training settings every GAN synthesizer shares and :class:`GANSynthesizer` reads
    (seed values where the seed gives them); subclasses add their networks' and losses'
    settings and may change a default."""

    #: the ``gan_loss`` values the synthesizer implements
    gan_losses: ClassVar[tuple[str, ...]] = GAN_LOSSES

    epochs: int = 400
    #: base channel count; encoders/generators work at up to 4× this, discriminators 8×
    width: int = 32
    #: normalisation in the residual encoders (:class:`ResidualEncoder`): "instance" (the
    #: CycleGAN/DRIT choice, the default), "batch" or "none"
    encoder_norm: str = "instance"
    #: Adam: one optimiser per network (seed: lr 1e-4, β1 0.5, weight decay 1e-4)
    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    weight_decay: float = 1e-4
    #: step decay: every ``lr_decay_epochs`` epochs multiply lr by ``lr_decay_gamma``
    lr_decay_epochs: int = 200
    lr_decay_gamma: float = 0.5
    #: image discriminators: strided convs per scale and number of scales
    disc_layers: int = 4
    disc_scales: int = 3
    #: "bce" (cross-entropy, the seed) or "lsgan" (least squares); MaskGAN also "hinge"
    gan_loss: str = "bce"
    #: images of each kind remembered to pair batches that lack one kind
    buffer_size: int = 8
    #: a discriminator whose loss stays below ``collapse_threshold`` for
    #: ``collapse_patience`` consecutive steps has collapsed: training stops (0 = never)
    collapse_threshold: float = 1e-3
    collapse_patience: int = 200
    #: write a sample grid every ``sample_every`` steps (0 = off) and at the end of training
    #: into ``sample_dir`` (empty = no grids)
    sample_every: int = 0
    sample_dir: str = ""

    def __post_init__(self) -> None:
        check_fields(
            self,
            at_least_one=("width", "lr_decay_epochs", "disc_layers", "disc_scales", "buffer_size"),
            positive=("lr", "lr_decay_gamma"),
            half_open_unit=("beta1", "beta2"),
            nonnegative=("weight_decay", "collapse_threshold", "collapse_patience", "sample_every"),
        )
        check_choice("gan_loss", self.gan_loss, self.gan_losses)
        check_choice("encoder_norm", self.encoder_norm, ENCODER_NORMS)


def map_tensors(fn: Callable[..., torch.Tensor], data: Any, *others: Any) -> Any:
    """``fn`` applied to every tensor of ``data`` — a tensor or a (nested) dict of tensors —
    with the tensors at the same place in ``others`` as further arguments. Pairing buffers
    are flat (one image tensor per kind) in TranslationGAN and dicts (image, mask, class) in
    MaskGAN; this lets one pairing and one checkpoint code path serve both."""
    if isinstance(data, dict):
        return {
            key: map_tensors(fn, value, *(o[key] for o in others)) for key, value in data.items()
        }
    return fn(data, *others)


def _count(data: Any) -> int:
    """Rows of a tensor, or of the (equally long) tensors of a nested dict."""
    while isinstance(data, dict):
        data = next(iter(data.values()))
    return len(data)


def _top_up(own: Any, source: Any, pick: torch.Tensor) -> Any:
    """``own`` followed by the rows ``pick`` of ``source``, tensor by tensor."""
    return map_tensors(lambda a, b: torch.cat([a, b[pick]]), own, source)


def _concat(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    return torch.cat([first, second])


class GANSynthesizer(Model, Synthesizer):
    """What every GAN synthesizer shares, so that TranslationGAN (CrossGAN, CycleGAN) and
    MaskGAN train, checkpoint and sample alike: networks in one ``ModuleDict``, one Adam + step
    decay per trained network, batch pairing with rolling buffers, discriminator-collapse
    detection, sample grids, synthesis settings and the checkpoint state.

    A subclass builds the networks (:meth:`build_networks`), turns a batch into paired
    tensors (:meth:`_pair`, normally through :meth:`_pair_kinds`), updates on them
    (:meth:`train_pairs`) and lays out sample grids (:meth:`sample_rows`).

    Pairing. Batches mix normal and defect images in any proportion. Each step pairs
    ``n = max(#normal, #defect)`` of each kind: a kind with fewer is topped up with items drawn
    at random (torch's global generator, which the trainer seeds and checkpoints) from a
    rolling buffer of the last ``buffer_size`` items of that kind seen, or, while that buffer
    is still empty, by repeating the batch's own. A step whose batch lacks a kind that has
    never been seen only fills the buffer and returns no losses (this can only happen at the
    start of training).
    """

    family: ClassVar[str] = "synthesizer"
    needs_training: ClassVar[bool] = True
    trains_on_defects: ClassVar[bool] = True
    config: GANTrainingConfig
    #: loss key → discriminator name, for every discriminator watched for collapse
    collapse_watch: ClassVar[dict[str, str]] = {}
    #: config fields that may change after training (they do not touch the networks)
    synthesis_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: ModelConfig | None = None, **kwargs: Any) -> None:
        Model.__init__(self, config, **kwargs)
        self._check_setup()
        self.nets = nn.ModuleDict(self.build_networks()).to(self.device)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.StepLR] = {}
        #: kind → its latest items: a tensor or a dict of tensors (see :func:`map_tensors`)
        self.buffers: dict[str, Any] = {}
        self.low_d_steps: dict[str, int] = dict.fromkeys(self.collapse_watch, 0)
        self.steps = 0
        self._last_pair: tuple[torch.Tensor, ...] | None = None

    def _check_setup(self) -> None:
        """Refuse sizes and channels the networks cannot take, before building them."""
        cfg = self.config
        smallest = min_image_size(cfg.disc_layers, cfg.disc_scales)
        if self.image_size % 4 or self.image_size < smallest:
            raise ValueError(
                f"{self.name}: image_size {self.image_size} must be a multiple of 4 (two stride-2 "
                f"down-samplings) and at least {smallest} (disc_layers={cfg.disc_layers} at "
                f"disc_scales={cfg.disc_scales}); lower disc_layers/disc_scales for small images"
            )
        if self.channels not in (1, 3):
            raise ValueError(f"{self.name}: channels must be 1 or 3, got {self.channels}")

    # --- to implement -------------------------------------------------------------------------
    @abstractmethod
    def build_networks(self) -> dict[str, nn.Module]:
        """Name → network; every trained network gets its own optimiser."""

    @abstractmethod
    def _pair(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...] | None:
        """The batch's paired tensors (images in [-1, 1]), or None when it cannot be paired
        yet; :meth:`train_pairs` and :meth:`sample_rows` receive them as arguments."""

    @abstractmethod
    def train_pairs(self, *pair: torch.Tensor) -> dict[str, float]:
        """One update on the tensors of :meth:`_pair`; returns the losses, including the
        ``collapse_watch`` keys of the discriminators it trained."""

    @abstractmethod
    def sample_rows(self, *pair: torch.Tensor) -> list[list[torch.Tensor]]:
        """Rows of image batches in [-1, 1] for the sample grid of up to 4 pairs (eval mode,
        no grad); each row becomes one grid row per image of its batches."""

    # --- helpers -------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        return {name: count_parameters(net) for name, net in self.nets.items()}

    @property
    def trained_networks(self) -> tuple[str, ...]:
        """The networks that get an optimiser: all of them unless a subclass says otherwise."""
        return tuple(self.nets)

    def randn(self, *shape: int) -> torch.Tensor:
        """Standard normal noise from torch's global CPU generator (seeded and checkpointed
        by the trainer), so runs and resumes are exact on CPU and CUDA alike."""
        return torch.randn(shape).to(self.device)

    def step_optimizers(self, names: Sequence[str], loss: torch.Tensor) -> None:
        for name in names:
            self.optimizers[name].zero_grad(set_to_none=True)
        loss.backward()
        for name in names:
            self.optimizers[name].step()

    # --- training ------------------------------------------------------------------------------
    def setup_training(self, n_train: int) -> None:
        cfg = self.config
        for name in self.trained_networks:
            optimizer = torch.optim.Adam(
                self.nets[name].parameters(),
                lr=cfg.lr,
                betas=(cfg.beta1, cfg.beta2),
                weight_decay=cfg.weight_decay,
            )
            self.optimizers[name] = optimizer
            self.schedulers[name] = torch.optim.lr_scheduler.StepLR(
                optimizer, step_size=cfg.lr_decay_epochs, gamma=cfg.lr_decay_gamma
            )

    def _pair_kinds(self, kinds: dict[str, Any]) -> dict[str, Any] | None:
        """Pair the kinds of one batch as the class docstring says and remember the latest
        items of each kind in :attr:`buffers`. ``kinds`` maps a kind to a tensor or a dict of
        equally long tensors (an image with its mask and class); None when a kind has no
        items and no buffer yet, or the batch is empty."""
        n = max(_count(own) for own in kinds.values())
        paired: dict[str, Any] = {}
        for kind, own in kinds.items():
            count = _count(own)
            pool = self.buffers.get(kind)
            if count >= n:
                paired[kind] = own if n else None
                continue
            if pool is None:
                if not count:
                    paired[kind] = None
                    continue
                pick, source = (torch.arange(n - count) % count).to(self.device), own
            else:
                pick, source = torch.randint(_count(pool), (n - count,)).to(self.device), pool
            paired[kind] = _top_up(own, source, pick)
        size = self.config.buffer_size
        for kind, own in kinds.items():  # remember the latest real items of each kind
            if _count(own):
                pool = self.buffers.get(kind)
                merged = own if pool is None else map_tensors(_concat, pool, own)
                self.buffers[kind] = map_tensors(lambda t: t[-size:].detach().clone(), merged)
        if any(items is None for items in paired.values()):
            return None
        return paired

    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        if not self.optimizers:
            self.setup_training(0)
        pair = self._pair(batch)
        # distributed training: when one rank has no pair, every rank skips the step, so all
        # run the same optimiser steps (and gradient all-reduces)
        if distributed.any_rank(pair is None) or pair is None:
            return {}
        self.nets.train()
        losses = self.train_pairs(*pair)
        self.steps += 1
        self._check_collapse(losses)
        cfg = self.config
        if cfg.sample_dir and cfg.sample_every and self.steps % cfg.sample_every == 0:
            self.write_samples(Path(cfg.sample_dir) / f"step_{self.steps:07d}.png", *pair)
        self._last_pair = tuple(t[:4].detach() for t in pair)
        return losses

    def _check_collapse(self, losses: dict[str, float]) -> None:
        """Stop when a watched discriminator's loss stays tiny; a discriminator not trained
        this step (no loss reported) keeps its count."""
        cfg = self.config
        if not cfg.collapse_patience:
            return
        for key, name in self.collapse_watch.items():
            if key not in losses:
                continue
            low = losses[key] < cfg.collapse_threshold
            self.low_d_steps[key] = self.low_d_steps[key] + 1 if low else 0
            if self.low_d_steps[key] >= cfg.collapse_patience:
                raise TrainingError(
                    f"{self.name}: the {name} collapsed: its loss stayed below "
                    f"{cfg.collapse_threshold:g} for {cfg.collapse_patience} consecutive steps "
                    f"(step {self.steps}), so it separates real from generated images perfectly "
                    "and the generators get no useful gradient. Lower lr, use gan_loss=lsgan, "
                    "or add training images"
                )

    def end_epoch(self, epoch: int) -> None:
        for scheduler in self.schedulers.values():
            scheduler.step()

    def finish_training(self) -> None:
        if self.config.sample_dir and self._last_pair is not None:
            self.write_samples(Path(self.config.sample_dir) / "final.png", *self._last_pair)

    @torch.no_grad()
    def write_samples(self, path: Path, *pair: torch.Tensor) -> None:
        """A PNG grid of :meth:`sample_rows` for the first 4 pairs (eval mode)."""
        was_training = self.nets.training
        self.nets.eval()
        try:
            rows = self.sample_rows(*(t[:4] for t in pair))
        finally:
            self.nets.train(was_training)
        images = [[to_image(t[i]) for t in row] for row in rows for i in range(len(row[0]))]
        write_png(path, image_grid(images))

    # --- synthesis -----------------------------------------------------------------------------
    @classmethod
    def from_run(cls, run_dir: Path) -> Self:
        from defectlab.runs import load_run  # runs load through the registry, which imports us

        model = load_run(run_dir).model
        if not isinstance(model, cls):
            raise ConfigError(f"{run_dir} holds a {model.name} run, not {cls.name}")
        return model

    def configure_synthesis(self, overrides: dict[str, str]) -> None:
        """Apply ``--set key=value`` strings to a trained model before synthesis. Only
        :attr:`synthesis_fields` may change: the others describe the trained networks."""
        fixed = sorted(set(overrides) - set(self.synthesis_fields))
        if fixed:
            raise ConfigError(
                f"{self.name}: {', '.join(fixed)} cannot change after training; at synthesis "
                f"time only {', '.join(self.synthesis_fields)} can be set"
            )
        self.config = apply_overrides(self.config, overrides, "")

    def _channels_last(self, image: np.ndarray, what: str) -> np.ndarray:
        """``image`` as float32 (H, W, C) at its own size; a channel count the model was not
        trained on is refused with the option that fixes it."""
        array = np.asarray(image, np.float32)
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] != self.channels:
            raise ConfigError(
                f"{self.name} was trained on {self.channels}-channel images; {what} has shape "
                f"{image.shape} (pass --channels {self.channels})"
            )
        return array

    def _to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, C) image in [0, 1] → (1, C, H, W) network input in [-1, 1]."""
        tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
        return tensor.to(self.device) * 2 - 1

    # --- state ---------------------------------------------------------------------------------
    def _weights_hint(self) -> str:
        """What shapes the networks, for the error when checkpoint weights do not fit."""
        return f"image size {self.image_size}, {self.channels} channels, width {self.config.width}"

    def state_dict(self) -> dict[str, Any]:
        return {
            "nets": {name: dict(net.state_dict()) for name, net in self.nets.items()},
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        nets = state["nets"]
        if set(nets) != set(self.nets):
            raise ValueError(f"{self.name}: networks {sorted(nets)} != {sorted(self.nets)}")
        for name, net in self.nets.items():
            try:
                net.load_state_dict(nets[name])
            except RuntimeError as exc:
                raise ValueError(
                    f"{self.name}: weights of {name} do not fit this model "
                    f"({self._weights_hint()}): {str(exc).splitlines()[0]}"
                ) from exc
        self.steps = int(state["steps"])

    def training_state(self) -> dict[str, Any]:
        if not self.optimizers:
            return {}
        return {
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
            "buffers": map_tensors(lambda t: t.cpu(), self.buffers),
            "low_d_steps": dict(self.low_d_steps),
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if not self.optimizers:
            self.setup_training(0)
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
            self.schedulers[name].load_state_dict(state["schedulers"][name])
        self.buffers = map_tensors(lambda t: t.to(self.device), state["buffers"])
        self.low_d_steps = {k: int(v) for k, v in state["low_d_steps"].items()}
