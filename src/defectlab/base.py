"""What every trainable model shares: a typed config, a training-step protocol run by
:mod:`defectlab.training`, a uniform :class:`Prediction`, and a checkpointable state.

Families refine it: :class:`defectlab.detect.base.Detector` fits on normal images only,
:class:`defectlab.segment.base.Segmenter` fits on image/mask pairs. The CLI, the trainer and
the benchmarks see only this surface, so a new model never touches them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch


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
    #: why inference cannot be an ONNX graph (``None``: it can); see :meth:`export_blocker`
    onnx_blocker: ClassVar[str | None] = None

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

    # --- inference ---------------------------------------------------------------------------
    @abstractmethod
    def predict(self, images: torch.Tensor) -> Prediction:
        """Score a batch ``(B, C, H, W)`` in [0, 1] on ``self.device``."""

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

    def export_blocker(self) -> str | None:
        """Why this trained model cannot be exported to ONNX, or ``None``. Inference that
        leaves PyTorch (OpenCV, NumPy) or needs autograd cannot be traced into a graph."""
        return self.onnx_blocker

    def config_dict(self) -> dict[str, Any]:
        return asdict(self.config)
