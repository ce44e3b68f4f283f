"""ONNX export of a trained run, with the input layout and the calibrated decision baked into
the graph, and ONNX Runtime inference behind the :class:`~defectlab.deploy.backends.Inspector`
interface.

The graph takes ``image``: float32 ``(batch, S, S, C)`` in [0, 1] (NHWC, the layout images
are decoded in) and returns

* ``score`` ``(batch,)`` – the model's image score,
* ``score_z`` ``(batch,)`` – the score standardised by the normal validation scores
  (comparable across models, the ensemble's normalisation),
* ``anomaly_map`` ``(batch, S, S)``,
* ``mask`` ``(batch, S, S)`` uint8 – ``anomaly_map >= pixel_threshold``,
* ``is_defect`` ``(batch,)`` uint8 – ``score >= image_threshold``.

Resizing to S stays outside the graph, in :func:`defectlab.deploy.backends.score_images`
for both backends: ONNX ``Resize`` has no equivalent of OpenCV's area interpolation, and a
different resize would make the two backends disagree. The export is refused unless ONNX
Runtime reproduces PyTorch on check images (test images of the run's data, normal and
defective, when they are still readable, otherwise seeded synthetic ones) within
``ATOL + RTOL·|value|`` (1e-3 + 1e-3·|value|); the measured differences go into the
metadata. ``quantize="int8"`` trades that float agreement for speed: a static int8 graph
calibrated on normal validation images, kept only if its masks agree with PyTorch's on at
least 99% of the check pixels (the measured agreement is recorded).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from defectlab import __version__
from defectlab.base import Model
from defectlab.data.io import atomic_path, atomic_write_text
from defectlab.data.transforms import tile_overlap
from defectlab.deploy.backends import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_FILE,
    ONNX_FILE,
    file_sha256,
    onnx_session,
    torch_inspector,
)
from defectlab.errors import ConfigError

#: ONNX operator set of exported graphs (ONNX Runtime 1.17+ runs it)
OPSET = 18
#: export gate: |onnx − torch| ≤ ATOL + RTOL·|torch| for scores and maps. Loose enough for
#: float32 reordering amplified by normalisation (an ensemble's z-scores), tight enough to
#: catch a wrong graph; the measured differences (typically 1e-7 … 1e-5) go into metadata.
ATOL, RTOL = 1e-3, 1e-3
OUTPUTS = ("score", "score_z", "anomaly_map", "mask", "is_defect")
QUANTIZATIONS = (None, "int8")
#: normal validation images that calibrate the int8 activation ranges
CALIBRATION_IMAGES = 32


class InspectionGraph(nn.Module):
    """Layout conversion + the model's ``predict`` + the calibrated decision, as one module
    to trace. The model's networks are registered as submodules so their weights become
    named graph initialisers."""

    def __init__(self, model: Model, calibration: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.networks = nn.ModuleList(model.all_networks())
        self.networks.eval().requires_grad_(False)
        std = float(calibration.get("normal_score_std", 1.0)) or 1.0
        thresholds = {
            "image_threshold": calibration["image_threshold"],
            "pixel_threshold": calibration["pixel_threshold"],
            "score_mean": calibration.get("normal_score_mean", 0.0),
            "score_std": std,
        }
        for name, value in thresholds.items():
            self.register_buffer(name, torch.tensor(float(value)))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        prediction = self.model.predict(image.permute(0, 3, 1, 2).clamp(0.0, 1.0))
        score, heat = prediction.scores.float(), prediction.maps.float()
        return (
            score,
            (score - self.score_mean) / self.score_std,
            heat,
            (heat >= self.pixel_threshold).to(torch.uint8),
            (score >= self.image_threshold).to(torch.uint8),
        )


def _split_images(run: Any, part: str, n: int) -> tuple[np.ndarray, str]:
    """Up to ``n`` images of one split part of the run's own data, spread over the part (the
    test part holds normal and defect images: real inputs exercise the model's real value
    ranges), or seeded synthetic images when the data is no longer readable."""
    from defectlab.data.run_data import load_images, load_training_images
    from defectlab.data.splits import Split
    from defectlab.errors import DefectlabError

    config = run.config.data
    try:
        samples = Split.load(run.run_dir / "split.json")[part]
        samples = samples[:: max(1, len(samples) // n)][:n]
        if config.tile == "on":  # the graph sees tiles: check it on native-resolution ones
            tiles = load_training_images(samples, config, f"loading {part} tiles").images
            tiles = tiles[:: max(1, len(tiles) // n)][:n]
            return tiles, f"{len(tiles)} tiles of {part} images of {config.path}"
        loaded = load_images(samples, config, f"loading {part} images", progress=False)
        return loaded.images, f"{len(loaded.images)} {part} images of {config.path}"
    except (DefectlabError, OSError, KeyError):
        rng = np.random.default_rng(0)
        size, channels = config.image_size, config.channels
        base = rng.uniform(0.3, 0.7, (n, 1, 1, channels))
        images = np.clip(base + rng.normal(0, 0.05, (n, size, size, channels)), 0, 1)
        return images.astype(np.float32), f"{n} seeded synthetic images (run data unreadable)"


def _differences(reference: dict[str, np.ndarray], exported: dict[str, np.ndarray]) -> dict:
    out: dict[str, Any] = {}
    for key in ("score", "anomaly_map"):
        ref, got = reference[key], exported[key]
        excess = np.abs(got - ref) - (ATOL + RTOL * np.abs(ref))
        out[f"max_abs_{key}_diff"] = float(np.abs(got - ref).max())
        out[f"{key}_within_tolerance"] = bool((excess <= 0).all())
    out["mask_disagreement"] = float((reference["mask"] != exported["mask"]).mean())
    out["decision_disagreement"] = float((reference["is_defect"] != exported["is_defect"]).mean())
    return out


def _quantize_int8(graph_path: Path, calibration: np.ndarray) -> None:
    """Replace the float graph by a static int8 one: QDQ format, per-channel int8 weights,
    uint8 activations with ranges calibrated on ``calibration`` images; convolutions and
    matrix products only (the decision tail stays float)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"image": image[None]} for image in calibration])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory(dir=graph_path.parent) as folder:
        prepared, quantized = Path(folder) / "prepared.onnx", Path(folder) / "int8.onnx"
        quant_pre_process(str(graph_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(quantized),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=["Conv", "MatMul", "Gemm"],
        )
        os.replace(quantized, graph_path)


def export_onnx(
    run_dir: str | Path, out: str | Path | None = None, quantize: str | None = None
) -> dict[str, Any]:
    """Export the trained run at ``run_dir`` to ``out`` (default ``run_dir/export``):
    ``model.onnx`` and ``metadata.json``. Raises :class:`ConfigError` naming the reason
    when the model cannot be expressed as an ONNX graph or ONNX Runtime disagrees with
    PyTorch beyond the tolerance.

    ``quantize="int8"`` then replaces the graph by a static int8 one calibrated on the run's
    normal validation images: faster on CPUs with int8 dot products (VNNI), no longer
    within float tolerance. Its agreement with PyTorch (score differences, decision and
    mask-pixel agreement) is measured on the check images and recorded; it is refused
    when more than 1% of mask pixels change."""
    import onnxruntime

    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"quantize must be one of {QUANTIZATIONS}, got {quantize!r}")
    inspector = torch_inspector(run_dir, device="cpu")
    run = inspector.trained
    model: Model = run.model
    blocker = model.export_blocker()
    if blocker:
        raise ConfigError(f"{run_dir}: {model.name} cannot be exported to ONNX: {blocker}")
    out = Path(out) if out is not None else Path(run_dir) / "export"
    graph = InspectionGraph(model, run.calibration)
    size, channels = inspector.image_size, inspector.channels
    example = torch.rand(2, size, size, channels, generator=torch.Generator().manual_seed(0))
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                graph,
                (example,),
                dynamo=True,
                input_names=["image"],
                output_names=list(OUTPUTS),
                dynamic_shapes=({0: batch},),
                opset_version=OPSET,
                external_data=False,
                verbose=False,
            )
        except Exception as exc:  # the exporter raises many types; all mean "not traceable"
            raise ConfigError(
                f"{run_dir}: {model.name} could not be traced for ONNX: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            ) from exc
    with atomic_path(out / ONNX_FILE) as tmp:
        program.save(str(tmp))

    images, source = _split_images(run, "test", 8)
    if len(images) % 2 == 0:  # an odd batch (the trace used 2) catches a frozen batch size
        images = np.concatenate([images, images[:1]])
    with torch.no_grad():
        reference = dict(zip(OUTPUTS, graph(torch.from_numpy(images)), strict=True))
    reference = {k: v.numpy() for k, v in reference.items()}
    try:
        outputs = onnx_session(out / ONNX_FILE).run(None, {"image": images})
        produced = dict(zip(OUTPUTS, outputs, strict=True))
    except Exception as exc:  # ONNX Runtime's own exception types
        (out / ONNX_FILE).unlink(missing_ok=True)
        raise ConfigError(
            f"{run_dir}: the exported {model.name} graph does not run in ONNX Runtime: {exc}"
        ) from exc
    check = {"images": len(images), "source": source, "atol": ATOL, "rtol": RTOL}
    check |= _differences(reference, produced)
    if not (check["score_within_tolerance"] and check["anomaly_map_within_tolerance"]):
        (out / ONNX_FILE).unlink(missing_ok=True)
        raise ConfigError(
            f"{run_dir}: ONNX Runtime disagrees with PyTorch for {model.name} beyond "
            f"{ATOL:g} + {RTOL:g}·|value| (score {check['max_abs_score_diff']:.3g}, map "
            f"{check['max_abs_anomaly_map_diff']:.3g}); not exported"
        )
    quantization = None
    if quantize == "int8":
        calibration, calibration_source = _split_images(run, "val", CALIBRATION_IMAGES)
        _quantize_int8(out / ONNX_FILE, calibration)
        int8 = dict(
            zip(OUTPUTS, onnx_session(out / ONNX_FILE).run(None, {"image": images}), strict=True)
        )
        agreement = _differences(reference, int8)
        quantization = {
            "type": "int8 static QDQ: per-channel int8 weights, uint8 activations (Conv, MatMul)",
            "calibration": calibration_source,
            "max_abs_score_diff": agreement["max_abs_score_diff"],
            "max_abs_anomaly_map_diff": agreement["max_abs_anomaly_map_diff"],
            "mask_agreement": 1.0 - agreement["mask_disagreement"],
            "decision_agreement": 1.0 - agreement["decision_disagreement"],
        }
        if quantization["mask_agreement"] < 0.99:
            (out / ONNX_FILE).unlink(missing_ok=True)
            raise ConfigError(
                f"{run_dir}: int8 quantisation changes {agreement['mask_disagreement']:.1%} of "
                f"the mask pixels of {model.name} on {source}; export it without --quantize"
            )
    low, high = inspector.map_range
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "defectlab": __version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "opset": OPSET,
        "model": model.name,
        "family": model.family,
        "model_state_version": model.state_version,
        "run": str(Path(run_dir)),
        "onnx_file": ONNX_FILE,
        "sha256": file_sha256(out / ONNX_FILE),
        "input": {
            "name": "image",
            "shape": ["batch", size, size, channels],
            "dtype": "float32",
            "layout": "NHWC",
            "range": [0.0, 1.0],
            "preprocessing": (
                f"decode; convert to {channels} channel(s); scale to [0, 1] by the bit depth; "
                + (
                    f"cut into {size}x{size} tiles at native resolution (see tiling) — "
                    "defectlab.data.io.read_image + defectlab.data.transforms.score_tiled"
                    if inspector.tiled
                    else f"resize to {size}x{size} (area when shrinking, bilinear when "
                    "growing) — defectlab.data.io.read_image + "
                    "defectlab.data.transforms.resize_image"
                )
            ),
        },
        "outputs": list(OUTPUTS),
        # a tiled run's graph takes one tile: both backends cut and stitch with the same code
        "tiling": {
            "enabled": inspector.tiled,
            "tile": size,
            "overlap": tile_overlap(size),
            "rule": (
                "overlapping native-resolution tiles (images smaller than a tile mirrored "
                "out), maps averaged where tiles overlap, image score = highest tile score — "
                "defectlab.data.transforms.score_tiled"
            ),
        },
        "image_threshold": inspector.image_threshold,
        "pixel_threshold": inspector.pixel_threshold,
        "map_range": [low, high],
        "calibration": run.calibration,
        "check": check,
        "quantization": quantization,
    }
    atomic_write_text(out / METADATA_FILE, json.dumps(metadata, indent=2) + "\n")
    return {"out": str(out), **metadata}
