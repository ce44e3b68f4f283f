"""Run directories, checkpoints and trained runs.

A run directory holds everything needed to reproduce or reuse a training run::

    config.json       resolved RunConfig (data, train, calibration, model settings)
    environment.json  defectlab/torch/numpy/OpenCV/Python versions, platform, device
    split.json        the exact train/val/test samples (reloadable)
    train_log.csv     losses per step
    log.txt           what the commands printed
    checkpoints/last.pt  resumable training state (atomic, every N steps and each epoch)
    model.pt          the trained model plus its calibrated thresholds
    metrics.json      training-side metrics (validation score statistics, timings)

Checkpoints are ``torch.save`` dicts of tensors and plain values, read back with
``torch.load(weights_only=True)``: nothing is unpickled. A checkpoint whose model name,
model state version or checkpoint format differ from what is asked for is refused.

:func:`load_run` turns a run directory back into a :class:`TrainedRun` (model, config,
thresholds); it sits below the API, the deployment code and the models that compose runs.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import platform
import random
import re
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from defectlab import __version__, registry
from defectlab.base import Model
from defectlab.config import RunConfig, restore_tuples
from defectlab.data.io import atomic_path, atomic_write_text
from defectlab.errors import CheckpointError, ConfigError, DataError

CHECKPOINT_FORMAT = "defectlab-checkpoint"
#: a run's resumable training state, relative to the run directory
LAST_CHECKPOINT = Path("checkpoints") / "last.pt"
CHECKPOINT_FORMAT_VERSION = 1


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU. Asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA GPU; use cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu or cuda[:N]")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; with CUDA also ask cuDNN and torch for deterministic
    kernels (cuDNN's autotuner and atomic-add backward passes otherwise make two runs of the
    same seed differ). ``CUBLAS_WORKSPACE_CONFIG`` only takes effect when set before CUDA
    starts, so a caller that wants bit-identical GPU runs sets it in the environment."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        # warn_only: an op without a deterministic kernel warns instead of stopping training
        torch.use_deterministic_algorithms(True, warn_only=True)


def environment_info(device: torch.device | None = None) -> dict[str, Any]:
    import cv2

    info = {
        "defectlab": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
    }
    if device is not None:
        info["device"] = str(device)
        if device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(device)
    return info


def write_json(path: Path, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing; is {path.parent} a defectlab run?") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt JSON ({exc})") from exc


def save_checkpoint(path: Path, model: Model, **extra: Any) -> None:
    """Write model state (+ ``extra``: training progress, calibration) atomically."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "defectlab_version": __version__,
        "model": model.name,
        "family": model.family,
        "state_version": model.state_version,
        "model_config": model.config_dict(),
        "image_size": model.image_size,
        "channels": model.channels,
        "state": model.state_dict(),
        "fitted": model.is_fitted,
        **extra,
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, expected_model: str | None = None) -> dict[str, Any]:
    """Read a checkpoint safely and check it belongs to the model and version asked for."""
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint does not exist")
    try:
        with warnings.catch_warnings():  # torch's own advice is not ours to pass on
            warnings.simplefilter("ignore")
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # junk that is not a pickle at all
            raise CheckpointError(
                f"{path}: not a readable defectlab checkpoint (corrupt or truncated)"
            ) from exc
        # what the weights-only unpickler refuses: a class or function to import
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"{path}: refused: the file holds Python objects{what} besides tensors and plain "
            "values, which defectlab never loads because unpickling them can run code; "
            "checkpoints written by defectlab never hold any, so this one was made elsewhere "
            "or altered"
        ) from exc
    except Exception as exc:  # torch raises many types for corrupt or truncated files
        raise CheckpointError(
            f"{path}: not a readable defectlab checkpoint (corrupt or truncated: "
            f"{type(exc).__name__})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a defectlab checkpoint")
    if payload.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {payload.get('format_version')} written by defectlab "
            f"{payload.get('defectlab_version')}; this defectlab {__version__} reads format "
            f"{CHECKPOINT_FORMAT_VERSION}"
        )
    if expected_model is not None and payload.get("model") != expected_model:
        raise CheckpointError(
            f"{path}: checkpoint is for model {payload.get('model')!r}, not {expected_model!r}"
        )
    return payload


