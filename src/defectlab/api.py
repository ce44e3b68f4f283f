"""The Python API: the same operations as the command line, returning Python objects.

>>> import defectlab.api as dl
>>> run = dl.train("pixelstats", "elpv", "runs/elpv")          # normal images only
>>> metrics = dl.evaluate("runs/elpv", "elpv", "runs/elpv/eval")  # held-out test split
>>> dl.predict("runs/elpv", "some/folder", "runs/elpv/pred")      # scores.csv, masks, overlays
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from defectlab import distributed as dist
from defectlab import registry
from defectlab.base import Model, Synthesizer
from defectlab.config import (
    CalibrationConfig,
    DataConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    parse_set_options,
)
from defectlab.data.io import (
    ImageReadError,
    broken_links,
    image_limits,
    read_image,
    read_mask,
    to_uint8,
    write_csv,
    write_png,
)
from defectlab.data.layouts import (
    DEFECT,
    NORMAL,
    LayoutOptions,
    load_dataset,
    synthetic_pairs,
)
from defectlab.data.loading import (
    LoadedImages,
    choose_channels,
    choose_image_size,
    list_input_images,
    report_failures,
)
from defectlab.data.run_data import dataset_split, load_images, load_training_images
from defectlab.data.splits import Split
from defectlab.data.transforms import resize_image, resize_map
from defectlab.errors import ConfigError, DataError
from defectlab.evaluate.calibration import calibrate, calibration_method, predict_loaded
from defectlab.evaluate.metrics import (
    EVAL_MAX_SIDE,
    PixelMetricAccumulator,
    compute_metrics,
    evaluation_mask,
    evaluation_size,
)
from defectlab.evaluate.report import ReportImage, write_report
from defectlab.evaluate.visualize import mask_outline
from defectlab.runs import (
    MODEL_FILE,
    TrainedRun,
    environment_info,
    load_run,
    make_model,
    predict_arrays,
    read_json,
    require_scorer,
    resolve_device,
    run_logger,
    save_checkpoint,
    seed_everything,
    trainable_class,
    write_json,
)
from defectlab.training import fit

#: the public API; run loading, scoring and a run's data live in lower layers and are
#: re-exported here so that ``import defectlab.api as dl`` reaches everything
__all__ = [
    "MODEL_FILE",
    "TrainedRun",
    "build_config",
    "calibration_method",
    "check_data",
    "dataset_split",
    "evaluate",
    "load_images",
    "load_run",
    "make_synthesizer",
    "native_pixel_metrics",
    "predict",
    "predict_arrays",
    "predict_loaded",
    "require_scorer",
    "resolve_auto_settings",
    "synthesis_gallery",
    "synthesize",
    "train",
    "write_pairs",
]

# --- configuration ---------------------------------------------------------------------------


def build_config(
    model: str,
    data: str | Path,
    *,
    category: str | None = None,
    image_size: int | None = None,
    device: str = "auto",
    seed: int | None = None,
    overrides: Sequence[str] = (),
) -> RunConfig:
    """Resolve defaults, named options and ``--set`` overrides into one validated config."""
    cls = trainable_class(model)
    sections = parse_set_options(list(overrides))
    data_cfg = apply_overrides(DataConfig(path=str(data)), sections.get("data", {}), "data.")
    if category is not None:
        data_cfg = apply_overrides(data_cfg, {"category": category}, "data.")
    if image_size is not None:
        data_cfg = apply_overrides(data_cfg, {"image_size": str(image_size)}, "data.")
    train_cfg = apply_overrides(TrainConfig(device=device), sections.get("train", {}), "train.")
    if seed is not None:
        train_cfg = apply_overrides(train_cfg, {"seed": str(seed)}, "train.")
    calibration = apply_overrides(
        CalibrationConfig(), sections.get("calibration", {}), "calibration."
    )
    model_cfg = apply_overrides(cls.Config(), sections.get("model", {}), "model.")
    return RunConfig(model, data_cfg, train_cfg, calibration, asdict(model_cfg))


#: input side for ``data.image_size=auto`` per pretrained backbone: EfficientNet-Lite0/1/2's
#: ImageNet input (224, 240, 260 px) at the nearest multiple of 32 the feature stages take
BACKBONE_WORKING_SIZE = {"lite0": 224, "lite1": 256, "lite2": 256}


def pretrained_backbone(config: RunConfig) -> str | None:
    """The pretrained backbone a run's model computes its features with (``lite0``, ...), or
    None for a model that learns from pixels: the backbone decides ``data.image_size=auto``."""
    settings = config.model_config
    if "features" in settings:  # deepsvdd: features=lite0|lite1|lite2|pixels
        value = settings["features"]
        return value if value in BACKBONE_WORKING_SIZE else None
    if settings.get("input") == "pixels":  # mlaae: input=pixels
        return None
    value = settings.get("backbone")
    return value if value in BACKBONE_WORKING_SIZE else None


def resolve_auto_settings(config: RunConfig, split: Split) -> RunConfig:
    """``config`` with its ``"auto"`` data settings decided from the split's training images,
    each recorded in ``config.resolved`` with the reason: ``data.channels`` (RGB when the
    images are colour, :func:`~defectlab.data.loading.choose_channels`), ``data.image_size``
    and ``data.tile`` (from the images' sizes and the model's backbone,
    :func:`~defectlab.data.loading.choose_image_size`)."""
    data, resolved = config.data, dict(config.resolved)
    paths = [s.path for s in split["train"]]
    if data.channels == "auto":
        choice = choose_channels(paths, workers=data.workers)
        data = replace(data, channels=choice.channels)
        resolved["data.channels"] = {"value": choice.channels, "reason": choice.reason}
    if data.image_size == "auto" or data.tile != "off":
        backbone = pretrained_backbone(config)
        sized = choose_image_size(
            paths,
            data.image_size,
            data.tile,
            BACKBONE_WORKING_SIZE[backbone] if backbone else None,
            config.model,
            workers=data.workers,
        )
        data = replace(data, image_size=sized.image_size, tile=sized.tile)
        if sized.size_reason:
            resolved["data.image_size"] = {"value": sized.image_size, "reason": sized.size_reason}
        if sized.tile_reason:
            resolved["data.tile"] = {"value": sized.tile, "reason": sized.tile_reason}
    if data.tile == "on" and trainable_class(config.model).learns_from_area_ratios:
        raise ConfigError(
            f"{config.model} learns one area ratio per image, not per tile: use data.tile=off"
        )
    return replace(config, data=data, resolved=resolved)


# --- prediction core -------------------------------------------------------------------------


def _weak_labels(net: Model, train: LoadedImages, data: DataConfig) -> dict[str, np.ndarray]:
    """Per-image area ratios and margins for models that learn from them, read from
    ``data.area_ratio_csv`` (rows without a margin get the model's ``area_margin``). Without
    a CSV the model derives them from the masks (the benchmark protocol), so every defect
    training image needs one."""
    if not net.learns_from_area_ratios:
        return {}
    if not data.area_ratio_csv:
        lacking = [s.path for s in train.samples if s.label == DEFECT and s.mask_path is None]
        if lacking:
            raise DataError(
                f"{lacking[0]}: {len(lacking)} defect training images have no mask to derive "
                "an area ratio from; give data.area_ratio_csv=LABELS.csv"
            )
        # the benchmark protocol: ratios from the masks, noisy ones drawn once per image
        return {"area_ratio": net.derive_area_ratios(train.masks)}
    from defectlab.data.area_ratio import read_area_ratio_csv

    table = {p.resolve(): v for p, v in read_area_ratio_csv(data.area_ratio_csv).items()}
    ratios, margins = [], []
    for sample in train.samples:
        entry = table.get(Path(sample.path).resolve())
        if entry is None and sample.label == NORMAL:
            entry = (0.0, None)  # a normal image has no defect area
        if entry is None:
            raise DataError(
                f"{data.area_ratio_csv}: no area ratio for training image {sample.path}"
            )
        ratios.append(entry[0])
        margins.append(net.config.area_margin if entry[1] is None else entry[1])
    return {
        "area_ratio": np.array(ratios, np.float32),
        "area_margin": np.array(margins, np.float32),
    }


def _with_defect_classes(config: RunConfig, split: Split) -> RunConfig:
    """Models that learn per defect type (``learns_defect_types``, e.g. maskgan) get the
    sorted defect types of the training defects as ``defect_classes`` unless set already, so
    the class list is part of the run's config and its checkpoint."""
    cls = trainable_class(config.model)
    if not cls.learns_defect_types or config.model_config.get("defect_classes"):
        return config
    types = tuple(sorted({s.defect_type for s in split["train_defect"]}))
    return replace(config, model_config={**config.model_config, "defect_classes": types})


def _defect_class_ids(net: Model, train: LoadedImages) -> dict[str, np.ndarray]:
    """Per-image index into the model's ``defect_classes`` (normal images: −1), as the
    ``defect_class`` batch entry, for models that learn per defect type."""
    if not net.learns_defect_types:
        return {}
    classes = list(net.config.defect_classes)
    ids = []
    for sample in train.samples:
        if sample.label != DEFECT:
            ids.append(-1)
        elif sample.defect_type in classes:
            ids.append(classes.index(sample.defect_type))
        else:
            raise DataError(
                f"{sample.path}: defect type {sample.defect_type!r} is not one of "
                f"{net.name}'s defect_classes {tuple(classes)}"
            )
    return {"defect_class": np.array(ids, np.float32)}


# --- train -----------------------------------------------------------------------------------


def train(
    model: str,
    data: str | Path,
    out: str | Path,
    *,
    category: str | None = None,
    image_size: int | None = None,
    device: str = "auto",
    seed: int | None = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    progress: bool = True,
    distributed: bool = False,
) -> TrainedRun:
    """Train a detector or segmenter into run directory ``out`` and calibrate its thresholds.

    With ``resume=True`` the stored config of ``out`` is used and training continues from
    ``out/checkpoints/last.pt``.

    With ``distributed=True`` this process is one of several started by ``torchrun``
    (:mod:`defectlab.distributed`): each trains on its share of every batch, rank 0 alone
    calibrates and writes the run directory, and every rank returns the same TrainedRun
    (rank 0's model and thresholds).
    """
    run_dir = Path(out)
    started = time.perf_counter()
    if resume:
        config = RunConfig.from_dict(read_json(run_dir / "config.json"))
        if config.model != model:
            raise ConfigError(f"{run_dir} trains {config.model!r}; cannot resume it as {model!r}")
        asked = build_config(
            model, data, category=category, image_size=image_size, seed=seed, overrides=overrides
        )
        _check_resume_arguments(run_dir, config, asked, category, image_size, seed, overrides)
    else:
        config = build_config(
            model,
            data,
            category=category,
            image_size=image_size,
            device=device,
            seed=seed,
            overrides=overrides,
        )
        if (run_dir / MODEL_FILE).exists() or (run_dir / "checkpoints" / "last.pt").exists():
            raise ConfigError(
                f"{run_dir} already holds a run; use a new --out folder (or --resume to continue)"
            )
    if not distributed:
        return _train_into(run_dir, config, resume=resume, progress=progress, started=started)
    context = dist.init_from_env(config.train.device)
    try:
        return _train_into(
            run_dir, config, resume=resume, progress=progress, started=started, context=context
        )
    finally:
        dist.shutdown(context)


def _check_resume_arguments(
    run_dir: Path,
    stored: RunConfig,
    asked: RunConfig,
    category: str | None,
    image_size: int | None,
    seed: int | None,
    overrides: Sequence[str],
) -> None:
    """``--resume`` continues a run as it was started: refuse, naming them, the arguments
    given that contradict its stored config (rather than ignore them and exit 0)."""
    compared = [("data", "data.path")]
    compared += [("data", "data.category")] if category is not None else []
    compared += [("image size", "data.image_size")] if image_size is not None else []
    compared += [("seed", "train.seed")] if seed is not None else []
    for section, values in parse_set_options(list(overrides)).items():
        compared += [(f"--set {section}.{key}", f"{section}.{key}") for key in values]
    differing = []
    for label, key in compared:
        section, name = key.split(".", 1)
        if section == "model":
            was, now = stored.model_config.get(name), asked.model_config.get(name)
        else:
            was, now = (getattr(getattr(c, section), name) for c in (stored, asked))
        was, now = (list(v) if isinstance(v, tuple) else v for v in (was, now))  # as in JSON
        if key == "data.path":
            same = was == now or Path(str(was)).resolve() == Path(str(now)).resolve()
        else:
            same = was == now
        if not same:
            differing.append(f"{label} {now} (the run has {was})")
    if differing:
        raise ConfigError(
            f"{run_dir}: --resume continues the run as it was started, but "
            f"{'; '.join(differing)}; drop these arguments, or train a new run with another --out"
        )


def _quiet_logger() -> logging.Logger:
    """The log of ranks other than 0: rank 0 alone writes ``log.txt``."""
    logger = logging.getLogger("defectlab.run.quiet")
    logger.disabled = True
    return logger


def _train_into(
    run_dir: Path,
    config: RunConfig,
    *,
    resume: bool,
    progress: bool,
    started: float,
    context: dist.Context | None = None,
) -> TrainedRun:
    """Load the data, train, calibrate and write the run; in a distributed run
    (``context``) every rank trains and rank 0 alone calibrates and writes files."""
    main = context is None or context.rank == 0
    progress = progress and main
    torch_device = context.device if context is not None else resolve_device(config.train.device)
    seed_everything(config.train.seed)
    log = run_logger(run_dir) if main else _quiet_logger()
    log.info("train %s on %s (resume=%s)", config.model, config.data.path, resume)

    dataset, split = dataset_split(config.data)
    if resume:  # the stored split is the one the run started with, whatever changed since
        split = Split.load(run_dir / "split.json")
    else:
        config = resolve_auto_settings(_with_defect_classes(config, split), split)
        for key, choice in config.resolved.items():
            log.info("%s=auto → %s: %s", key, choice["value"], choice["reason"])
        if main:
            write_json(run_dir / "config.json", config.to_dict())
            split.save(run_dir / "split.json")
    processes = {"world_size": context.world_size, "backend": context.backend} if context else {}
    if main:
        write_json(run_dir / "environment.json", environment_info(torch_device) | processes)

    net = make_model(config, torch_device)
    method = calibration_method(net, config.calibration)  # a config error before any loading
    train_samples = split["train"]
    learns_masks = net.family == "segmenter" or net.trains_on_defects
    if learns_masks:
        train_samples = train_samples + split["train_defect"]
    if config.data.extra_pairs and not learns_masks:
        raise ConfigError(
            f"{config.model} trains on normal images only: data.extra_pairs (synthetic defect "
            "pairs) is for segmenters and other models that learn from defect masks"
        )
    # synthetic pairs join training only; the split (and so test/val) never sees them
    for folder in config.data.extra_pairs:
        train_samples = train_samples + synthetic_pairs(folder)
    if net.trains_on_defects and not split["train_defect"]:
        raise ConfigError(
            f"{config.model} learns from defect examples too: set data.defects_per_class "
            "to hold out K defect images per type for training"
        )
    train_data = load_training_images(train_samples, config.data, "loading train images", progress)
    val_data = load_images(split["val"], config.data, "loading validation images", progress)
    val_defect = None
    if method == "f1":
        val_defect = load_images(
            split["val_defect"], config.data, "loading validation defects", progress
        )
    weak_labels = _weak_labels(net, train_data, config.data)
    history = fit(
        net,
        train_data.images,
        masks=train_data.masks,
        labels=train_data.labels,
        extras=weak_labels | _defect_class_ids(net, train_data),
        run_dir=run_dir,
        batch_size=config.train.batch_size,
        seed=config.train.seed,
        checkpoint_every=config.train.checkpoint_every,
        resume=resume,
        progress=progress,
        distributed=context is not None,
    )
    # a synthesizer scores nothing: it has no thresholds to calibrate; rank 0 calibrates
    calibration: dict[str, Any] = (
        {}
        if net.family == "synthesizer" or not main
        else calibrate(
            net,
            val_data,
            config.calibration,
            method,
            val_defect,
            (train_data.images, weak_labels["area_ratio"]) if weak_labels else None,
            config.data,
        )
    )
    if context is not None:
        calibration = dist.broadcast_object(calibration)
    if main:
        tiled = config.data.tile == "on"
        save_checkpoint(
            run_dir / MODEL_FILE, net, calibration=calibration, run_config=config.to_dict()
        )
        write_json(run_dir / "calibration.json", calibration)
        last_losses = {
            k: v for k, v in (history[-1] if history else {}).items() if k not in ("epoch", "step")
        }
        metrics = {
            "model": config.model,
            "dataset": dataset.summary(),
            "split": split.name,
            "n_train": (
                len({s.path for s in train_data.samples}) if tiled else len(train_data.samples)
            ),
            "n_train_tiles": len(train_data.images) if tiled else None,
            "n_train_synthetic": sum(
                s.defect_type.startswith("synthetic:") for s in train_data.samples
            ),
            "n_val": len(val_data.samples),
            "skipped_files": [f"{p}: {r}" for p, r in train_data.failures + val_data.failures],
            "final_losses": last_losses,
            "calibration": calibration,
            "train_seconds": round(time.perf_counter() - started, 2),
            **processes,
        }
        write_json(run_dir / "metrics.json", metrics)
        log.info("trained in %.1f s; calibration %s", metrics["train_seconds"], calibration)
    if context is not None:  # the run directory is complete when any rank returns
        dist.barrier()
    return TrainedRun(run_dir, config, net, calibration)


# --- predict ---------------------------------------------------------------------------------


def predict(
    run_dir: str | Path,
    input_path: str | Path,
    out: str | Path,
    *,
    device: str = "auto",
    backend: str = "torch",
    tile: bool | None = None,
    batch_size: int = 16,
    workers: int = 2,
    overlays: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Inspect an image file or a folder with a trained run (``backend="torch"``) or its ONNX
    export (``backend="onnx"``): ``results.jsonl``, ``scores.csv``, a mask (and overlay) PNG
    per image. Streams with bounded memory and resumes an interrupted call; see
    :func:`defectlab.deploy.batch.inspect_folder`. ``tile=None`` scores as the run was
    trained (stitched native-resolution tiles when it trained on tiles)."""
    from defectlab.deploy.backends import open_inspector
    from defectlab.deploy.batch import inspect_folder

    return inspect_folder(
        open_inspector(run_dir, backend, device),
        input_path,
        out,
        tile=tile,
        batch_size=batch_size,
        workers=workers,
        overlays=overlays,
        progress=progress,
    )


# --- evaluate --------------------------------------------------------------------------------

#: how ``evaluate`` computes its pixel metrics (written to metrics.json)
PIXEL_METRICS_RULE = (
    f"each mask's native grid, long side capped at {EVAL_MAX_SIDE} px (area down-scaling, "
    "a pixel is defect when most of it was); maps resized bilinearly to that grid; the same "
    "pixels for every model and image size"
)


def native_pixel_metrics(
    loaded: LoadedImages,
    maps: np.ndarray,
    has_mask: np.ndarray,
    pixel_threshold: float | None,
    mask_threshold: int = 127,
    native_maps: Sequence[np.ndarray] | None = None,
) -> dict[str, float | None]:
    """Pixel AUROC, AUPRO and Dice of model-resolution ``maps`` against the masks at their
    native resolution (:func:`~defectlab.evaluate.metrics.evaluation_size`), one image at a
    time: each mask is read again from its file and each map resized bilinearly to it, so
    only one full-resolution image is held at once. Normal images count as all normal,
    defect images without a mask are left out. ``native_maps`` (one per image, any size:
    stitched tile maps) are used instead of ``maps`` where given."""
    accumulator = PixelMetricAccumulator.for_maps(maps, pixel_threshold)
    source = maps if native_maps is None else native_maps
    for i, sample in enumerate(loaded.samples):
        if sample.label == DEFECT and not has_mask[i]:
            continue
        if sample.label == DEFECT:
            mask = evaluation_mask(read_mask(sample.mask_path, mask_threshold))
        else:
            mask = np.zeros(evaluation_size(loaded.original_sizes[i]), bool)
        accumulator.add(mask, resize_map(source[i], mask.shape))
    return accumulator.result()


def evaluate(
    run_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    category: str | None = None,
    device: str = "auto",
    include_uncertain: bool = False,
    progress: bool = True,
    galleries: list[tuple[str, list[np.ndarray]]] | None = None,
    on_predictions: Callable[[LoadedImages, np.ndarray, np.ndarray], None] | None = None,
) -> dict[str, Any]:
    """Evaluate on the test split of ``data`` (never on images the run trained or calibrated
    on); write ``metrics.json``, ``scores.csv`` and ``report.html`` into ``out``.

    ``on_predictions(loaded, scores, maps)`` is called once with the loaded test images and
    their predictions, so a caller that needs more metrics (benchmarks) need not predict
    the same images again."""
    run = load_run(run_dir, device)
    require_scorer(run)
    out = Path(out)
    data_cfg = apply_overrides(run.config.data, {"path": str(data)}, "data.")
    if category is not None:
        data_cfg = apply_overrides(data_cfg, {"category": category}, "data.")
    if include_uncertain:
        data_cfg = apply_overrides(data_cfg, {"include_uncertain": "true"}, "data.")
    dataset, split = dataset_split(data_cfg)
    trained_split = Split.load(run.run_dir / "split.json")
    same_data = replace(data_cfg, path="") == replace(run.config.data, path="")
    if same_data and trained_split.root == str(dataset.root):
        split = trained_split  # exactly the test images written down at training time
    seen = trained_split.seen_in_training()
    test = [s for s in split["test"] if s.label in (NORMAL, DEFECT)]
    leaked = [s for s in test if str(s.path) in seen]
    if leaked:
        raise DataError(
            f"{leaked[0].path}: {len(leaked)} test images were used to train or calibrate "
            f"{run.run_dir}; evaluate with the split the run was trained with"
        )
    if not any(s.label == DEFECT for s in test) or not any(s.label == NORMAL for s in test):
        raise DataError(f"{data_cfg.path}: test split needs both normal and defect images")
    loaded = load_images(test, data_cfg, "loading test images", progress)
    predict_started = time.perf_counter()
    scores, maps, native_maps = predict_loaded(
        run.model, loaded, data_cfg, progress=progress, native_maps=True
    )
    predict_seconds = time.perf_counter() - predict_started
    if on_predictions is not None:
        on_predictions(loaded, scores, maps)
    labels = loaded.labels
    has_mask = np.array([s.mask_path is not None or s.label == NORMAL for s in loaded.samples])
    any_masks = bool(has_mask[labels == DEFECT].any())
    metrics = compute_metrics(
        labels,
        scores,
        image_threshold=run.image_threshold,
        masks=loaded.masks if any_masks else None,
        maps=maps if any_masks else None,
        pixel_threshold=run.pixel_threshold,
        has_mask=has_mask,
    )
    if any_masks:
        model_grid = {f"{k}_model_resolution": metrics[k] for k in ("pixel_auroc", "aupro", "dice")}
        metrics |= native_pixel_metrics(
            loaded, maps, has_mask, run.pixel_threshold, data_cfg.mask_threshold, native_maps
        )
        metrics |= model_grid
    metrics |= {
        "pixel_metrics_resolution": PIXEL_METRICS_RULE if any_masks else None,
        "split": split.name,
        "data": str(data_cfg.path),
        "model": run.config.model,
        "run": str(run.run_dir),
        "n_skipped": len(loaded.failures),
        "tile": data_cfg.tile,
        # model time (tiled runs: with decoding each image again), at the run's image size
        "images_per_second": round(len(scores) / predict_seconds, 2) if predict_seconds else None,
    }
    write_json(out / "metrics.json", metrics)

    write_csv(
        out / "scores.csv",
        [
            {
                "path": s.path,
                "label": s.label,
                "defect_type": s.defect_type,
                "score": f"{score:.6g}",
                "is_defect": int(score >= run.image_threshold),
            }
            for s, score in zip(loaded.samples, scores, strict=True)
        ],
    )

    items = [
        ReportImage(
            name=s.path.name if s.label == NORMAL else f"{s.defect_type}/{s.path.name}",
            image=loaded.images[i],
            heat=maps[i],
            predicted_mask=maps[i] >= run.pixel_threshold,
            true_mask=loaded.masks[i] if has_mask[i] and s.label == DEFECT else None,
            score=float(scores[i]),
            label=s.label,
        )
        for i, s in enumerate(loaded.samples)
    ]
    write_report(
        out / "report.html",
        title=f"defectlab: {run.config.model} on {Path(str(data_cfg.path)).name}",
        metrics=metrics,
        labels=labels,
        scores=scores,
        image_threshold=run.image_threshold,
        items=items,
        heat_range=run.map_range,
        info={
            "run": str(run.run_dir),
            "model": run.config.model,
            "data": str(data_cfg.path),
            "split": split.name,
            "image size": run.config.data.image_size,
            "tiling": (
                f"on: native-resolution {run.config.data.image_size} px tiles, maps stitched"
                if data_cfg.tile == "on"
                else "off"
            ),
            "defectlab": environment_info()["defectlab"],
            "torch": torch.__version__,
        },
        galleries=galleries,
    )
    return metrics


# --- data check ------------------------------------------------------------------------------


def check_data(
    path: str | Path,
    *,
    layout: str = "auto",
    category: str | None = None,
    mask_threshold: int = 127,
    workers: int = 2,
    progress: bool = True,
    max_pixels: int = DataConfig.max_pixels,
    min_side: int = DataConfig.min_side,
) -> dict[str, Any]:
    """Detect the layout, count images and masks, and read every file to find bad ones:
    undecodable, over the pixel budget (never decoded), smaller than ``min_side`` (training
    would skip them), masks that do not fit, and broken or looping symbolic links."""
    dataset = load_dataset(path, layout, LayoutOptions(category=category))
    problems: list[tuple[str, str]] = []

    def check(sample: Any) -> list[tuple[str, str]]:
        try:
            shape = read_image(sample.path).shape[:2]
        except ImageReadError as exc:
            return [(exc.path, exc.reason)]
        if min(shape) < min_side:
            return [
                (
                    str(sample.path),
                    f"image is {shape[1]}x{shape[0]}, below the minimum side of {min_side} "
                    "pixels (data.min_side): training and evaluation skip it",
                )
            ]
        if sample.mask_path is None:
            return (
                [] if sample.label != DEFECT else [(str(sample.path), "defect image has no mask")]
            )
        try:
            mask = read_mask(sample.mask_path, mask_threshold)
        except ImageReadError as exc:
            return [(exc.path, f"mask: {exc.reason}")]
        if mask.shape != shape:
            return [
                (
                    str(sample.mask_path),
                    f"mask is {mask.shape[1]}x{mask.shape[0]}, image is {shape[1]}x{shape[0]}",
                )
            ]
        if not mask.any():
            return [(str(sample.mask_path), "mask is empty (no pixel above the threshold)")]
        return []

    with (
        image_limits(max_pixels=max_pixels),
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
    ):
        for found in tqdm(
            pool.map(check, dataset.samples),
            total=len(dataset.samples),
            desc="checking files",
            disable=not progress,
            leave=False,
            file=sys.stderr,
        ):
            problems += found
    problems += broken_links(dataset.root)
    summary = dataset.summary()
    summary["problems"] = [f"{p}: {r}" for p, r in problems]
    return summary


# --- synthesize ------------------------------------------------------------------------------


def _images_for_synthesis(
    folder: str | Path, channels: int, limit: int, kind: str = "normal"
) -> list[tuple[Path, np.ndarray]]:
    """Up to ``limit`` images of a plain folder, or the normal (or defect) images of a
    recognised dataset layout (sorted by path), read at native resolution."""
    path = Path(folder)
    try:
        dataset = load_dataset(path)
        paths = [s.path for s in (dataset.normal if kind == "normal" else dataset.defect)]
    except DataError:
        paths = list_input_images(path)
    paths = sorted(paths)[:limit]
    images, failures = [], []
    for p in paths:
        try:
            images.append((p, read_image(p, channels)))
        except ImageReadError as exc:
            failures.append((exc.path, exc.reason))
    report_failures(failures, len(paths))
    if not images:
        raise DataError(f"{path}: no readable {kind} images")
    return images


def make_synthesizer(
    method: str, run: str | Path | None = None, overrides: Sequence[str] = ()
) -> Synthesizer:
    cls = registry.get(method, "synthesizer")
    sections = parse_set_options(list(overrides))
    settings = sections.pop("model", {})
    if sections:  # data., train. or calibration. keys: synthesis reads none of them
        section, names = next(iter(sections.items()))
        valid = cls.synthesis_fields if cls.needs_training else [f.name for f in fields(cls.Config)]
        raise ConfigError(
            f"--set {section + '.' + next(iter(names))!r}: synth takes no {section} settings; "
            f"{method} settings: {', '.join(valid)} (size and channels: --image-size, --channels)"
        )
    if cls.needs_training:
        if run is None:
            raise ConfigError(f"synthesizer {method!r} is learned: give its trained --run folder")
        learned = cls.from_run(Path(run))
        if settings:  # sampling settings only (detail mode, mask rule); networks stay as trained
            learned.configure_synthesis(settings)
        return learned
    return cls(apply_overrides(cls.Config(), settings, ""))


def synthesize(
    method: str,
    normal: str | Path,
    out: str | Path,
    n: int,
    *,
    run: str | Path | None = None,
    defects: str | Path | None = None,
    seed: int = 0,
    image_size: int | None = None,
    channels: int = 1,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``n`` synthetic defect images, their exact masks and ``manifest.csv`` to ``out``."""
    if n < 1:
        raise ConfigError(f"--n must be at least 1, got {n}")
    synthesizer = make_synthesizer(method, run, overrides)
    if defects is not None and not synthesizer.needs_training:
        raise ConfigError(f"{method} paints defects procedurally and takes no --defects examples")
    sources = _images_for_synthesis(normal, channels, limit=n)
    if defects is not None:
        examples = _images_for_synthesis(defects, channels, limit=10_000, kind="defect")
        synthesizer.use_defect_examples([img for _, img in examples])
    write_pairs(synthesizer, sources, out, n, seed=seed, image_size=image_size, progress=progress)
    write_json(
        Path(out) / "synth_config.json",
        {
            "method": method,
            "n": n,
            "seed": seed,
            "normal": str(normal),
            "image_size": image_size,
            "config": asdict(synthesizer.config),
            "environment": environment_info(),
        },
    )
    return {"n": n, "out": str(out)}


def write_pairs(
    synthesizer: Synthesizer,
    sources: Sequence[tuple[Path, np.ndarray]],
    out: str | Path,
    n: int,
    *,
    seed: int = 0,
    image_size: int | None = None,
    progress: bool = False,
) -> None:
    """Write ``n`` samples of ``synthesizer`` painted on ``sources`` ((path, image) pairs,
    resized to ``image_size`` when given) as ``defectlab synth`` writes them: ``images/``,
    ``masks/`` and ``manifest.csv``, which ``data.extra_pairs`` reads back. Synthesizers
    built in code (copy-paste from real defects) are written the same way."""
    images = [resize_image(img, image_size) if image_size else img for _, img in sources]
    out = Path(out)
    rows = []
    for i, (source, sample) in tqdm(
        enumerate(synthesizer.generate(images, n, seed)),
        total=n,
        desc=f"synth {synthesizer.name}",
        disable=not progress,
        file=sys.stderr,
    ):
        image_name, mask_name = f"images/{i:06d}.png", f"masks/{i:06d}.png"
        write_png(out / image_name, to_uint8(sample.image))
        write_png(out / mask_name, sample.mask.astype(np.uint8) * 255)
        rows.append(
            {
                "index": i,
                "image": image_name,
                "mask": mask_name,
                "source": str(sources[source][0]),
                "seed": seed,
                **sample.record,
            }
        )
    write_csv(out / "manifest.csv", rows)


def synthesis_gallery(
    method: str, images: Sequence[np.ndarray], n: int, seed: int = 0
) -> list[np.ndarray]:
    """RGB uint8 thumbnails of synthetic defects with their mask outlined, for reports."""
    synthesizer = make_synthesizer(method)
    return [
        mask_outline(sample.image, sample.mask)
        for _, sample in synthesizer.generate(list(images), n, seed)
    ]
