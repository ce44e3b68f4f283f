"""One scoring surface for deployment, whatever runs the model: PyTorch or ONNX Runtime.

Batch inspection (:mod:`defectlab.deploy.batch`), the HTTP service
(:mod:`defectlab.deploy.serve`) and the inference benchmark talk to an :class:`Inspector`
only, so a model exported to ONNX is a drop-in for its PyTorch run. An inspector scores
images already at its input size; :func:`score_images` takes full-resolution images,
resizes (or tiles) them with the same code for both backends and maps the heat back. A run
trained on tiles (``data.tile=on``) says so (:attr:`Inspector.tiled`, the export's metadata)
and is scored as stitched tiles by default.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from defectlab.data.transforms import resize_image, resize_map, score_tiled
from defectlab.errors import CheckpointError, ConfigError

BACKENDS = ("torch", "onnx")
#: the folder ``defectlab export`` writes into a run by default, and where
#: ``--backend onnx`` looks when given a run folder
EXPORT_DIR = "export"
ONNX_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
#: what an export folder's metadata must say it is
FORMAT = "defectlab-onnx"
FORMAT_VERSION = 1


@dataclass
class Inspector(ABC):
    """A loaded model with its calibrated decision rule.

    ``map_range`` is the heat-map display range (normal median → twice the pixel
    threshold's excess); ``run_dir`` is the training run the model came from; ``tiled``:
    the model was trained on native-resolution tiles of ``image_size`` and scores whole
    images as stitched tiles.
    """

    model: str
    image_size: int
    channels: int
    image_threshold: float
    pixel_threshold: float
    map_range: tuple[float, float]
    run_dir: Path

    backend: str = "torch"
    tiled: bool = False

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
            "tiled": self.tiled,
            "image_threshold": self.image_threshold,
            "pixel_threshold": self.pixel_threshold,
            "run": str(self.run_dir),
        }


@dataclass
class TorchInspector(Inspector):
    """A trained run evaluated eagerly by PyTorch (CPU or CUDA)."""

    trained: Any = None  # defectlab.runs.TrainedRun

    def score(self, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        from defectlab.runs import predict_arrays

        return predict_arrays(self.trained.model, images, batch_size)


def torch_inspector(run_dir: str | Path, device: str = "auto") -> TorchInspector:
    """Load a trained run for inspection; learned synthesizers are refused (they score nothing)."""
    from defectlab.runs import load_run, require_scorer

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
        tiled=run.config.data.tile == "on",
        trained=run,
    )


def open_inspector(path: str | Path, backend: str = "torch", device: str = "auto") -> Inspector:
    """The model at ``path`` on ``backend``: a run folder for ``torch``; for ``onnx`` an export
    folder, or a run folder holding one in ``export/``."""
    if backend == "torch":
        return torch_inspector(path, device)
    if backend == "onnx":
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


def use_tiles(inspector: Inspector, tile: bool | None) -> bool:
    """Whether images are scored as tiles: ``tile`` when given, else as the model was trained."""
    return inspector.tiled if tile is None else bool(tile)


def score_images(
    inspector: Inspector,
    images: Sequence[np.ndarray],
    *,
    tile: bool | None = None,
    batch_size: int = 32,
) -> list[tuple[float, np.ndarray]]:
    """Score full-resolution (H, W, C) images; each gets its score and a heat map at its own
    size. Without tiling all images go through the model in one batched call (resized to
    the model size); with tiling (``tile=None``: as the model was trained) each image is cut
    into overlapping native-resolution model-size tiles, ``batch_size`` per model call, whose
    maps are stitched (:func:`~defectlab.data.transforms.score_tiled`, the loop evaluate
    uses too), and its score is the highest tile score."""
    size = inspector.image_size
    if not use_tiles(inspector, tile):
        if not images:
            return []
        scores, maps = inspector.score(
            np.stack([resize_image(image, size) for image in images]), batch_size
        )
        return [
            (float(score), resize_map(heat, image.shape[:2]))
            for score, heat, image in zip(scores, maps, images, strict=True)
        ]
    return [
        score_tiled(lambda tiles: inspector.score(tiles, batch_size), image, size, batch_size)
        for image in images
    ]


# --- ONNX Runtime ------------------------------------------------------------------------------


def onnx_session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort
    import torch

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=ort.get_available_providers())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class OnnxInspector(Inspector):
    """An exported model run by ONNX Runtime (thread-safe; one session shared by all calls)."""

    session: Any = None
    metadata: dict[str, Any] | None = None

    def score(self, images: np.ndarray, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = [], []
        for start in range(0, len(images), batch_size):
            chunk = np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)
            score, heat = self.session.run(["score", "anomaly_map"], {"image": chunk})
            scores.append(score)
            maps.append(heat)
        return np.concatenate(scores), np.concatenate(maps)

    def info(self) -> dict[str, Any]:
        meta = self.metadata or {}
        quantization = meta.get("quantization") or {}
        return super().info() | {
            "opset": meta.get("opset"),
            "exported_with": meta.get("torch"),
            "quantization": quantization.get("type", "none (float32)"),
        }


def onnx_inspector(folder: Path, threads: int | None = None) -> OnnxInspector:
    """Open an export folder; the metadata must be ours, of this format version, and match
    the graph file byte for byte (a swapped or truncated model.onnx is refused)."""
    meta_path = folder / METADATA_FILE
    try:
        metadata = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable export metadata ({exc})") from exc
    if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: not a {FORMAT} v{FORMAT_VERSION} export "
            f"(format {metadata.get('format')!r} v{metadata.get('format_version')!r})"
        )
    graph = folder / metadata["onnx_file"]
    if not graph.is_file() or file_sha256(graph) != metadata["sha256"]:
        raise CheckpointError(f"{graph}: missing or does not match its metadata checksum")
    size = metadata["input"]["shape"][1]
    return OnnxInspector(
        model=metadata["model"],
        image_size=int(size),
        channels=int(metadata["input"]["shape"][3]),
        image_threshold=float(metadata["image_threshold"]),
        pixel_threshold=float(metadata["pixel_threshold"]),
        map_range=(float(metadata["map_range"][0]), float(metadata["map_range"][1])),
        run_dir=Path(metadata["run"]),
        backend="onnx",
        tiled=bool((metadata.get("tiling") or {}).get("enabled", False)),
        session=onnx_session(graph, threads),
        metadata=metadata,
    )