def restore_model(payload: dict[str, Any], model: Model, path: Path) -> None:
    if payload.get("state_version") != model.state_version:
        raise CheckpointError(
            f"{path}: {model.name} checkpoint has state version {payload.get('state_version')} "
            f"(defectlab {payload.get('defectlab_version')}); this defectlab {__version__} "
            f"expects {model.state_version}. Retrain the model."
        )
    try:
        model.load_state_dict(payload["state"])
    except (KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: state does not fit model {model.name}: {exc}") from exc
    model.is_fitted = bool(payload.get("fitted", True))


def run_logger(run_dir: Path) -> logging.Logger:
    """A logger writing to ``run_dir/log.txt`` (and nothing else): the CLI prints separately."""
    logger = logging.getLogger(f"defectlab.run.{run_dir.resolve()}")
    if not logger.handlers:
        run_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(run_dir / "log.txt", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


# --- trained runs ----------------------------------------------------------------------------


MODEL_FILE = "model.pt"


@dataclass
class TrainedRun:
    """A trained model with its run directory, resolved config and calibrated thresholds."""

    run_dir: Path
    config: RunConfig
    model: Model
    calibration: dict[str, float] = field(default_factory=dict)

    @property
    def image_threshold(self) -> float:
        return self.calibration["image_threshold"]

    @property
    def pixel_threshold(self) -> float:
        return self.calibration["pixel_threshold"]

    @property
    def map_range(self) -> tuple[float, float]:
        """Heat-map display range: normal median → twice the pixel threshold's excess."""
        low = self.calibration["map_median"]
        return low, low + 2.0 * max(self.pixel_threshold - low, 1e-6)


def trainable_class(name: str) -> type[Model]:
    """Detectors, segmenters and learned synthesizers (GANs) train; procedural ones do not."""
    cls = registry.get(name, ("detector", "segmenter", "synthesizer"))
    if not issubclass(cls, Model):
        raise ConfigError(f"{name} is procedural and needs no training: use `defectlab synth`")
    return cls


def require_scorer(run: TrainedRun) -> None:
    """Learned synthesizers have runs too, but nothing to predict or evaluate with."""
    if run.model.family == "synthesizer":
        name = run.config.model
        raise ConfigError(
            f"{run.run_dir} holds the {name} synthesizer, which does not score images: "
            f"use `defectlab synth --method {name} --run {run.run_dir}`"
        )


def make_model(config: RunConfig, device: torch.device) -> Model:
    cls = trainable_class(config.model)
    if config.data.channels not in (1, 3):
        raise ConfigError(
            f"data.channels={config.data.channels!r} is decided from the training images when "
            "a run is trained; a model needs 1 or 3"
        )
    try:
        return cls(
            cls.Config(**restore_tuples(config.model_config)),
            image_size=config.data.image_size,
            channels=config.data.channels,
            device=device,
        )
    except (TypeError, ValueError) as exc:  # e.g. an image size the network cannot take
        raise ConfigError(f"{config.model}: invalid settings: {exc}") from exc


def predict_arrays(
    model: Model, images: np.ndarray, batch_size: int = 32, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N,) and maps (N, H, W) for float images (N, H, W, C) at model resolution."""
    scores, maps = [], []
    # no_grad, not inference_mode: a model may re-enable autograd (gradient anomaly maps)
    with torch.no_grad():
        for start in tqdm(
            range(0, len(images), batch_size),
            desc="predicting",
            disable=not progress,
            leave=False,
            file=sys.stderr,
        ):
            chunk = np.ascontiguousarray(images[start : start + batch_size].transpose(0, 3, 1, 2))
            out = model.predict(torch.from_numpy(chunk).to(model.device))
            scores.append(out.scores.float().cpu().numpy())
            maps.append(out.maps.float().cpu().numpy())
    score_array, map_array = np.concatenate(scores), np.concatenate(maps)
    if not (np.isfinite(score_array).all() and np.isfinite(map_array).all()):
        raise DataError(f"{model.name} produced non-finite scores; the model is broken")
    return score_array, map_array


def load_run(run_dir: str | Path, device: str = "auto") -> TrainedRun:
    """Load a trained run (model weights, config, thresholds) for prediction."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run directory does not exist")
    path = run_dir / MODEL_FILE
    if not path.exists():
        hint = (
            " (training was interrupted: resume it with --resume)"
            if (run_dir / LAST_CHECKPOINT).exists()
            else ""
        )
        raise CheckpointError(f"{path}: no trained model in this run{hint}")
    payload = load_checkpoint(path)
    config = RunConfig.from_dict(payload["run_config"])
    former = trainable_class(config.model).former_defaults
    config = replace(config, model_config={**former, **config.model_config})
    net = make_model(config, resolve_device(device))
    restore_model(payload, net, path)
    return TrainedRun(run_dir, config, net, dict(payload["calibration"]))
