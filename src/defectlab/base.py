"""The model contract: what every registered model declares, and nothing else is asked.

* :class:`Model`: a trainable model. A typed config, the training-step protocol run by
  :mod:`defectlab.training`, a checkpointable state, its networks and optimisers, and the
  capabilities the pipeline reads (what its training batches need, whether it fixes its own
  decision thresholds, why it cannot be exported). Defaults are declared here, so no caller
  probes with ``getattr``.
* :class:`Scorer`: a model that scores images (``predict`` → :class:`Prediction`). Families
  refine it: :class:`defectlab.detect.base.Detector` fits on normal images only,
  :class:`defectlab.segment.base.Segmenter` fits on image/mask pairs.
* :class:`Synthesizer`: makes defect images with exact masks (:class:`SynthSample`).
  Procedural synthesizers are only this; learned ones (GANs) are a :class:`Model` too, and
  never inherit a ``predict``.

The CLI, the trainer, deployment and the benchmarks see only this surface, so a new model
never touches them.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from defectlab.errors import ConfigError, NotFittedError


@dataclass
class Prediction:
    """Image scores ``(B,)`` (higher = more defective) and maps ``(B, H, W)`` at input size."""

    scores: torch.Tensor
    maps: torch.Tensor


@dataclass
class ModelConfig:
    """Base of every model's config dataclass. ``epochs`` is the trainer's loop length."""

    epochs: int = 1


class Model(ABC):
    """A trainable model. Subclasses set the class variables and implement the hooks."""

    name: ClassVar[str]
    family: ClassVar[str]
    description: ClassVar[str]
    Config: ClassVar[type[ModelConfig]] = ModelConfig
    #: bump when the checkpoint state changes meaning; old checkpoints are then refused
    state_version: ClassVar[int] = 1
    #: settings whose default changed after runs were saved without them: a saved config that
    #: lacks the key predates the field and was trained with this value (``runs.load_run``)
    former_defaults: ClassVar[dict[str, Any]] = {}
    #: why inference cannot be an ONNX graph (``None``: it can); see :meth:`export_blocker`
    onnx_blocker: ClassVar[str | None] = None

    # --- capabilities the pipeline reads -------------------------------------------------
    #: training batches include the split's training defect images with their masks (not
    #: only the family's usual images); training refuses a split without them
    trains_on_defects: ClassVar[bool] = False
    #: training batches carry ``area_ratio`` and ``area_margin`` per image, read from
    #: ``data.area_ratio_csv`` (weak labels)
    learns_from_area_ratios: ClassVar[bool] = False
    #: training batches carry ``defect_class`` per image; the run fills the config's
    #: ``defect_classes`` with the sorted defect types of the training defects
    learns_defect_types: ClassVar[bool] = False

    def __init__(
        self,
        config: ModelConfig | None = None,
        *,
        image_size: int = 128,
        channels: int = 1,
        device: str | torch.device = "cpu",
    ) -> None:
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{self.name} needs a {self.Config.__name__}, got {type(config)}")
        self.image_size = image_size
        self.channels = channels
        self.device = torch.device(device)
        #: set when :func:`defectlab.training.fit` ends or a state is loaded, and saved with
        #: the checkpoint (a mid-training checkpoint restores ``False``);
        #: :meth:`check_fitted` refuses inference before it
        self.is_fitted = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Loading a state loads a trained model: every ``load_state_dict`` marks the model
        fitted once it succeeds (``runs.restore_model`` then applies the checkpoint's flag)."""
        super().__init_subclass__(**kwargs)
        load = cls.__dict__.get("load_state_dict")
        if load is None or getattr(load, "marks_fitted", False):
            return

        @functools.wraps(load)
        def load_and_mark(self: Model, state: dict[str, Any]) -> None:
            load(self, state)
            self.is_fitted = True

        load_and_mark.marks_fitted = True  # type: ignore[attr-defined]
        cls.load_state_dict = load_and_mark  # type: ignore[method-assign]

    # --- training protocol (driven by defectlab.training.fit) -------------------------------
    def setup_training(self, n_train: int) -> None:  # noqa: B027 - optional hook
        """Build networks and optimisers before the first step (or before a resume)."""

    @abstractmethod
    def training_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Consume one batch (``image`` (B,C,H,W) in [0, 1], ``mask``, ``label``, ``index``)
        and return the losses to log. Non-finite values stop training with a clear message."""

    def end_epoch(self, epoch: int) -> None:  # noqa: B027 - optional hook
        """Called after every epoch (learning-rate schedules, statistics)."""

    def finish_training(self) -> None:  # noqa: B027 - optional hook
        """Called once after the last epoch, before the final checkpoint."""

    # --- state -------------------------------------------------------------------------------
    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything inference needs: tensors and plain Python values only."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def training_state(self) -> dict[str, Any]:
        """Extra state to resume training (optimisers, schedulers). Empty by default."""
        return {}

    def load_training_state(self, state: dict[str, Any]) -> None:  # noqa: B027
        """Restore what :meth:`training_state` saved."""

    # --- parts ---------------------------------------------------------------------------------
    def all_networks(self) -> list[nn.Module]:
        """Every network the model holds, each once, including those of member models (e.g.
        an ensemble's runs): what export traces and distributed training synchronises.
        Found among the model's attributes (and lists, tuples, dicts of them); override when
        a network hides deeper."""
        return _parts_of(self, nn.Module)

    def all_optimizers(self) -> list[torch.optim.Optimizer]:
        """Every optimiser the model holds, each once (distributed training averages the
        gradients they step on)."""
        return _parts_of(self, torch.optim.Optimizer)

    @property
    def decision_thresholds(self) -> tuple[float | None, float | None] | None:
        """Image and pixel thresholds the model fixes itself (e.g. a probability of 0.5), or
        ``None`` to calibrate both on normal validation images. ``None`` inside the pair
        leaves that one to calibration."""
        return None

    def check_fitted(self, fitted: bool, missing: str, action: str = "predict") -> None:
        """Raise :class:`~defectlab.errors.NotFittedError` naming the model, the action and
        what is ``missing`` unless ``fitted``."""
        if not fitted:
            raise NotFittedError(f"{self.name}: {action} before fit ({missing})")

    def export_blocker(self) -> str | None:
        """Why this trained model cannot be exported to ONNX, or ``None``. Inference that
        leaves PyTorch (OpenCV, NumPy) or needs autograd cannot be traced into a graph."""
        return self.onnx_blocker

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)


class Scorer(Model):
    """A model that scores images: detectors and segmenters."""

    @abstractmethod
    def predict(self, images: torch.Tensor) -> Prediction:
        """Score a batch ``(B, C, H, W)`` in [0, 1] on ``self.device``."""


def _parts_of(model: Model, kind: type) -> list[Any]:
    """Attributes of ``model`` of type ``kind``, each once, looking into lists, tuples, dicts
    and member models."""
    found: dict[int, Any] = {}
    seen: set[int] = set()

    def visit(value: Any, depth: int) -> None:
        if isinstance(value, kind):
            found.setdefault(id(value), value)
        elif isinstance(value, Model) and id(value) not in seen:
            seen.add(id(value))
            for item in vars(value).values():
                visit(item, 0)
        elif depth < 2 and isinstance(value, list | tuple):
            for item in value:
                visit(item, depth + 1)
        elif depth < 2 and isinstance(value, dict):
            for item in value.values():
                visit(item, depth + 1)

    visit(model, 0)
    return list(found.values())


# --- synthesizers ------------------------------------------------------------------------------


@dataclass
class SynthSample:
    """A synthetic defect image (H, W, C) float32 in [0, 1], its bool (H, W) mask, and the
    parameters that made it (written to ``manifest.csv``)."""

    image: np.ndarray
    mask: np.ndarray
    record: dict[str, Any] = field(default_factory=dict)


@dataclass
class SynthConfig:
    """Base of every synthesizer's config dataclass."""


class Synthesizer(ABC):
    """Paints or generates defects. Procedural synthesizers need no :meth:`fit`; learned
    ones (GANs) train first and are loaded from a run directory."""

    name: ClassVar[str]
    family: ClassVar[str] = "synthesizer"
    description: ClassVar[str]
    Config: ClassVar[type[SynthConfig]] = SynthConfig
    needs_training: ClassVar[bool] = False
    #: settings that ``--set`` may change after training (learned synthesizers; a procedural
    #: synthesizer takes every field of its config)
    synthesis_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: SynthConfig | None = None) -> None:
        self.config = config if config is not None else self.Config()
        if not isinstance(self.config, self.Config):
            raise TypeError(f"{self.name} needs a {self.Config.__name__}, got {type(config)}")

    @classmethod
    def from_run(cls, run_dir: Path) -> Synthesizer:
        """Load a trained synthesizer from its run directory (learned synthesizers only)."""
        raise ConfigError(f"{cls.name} is procedural and has no trained run to load")

    def configure_synthesis(self, overrides: dict[str, str]) -> None:
        """Learned synthesizers accept ``--set`` sampling settings after training (e.g. the
        detail mode); the networks themselves stay as trained."""
        raise ConfigError(f"{self.name}: no settings can change after training")

    def use_defect_examples(self, images: Sequence[np.ndarray]) -> None:
        """Learned synthesizers that take their defect appearance from real examples (e.g.
        CrossGAN's ``detail=encode``) override this; the others take none."""
        raise ConfigError(f"{self.name} takes no --defects examples")

    @abstractmethod
    def synthesize(self, image: np.ndarray, rng: np.random.Generator) -> SynthSample:
        """One defect image from one normal image (H, W, C) float32 in [0, 1]."""

    def generate(
        self, images: Sequence[np.ndarray], n: int, seed: int = 0
    ) -> Iterator[tuple[int, SynthSample]]:
        """``n`` samples cycling over ``images``; sample ``i`` uses its own generator seeded by
        ``(seed, i)``, so any sample can be reproduced alone. Yields (source index, sample)."""
        if not images:
            raise ValueError("no normal images to synthesize defects on")
        for i in range(n):
            source = i % len(images)
            rng = np.random.default_rng([seed, i])
            yield source, self.synthesize(images[source], rng)
