"""One scoring surface for deployment, whatever runs the model: PyTorch or ONNX Runtime.

Batch inspection (:mod:`defectlab.deploy.inspect`), the HTTP service
(:mod:`defectlab.deploy.serve`) and the inference benchmark talk to an :class:`Inspector`
only, so a model exported to ONNX is a drop-in for its PyTorch run. An inspector scores
images already at its input size; :func:`score_images` takes full-resolution images,
resizes (or tiles) them with the same code for both backends and maps the heat back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectlab.data.transforms import extract_tiles, resize_image, resize_map, stitch_tiles
from defectlab.errors import CheckpointError, ConfigError

BACKENDS = ("torch", "onnx")
#: the folder ``defectlab export`` writes into a run by default, and where
#: ``--backend onnx`` looks when given a run folder
EXPORT_DIR = "export"
ONNX_FILE = "model.onnx"
METADATA_FILE = "metadata.json"


@dataclass
class Inspector(ABC):
    """A loaded model with its calibrated decision rule.

    ``map_range`` is the heat-map display range (normal median → twice the pixel
    threshold's excess); ``run_dir`` is the training run the model came from.
    """

    model: str
    image_size: int
    channels: int
    image_threshold: float
    pixel_threshold: float
    map_range: tuple[float, float]
    run_dir: Path

    backend: str = "torch"

    @abstractmethod
    def score(self, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Scores (N,) and maps (N, S, S) of float32 images (N, S, S, C) in [0, 1], where S
        is :attr:`image_size`."""

    def info(self) -> dict[str, Any]:
        """What a client needs to know about the model behind an endpoint or a result file."""
        from defectlab import __version__

        return {
            "model": self.model,
            "backend": self.backend,
            "defectlab": __version__,
            "image_size": self.image_size,
            "channels": self.channels,
            "image_threshold": self.image_threshold,
            "pixel_threshold": self.pixel_threshold,
            "run": str(self.run_dir),
        }


@dataclass
class TorchInspector(Inspector):
    """A trained run evaluated eagerly by PyTorch (CPU or CUDA)."""

    trained: Any = None  # defectlab.api.TrainedRun

    def score(self, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        from defectlab.api import predict_arrays

        return predict_arrays(self.trained.model, images, batch_size)


def torch_inspector(run_dir: str | Path, device: str = "auto") -> TorchInspector:
    """Load a trained run for inspection; learned synthesizers are refused (they score nothing)."""
    from defectlab.api import load_run, require_scorer

    run = load_run(run_dir, device)
    require_scorer(run)
    return TorchInspector(
        model=run.config.model,
        image_size=run.config.data.image_size,
        channels=run.config.data.channels,
        image_threshold=run.image_threshold,
        pixel_threshold=run.pixel_threshold,
        map_range=run.map_range,
        run_dir=run.run_dir,
        backend="torch",
        trained=run,
    )


def open_inspector(path: str | Path, backend: str = "torch", device: str = "auto") -> Inspector:
    """The model at ``path`` on ``backend``: a run folder for ``torch``; for ``onnx`` an export
    folder, or a run folder holding one in ``export/``."""
    if backend == "torch":
        return torch_inspector(path, device)
    if backend == "onnx":
        from defectlab.deploy.onnx import onnx_inspector

        return onnx_inspector(find_export(Path(path)))
    raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def find_export(path: Path) -> Path:
    """The export folder at ``path`` or in ``path/export``; a clear error when neither holds one."""
    for folder in (path, path / EXPORT_DIR):
        if (folder / ONNX_FILE).is_file():
            return folder
    raise CheckpointError(
        f"{path}: no {ONNX_FILE} here or in {path / EXPORT_DIR}; create it with "
        f"`defectlab export --run RUN_DIR --format onnx`"
    )


def score_images(
    inspector: Inspector, images: Sequence[np.ndarray], *, tile: bool = False, batch_size: int = 32
) -> list[tuple[float, np.ndarray]]:
    """Score full-resolution (H, W, C) images; each gets its score and a heat map at its own
    size. Without tiling all images go through the model in one batched call (resized to
    the model size); with tiling each image is cut into overlapping model-size tiles whose
    maps are stitched, and its score is the highest tile score."""
    size = inspector.image_size
    if not tile:
        if not images:
            return []
        scores, maps = inspector.score(
            np.stack([resize_image(image, size) for image in images]), batch_size
        )
        return [
            (float(score), resize_map(heat, image.shape[:2]))
            for score, heat, image in zip(scores, maps, images, strict=True)
        ]
    results = []
    for image in images:
        tiles, positions = extract_tiles(image, size, overlap=size // 4)
        scores, maps = inspector.score(tiles, batch_size)
        results.append((float(scores.max()), stitch_tiles(maps, positions, image.shape[:2])))
    return results
