"""Peer benchmark: anomalib models on exactly the split of a defectlab run, scored by defectlab.

Reads ``RUN_DIR/split.json`` of a defectlab run, trains each anomalib model with anomalib's own
``Engine`` and ``Folder`` datamodule on the normal ``train`` images (the ``val`` normals are its
validation set), predicts the ``val`` normals to calibrate thresholds the way defectlab does
(0.99 quantile of image scores, 0.999 quantile of map pixels) and the ``test`` images with
label 0 or 1, and computes the metrics with defectlab's own ``evaluate/metrics.py``, so the
rows line up with ``benchmarks/detection.py``. anomalib's post-processor is switched off (its
normalisation clamps scores to [0, 1], which creates ties), so scores and maps are raw.

Runs in the anomalib venv (``benchmarks/anomalib/setup.sh``), on CPU, offline:

    benchmarks/anomalib/.venv/bin/python benchmarks/anomalib_peer.py \
        --split RUN_DIR/split.json --models draem ganomaly --image-size 128 \
        --out runs/anomalib-peer [--epochs N] [--max-train N]

Each model runs in its own process (peak RAM is that model's own); a model that fails is
reported as ``FAILED: model: reason`` and the others still run. Rows go to stdout as JSON,
to ``OUT/results.json``, and as a final aligned table.

**Patchcore, Padim and Fastflow on defectlab's backbone**: these feature models get timm's
``tf_efficientnet_lite0`` with defectlab's own ImageNet Lite0 weights loaded into it
(``benchmarks/lite0_timm.py`` maps the keys; nothing is downloaded: ``pre_trained=False``,
``HF_HUB_OFFLINE=1``), the Lite0 blocks defectlab's detectors use (its last stride-8 and
stride-16 blocks = anomalib layers ``blocks.2`` and ``blocks.4``) and the Lite models' input
normalisation ``(x·255 − 127) / 128`` instead of the ImageNet mean/std. Everything else is
anomalib's default for the model (Patchcore: coreset ratio 0.1, 9 neighbours; Padim: all 152
feature channels, since anomalib has no ``n_features`` default for this backbone). Check the
mapping first (defectlab's features of one real image, computed in defectlab's venv, against
timm's, through anomalib's own feature extractor)::

    benchmarks/anomalib/.venv/bin/python benchmarks/anomalib_peer.py --check-mapping \
        --split RUN_DIR/split.json

Pixel metrics follow ``defectlab evaluate``: on each mask's native grid (long side capped at
512 px), maps resized bilinearly to it; the model-grid values are kept as
``*_model_resolution``. ``images_per_second`` is model time on ``--threads`` threads over the
first ``--speed-images`` test images (default 128), already decoded at the model size (as
defectlab's ``evaluate`` counts it);
``images_per_second_end_to_end`` is anomalib's ``Engine.predict`` with decoding.
``--defectlab`` also evaluates the defectlab run whose split is used, with defectlab's own
``evaluate`` in defectlab's venv on as many threads, as the first row.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lite0_timm
from _common import add_write_docs, docs_key, invocation, markdown_table, write_section

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
METRICS_FILE = REPO / "src" / "defectlab" / "evaluate" / "metrics.py"
DEFECTLAB_PYTHON = REPO / ".venv" / "bin" / "python"
KEYS = ("image_auroc", "image_ap", "pixel_auroc", "aupro", "dice", "f1")
MODEL_GRID_KEYS = ("pixel_auroc", "aupro", "dice")
MODELS = ("draem", "ganomaly", "patchcore", "padim", "fastflow")
#: the models that take a feature backbone: they get defectlab's Lite0 (see the docstring)
LITE0_MODELS = ("patchcore", "padim", "fastflow")
# CPU defaults that keep each model's training near 15 min at 128 px on 2 busy cores. Draem
# (97 M parameters, ~100 GFLOP per 128 px image forward) trains at ~9 s per image there, so
# even one epoch on ~600 images takes over an hour: by default it sees the first 96 training
# normals for one epoch. --epochs / --max-train override these for every model.
# Patchcore and Padim fit in one pass (anomalib trains them for one epoch); Fastflow's
# anomalib default is 500 epochs, far beyond CPU: 3.
DEFAULT_EPOCHS = {"draem": 1, "ganomaly": 3, "patchcore": 1, "padim": 1, "fastflow": 3}
DEFAULT_MAX_TRAIN = {"draem": 96, "ganomaly": None, "patchcore": None, "padim": None}
DEFAULT_MAX_TRAIN |= {"fastflow": None}
#: mapping check: largest allowed absolute difference of a feature value
MAPPING_TOLERANCE = 1e-4
IMAGE_QUANTILE = 0.99  # defectlab's CalibrationConfig defaults
PIXEL_QUANTILE = 0.999
MASK_THRESHOLD = 127


def load_metrics():
    """defectlab's metrics module (numpy + cv2 only), loaded from its file so that the
    defectlab package (and whatever torch it expects) is never imported here."""
    spec = importlib.util.spec_from_file_location("defectlab_metrics", METRICS_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- data ------------------------------------------------------------------------------------


def read_split(path: Path, max_train: int | None, max_test: int | None) -> dict:
    """Train and val normals and the labelled (0/1) test samples of a defectlab split file."""
    split = json.loads(path.read_text(encoding="utf-8"))
    parts = split["parts"]
    train = [s for s in parts["train"] if s["label"] == 0]
    val = [s for s in parts.get("val", []) if s["label"] == 0]
    test = [s for s in parts["test"] if s["label"] in (0, 1)]  # ELPV: drop uncertain cells
    if max_train:
        train = train[:max_train]
    if max_test:  # development only: the first normals and defects, in split order
        normal = [s for s in test if s["label"] == 0][: max_test // 2]
        defect = [s for s in test if s["label"] == 1][: max_test - len(normal)]
        keep = {id(s) for s in normal + defect}
        test = [s for s in test if id(s) in keep]
    if not train or not val:
        raise ValueError(f"{path}: the split needs normal train and val images")
    for sample in train + val + test:
        for key in ("path", "mask_path"):
            file = sample.get(key)
            if file and not (os.path.isfile(file) and os.access(file, os.R_OK)):
                raise FileNotFoundError(f"{file}: not a readable file ({key} in {path})")
    return {
        "name": split["name"],
        "dataset": split.get("layout") or Path(split.get("root", "")).name,
        "train": train,
        "val": val,
        "test": test,
    }


def link_images(samples: list[dict], folder: Path) -> None:
    """Symlink the samples' images into ``folder`` under unique names, in split order."""
    folder.mkdir(parents=True)
    for i, sample in enumerate(samples):
        source = Path(sample["path"])
        (folder / f"{i:05d}_{source.name}").symlink_to(source.resolve())


def read_masks(samples: list[dict], size: int):
    """Masks as defectlab reads them: value > 127 (8-bit scale) is defect, any channel of a
    colour mask, resized with nearest neighbour; all zero for images without a mask."""
    import cv2
    import numpy as np

    masks = np.zeros((len(samples), size, size), bool)
    for i, sample in enumerate(samples):
        if not sample.get("mask_path"):
            continue
        array = cv2.imdecode(np.fromfile(sample["mask_path"], np.uint8), cv2.IMREAD_UNCHANGED)
        if array is None:
            raise ValueError(f"{sample['mask_path']}: not a decodable mask")
        if array.ndim == 3:
            array = array.max(axis=2)
        scale = 257 if array.dtype == np.uint16 else 1
        binary = (array > MASK_THRESHOLD * scale).astype(np.uint8)
        masks[i] = cv2.resize(binary, (size, size), interpolation=cv2.INTER_NEAREST) > 0
    return masks


# --- one model, in this process --------------------------------------------------------------


def lite0_pre_processor(size: int):
    """anomalib's pre-processing (resize, antialiased) with the Lite models' normalisation."""
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    mean, std = [lite0_timm.INPUT_MEAN] * 3, [lite0_timm.INPUT_STD] * 3
    return PreProcessor(
        transform=Compose([Resize((size, size), antialias=True), Normalize(mean=mean, std=std)])
    )


def lite0_extractor(model):
    """The timm network inside an anomalib feature model's feature extractor."""
    inner = model.model.feature_extractor
    return getattr(inner, "feature_extractor", inner)


def build_model(name: str, size: int, work: Path):
    from anomalib.models import Draem, Fastflow, Ganomaly, Padim, Patchcore
    from anomalib.post_processing import PostProcessor

    # Raw scores and maps: our thresholds come from the val normals, as in defectlab.
    common = {
        "post_processor": PostProcessor(enable_normalization=False, enable_thresholding=False),
        "evaluator": False,
        "visualizer": False,
    }
    if name == "draem":
        # An existing empty folder: Perlin-noise anomalies only, and no DTD download attempt.
        dtd = work / "no-dtd"
        dtd.mkdir()
        pre = Draem.configure_pre_processor(image_size=(size, size))
        return Draem(dtd_dir=dtd, pre_processor=pre, **common)
    if name == "ganomaly":
        pre = Ganomaly.configure_pre_processor(image_size=(size, size))
        return Ganomaly(pre_processor=pre, **common)
    if name in LITE0_MODELS:
        # timm's Lite0 without its own weights (nothing is downloaded), then defectlab's
        lite = {"backbone": lite0_timm.TIMM_NAME, "pre_trained": False}
        lite |= {"pre_processor": lite0_pre_processor(size), **common}
        layers = list(lite0_timm.ANOMALIB_LAYERS)
        if name == "patchcore":
            model = Patchcore(layers=layers, **lite)
        elif name == "padim":
            # anomalib has no n_features default for this backbone: keep all channels
            model = Padim(layers=layers, n_features=lite0_timm.FEATURE_CHANNELS, **lite)
        else:  # anomalib 2.7's Fastflow accepts resnet18, wide_resnet50_2, cait and deit only
            model = Fastflow(**lite)
        counts = lite0_timm.load_into(lite0_extractor(model))
        print(f"{name}: defectlab's Lite0 weights loaded ({counts})", file=sys.stderr)
        return model
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def collect(predictions: list, size: int) -> tuple[dict, dict]:
    """Image scores and anomaly maps (resized to ``size`` if needed) by resolved image path."""
    import cv2
    import numpy as np

    scores, maps = {}, {}
    for batch in predictions:
        batch_scores = batch.pred_score.detach().float().reshape(-1).cpu().numpy()
        batch_maps = None
        if getattr(batch, "anomaly_map", None) is not None:
            batch_maps = batch.anomaly_map.detach().float().cpu().numpy()
            batch_maps = batch_maps.reshape(len(batch_scores), *batch_maps.shape[-2:])
        for i, image_path in enumerate(batch.image_path):
            key = os.path.realpath(image_path)
            scores[key] = float(batch_scores[i])
            if batch_maps is not None:
                heat = batch_maps[i]
                if heat.shape != (size, size):
                    heat = cv2.resize(heat, (size, size), interpolation=cv2.INTER_LINEAR)
                maps[key] = heat.astype(np.float32)
    return scores, maps


def gather(samples: list[dict], scores: dict, maps: dict):
    import numpy as np

    keys = [os.path.realpath(s["path"]) for s in samples]
    missing = [k for k in keys if k not in scores]
    if missing:
        raise RuntimeError(f"anomalib returned no prediction for {len(missing)} images")
    score_array = np.array([scores[k] for k in keys], np.float64)
    map_array = np.stack([maps[k] for k in keys]) if maps else None
    return score_array, map_array


def native_pixel_metrics(metrics, samples: list[dict], maps, pixel_threshold: float) -> dict:
    """Pixel AUROC, AUPRO and Dice as ``defectlab evaluate`` computes them: each mask on its
    native grid (long side capped at ``metrics.EVAL_MAX_SIDE``), the model-grid map resized
    bilinearly to it; normal images all normal, defect images without a mask left out."""
    import cv2
    import numpy as np
    from PIL import Image

    accumulator = metrics.PixelMetricAccumulator.for_maps(maps, pixel_threshold)
    for sample, heat in zip(samples, maps, strict=True):
        if sample["label"] == 1 and not sample.get("mask_path"):
            continue
        if sample["label"] == 1:
            array = cv2.imdecode(np.fromfile(sample["mask_path"], np.uint8), cv2.IMREAD_UNCHANGED)
            if array.ndim == 3:
                array = array.max(axis=2)
            scale = 257 if array.dtype == np.uint16 else 1
            mask = metrics.evaluation_mask(array > MASK_THRESHOLD * scale)
        else:
            with Image.open(sample["path"]) as image:
                width, height = image.size
            mask = np.zeros(metrics.evaluation_size((height, width)), bool)
        h, w = mask.shape
        resized = cv2.resize(heat.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        accumulator.add(mask, resized)
    result = accumulator.result()
    return {key: result[key] for key in MODEL_GRID_KEYS}


def decoded_images(samples: list[dict], size: int):
    """The images (N, 3, size, size) in [0, 1], decoded and resized as defectlab loads them
    (area averaging when shrinking, bilinear when growing; grey replicated to 3 channels)."""
    import cv2
    import numpy as np
    import torch

    out = np.empty((len(samples), 3, size, size), np.float32)
    for i, sample in enumerate(samples):
        image = cv2.cvtColor(
            cv2.imdecode(np.fromfile(sample["path"], np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
        )
        shrink = size * size < image.shape[0] * image.shape[1]
        method = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        image = cv2.resize(image, (size, size), interpolation=method)
        out[i] = image.transpose(2, 0, 1).astype(np.float32) / 255.0
    return torch.from_numpy(out)


def model_images_per_second(model, images, batch_size: int) -> float:
    """Images per second of the model's forward (its pre-processing, network and
    post-processing) on already decoded images, after one warm-up batch."""
    import torch

    model.eval()
    with torch.inference_mode():
        model(images[:batch_size])
        started = time.perf_counter()
        for batch in images.split(batch_size):
            model(batch)
        seconds = time.perf_counter() - started
    return len(images) / seconds


def max_train_for(values: list[str] | None, model: str) -> int | None:
    """The ``--max-train`` value (``N`` or ``MODEL=N``, the last that applies) for ``model``;
    None when none applies."""
    found = None
    for value in values or []:
        name, _, number = value.rpartition("=")
        if name in ("", model):
            found = int(number)
    return found


def run_one(args: argparse.Namespace) -> dict:
    """Train, calibrate and evaluate one anomalib model in this process."""
    import numpy as np
    import torch
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    torch.set_num_threads(args.threads)
    metrics = load_metrics()
    name = args.one
    epochs = args.epochs or DEFAULT_EPOCHS[name]
    size = args.image_size
    given = max_train_for(args.max_train, name)
    max_train = DEFAULT_MAX_TRAIN[name] if given is None else given or None
    data = read_split(args.split, max_train, args.max_test)
    seed_everything(args.seed, workers=True)

    # The driver passes a folder inside its own temporary directory, which it removes even
    # when this process has to be killed.
    if args.work_dir:
        work = args.work_dir
        work.mkdir(parents=True)
    else:
        work = Path(tempfile.mkdtemp(prefix=f"anomalib-peer-{name}-"))
    try:
        link_images(data["train"], work / "train" / "good")
        link_images(data["val"], work / "val" / "good")
        link_images([s for s in data["test"] if s["label"] == 0], work / "test" / "good")
        link_images([s for s in data["test"] if s["label"] == 1], work / "test" / "defect")
        loader_args = {
            "train_batch_size": args.batch_size,
            "eval_batch_size": args.batch_size,
            "num_workers": args.workers,
            "seed": args.seed,
        }
        # Train on train/good; the "test" (= validation) set of this datamodule is the val
        # normals, predicted after training for the thresholds. Validation during fit is off
        # (limit_val_batches=0): with anomalib's normalisation and thresholding disabled
        # neither model uses it, and for Draem it would cost minutes per epoch on CPU.
        fit_data = Folder(
            name=f"{data['dataset']}-fit",
            root=work,
            normal_dir="train/good",
            normal_test_dir="val/good",
            test_split_mode="from_dir",
            val_split_mode="same_as_test",
            **loader_args,
        )
        test_data = Folder(
            name=f"{data['dataset']}-test",
            root=work,
            normal_dir="train/good",
            normal_test_dir="test/good",
            abnormal_dir="test/defect",
            test_split_mode="from_dir",
            val_split_mode="none",
            **loader_args,
        )
        model = build_model(name, size, work)
        engine = Engine(
            accelerator="cpu",
            devices=1,
            max_epochs=epochs,
            logger=False,
            limit_val_batches=0,
            default_root_dir=work / "results",
            enable_progress_bar=args.progress,
        )
        # torch 2.13.0+cpu's batched matrix inverse (Padim's inverse covariances) fails on
        # more than one thread (MKL "Parameter 6 was incorrect on entry to SLASWP", then
        # "Pivots given to lu_solve must all be greater or equal to 1"): Padim fits on one.
        fit_threads = 1 if name == "padim" else args.threads
        torch.set_num_threads(fit_threads)
        started = time.perf_counter()
        engine.fit(model=model, datamodule=fit_data)
        train_seconds = time.perf_counter() - started
        torch.set_num_threads(args.threads)

        val_scores, val_maps = gather(
            data["val"], *collect(engine.predict(model=model, datamodule=fit_data), size)
        )
        started = time.perf_counter()
        test_predictions = engine.predict(model=model, datamodule=test_data)
        predict_seconds = time.perf_counter() - started
        scores, maps = gather(data["test"], *collect(test_predictions, size))
        speed_samples = data["test"][: args.speed_images or None]
        model_speed = model_images_per_second(
            model, decoded_images(speed_samples, size), args.batch_size
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    labels = np.array([s["label"] for s in data["test"]], int)
    pixel = {}
    if maps is not None:
        pixel = {
            "masks": read_masks(data["test"], size),
            "maps": maps,
            "pixel_threshold": metrics.calibrate_threshold(val_maps.ravel(), PIXEL_QUANTILE),
            "has_mask": np.array([bool(s.get("mask_path")) for s in data["test"]]),
        }
    result = metrics.compute_metrics(
        labels,
        scores,
        image_threshold=metrics.calibrate_threshold(val_scores, IMAGE_QUANTILE),
        **pixel,
    )
    if pixel and result["pixel_auroc"] is not None:
        model_grid = {f"{k}_model_resolution": result[k] for k in MODEL_GRID_KEYS}
        result |= native_pixel_metrics(metrics, data["test"], maps, pixel["pixel_threshold"])
        result |= model_grid
    extra = {}
    if fit_threads != args.threads:
        extra["note"] = (
            f"fitted on {fit_threads} thread (torch 2.13.0+cpu's batched matrix inverse fails "
            f"with an MKL error on {args.threads}); predicted on {args.threads}"
        )
    if name in LITE0_MODELS:
        extra |= {
            "backbone": f"{lite0_timm.TIMM_NAME} with defectlab's Lite0 weights",
            "layers": list(lite0_timm.ANOMALIB_LAYERS),
        }
    return {
        "model": f"anomalib-{name}",
        "dataset": data["dataset"],
        "split": data["name"],
        "image_size": size,
        "epochs": epochs,
        "n_train": len(data["train"]),
        "n_normal": result["n_normal"],
        "n_defect": result["n_defect"],
        **{k: result[k] for k in KEYS},
        **{f"{k}_model_resolution": result.get(f"{k}_model_resolution") for k in MODEL_GRID_KEYS},
        **extra,
        "threads": args.threads,
        "train_seconds": round(train_seconds, 1),
        "images_per_second": round(model_speed, 2),
        "speed_images": len(speed_samples),
        "images_per_second_end_to_end": round(len(labels) / predict_seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


# --- mapping check ---------------------------------------------------------------------------


def check_mapping(args: argparse.Namespace) -> float:
    """Compare defectlab's Lite0 features of one real image (the split's first test defect,
    computed by ``lite0_timm.py --reference`` in defectlab's venv) with those of timm's Lite0
    holding the mapped weights, run inside anomalib's Patchcore and Padim feature extractors
    on the same pixels and normalisation. Prints the largest absolute difference per block
    and model; raises SystemExit when one exceeds ``MAPPING_TOLERANCE``."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    data = read_split(args.split, None, None)
    image = next(s for s in data["test"] if s["label"] == 1)["path"]
    with tempfile.TemporaryDirectory(prefix="lite0-mapping-") as tmp:
        reference_file = Path(tmp) / "reference.npz"
        command = [
            str(args.defectlab_python),
            str(Path(lite0_timm.__file__).resolve()),
            "--reference",
            str(reference_file),
            "--image",
            image,
            "--image-size",
            str(args.image_size),
        ]
        environment = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
        subprocess.run(command, check=True, stdout=sys.stderr, env=environment)
        reference = dict(np.load(reference_file))
    if str(reference["sha256"]) != lite0_timm.WEIGHTS_SHA256:
        raise SystemExit(f"defectlab's Lite0 weights have SHA-256 {reference['sha256']}")
    pixels = torch.from_numpy(reference["image"]).expand(-1, 3, -1, -1)  # grey → 3 channels
    normalised = lite0_pre_processor(args.image_size).transform(pixels)
    worst = 0.0
    with tempfile.TemporaryDirectory(prefix="lite0-mapping-") as tmp:
        for name in ("patchcore", "padim"):
            model = build_model(name, args.image_size, Path(tmp) / name)
            features = model.model.feature_extractor(normalised)
            for block, layer in zip(
                lite0_timm.DEFECTLAB_BLOCKS, lite0_timm.ANOMALIB_LAYERS, strict=True
            ):
                ours = torch.from_numpy(reference[f"block{block}"])
                theirs = features[layer]
                if theirs.shape != ours.shape:
                    raise SystemExit(
                        f"{name} {layer}: shape {tuple(theirs.shape)}, defectlab block {block}: "
                        f"{tuple(ours.shape)}"
                    )
                difference = float((theirs - ours).abs().max())
                scale = float(ours.abs().max())
                worst = max(worst, difference)
                print(
                    f"{name}: anomalib layer {layer} vs defectlab block {block} "
                    f"{tuple(ours.shape)}: max |difference| {difference:.2e} "
                    f"(max |feature| {scale:.2f})"
                )
    # control: the same extractor without defectlab's weights (timm's random initialisation)
    # and defectlab's weights on ImageNet mean/std input must both differ clearly
    import timm
    from torchvision.transforms.v2 import Normalize

    indices = model.model.feature_extractor.idx  # of blocks.2 and blocks.4
    untrained = timm.create_model(
        lite0_timm.TIMM_NAME, pretrained=False, features_only=True, out_indices=indices
    ).eval()
    imagenet = Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])(pixels)
    with torch.no_grad():
        controls = {
            "timm's random initialisation": untrained(normalised),
            "ImageNet mean/std input": list(model.model.feature_extractor(imagenet).values()),
        }
    for label, maps in controls.items():
        difference = max(
            float((m - torch.from_numpy(reference[f"block{b}"])).abs().max())
            for b, m in zip(lite0_timm.DEFECTLAB_BLOCKS, maps, strict=True)
        )
        print(f"control, {label}: max |difference| {difference:.2e} (must be large)")
    verdict = "OK" if worst <= MAPPING_TOLERANCE else "FAILED"
    print(
        f"mapping {verdict}: max |difference| {worst:.2e} (tolerance {MAPPING_TOLERANCE:g}) on "
        f"{image} at {args.image_size} px"
    )
    if worst > MAPPING_TOLERANCE:
        raise SystemExit(1)
    return worst


# --- defectlab's own run, side by side -------------------------------------------------------


def defectlab_row(args: argparse.Namespace) -> dict:
    """``defectlab evaluate`` of the run whose split is used (defectlab's venv, as many
    threads), as a row of this table."""
    run = args.defectlab_run or args.split.parent
    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
    ours = json.loads(args.split.read_text(encoding="utf-8"))["parts"]
    if json.loads((run / "split.json").read_text(encoding="utf-8"))["parts"] != ours:
        return {"model": config["model"], "error": f"{run}/split.json is not {args.split}"}
    out = args.out / f"defectlab-{run.name}"
    waited = time.monotonic()
    while not (run / "model.pt").exists():  # its training may still be running
        if time.monotonic() - waited > args.wait_for_run:
            return {"model": config["model"], "error": f"{run}: no model.pt (training unfinished)"}
        time.sleep(30)
    command = [
        str(args.defectlab_python.parent / "defectlab"),
        "evaluate",
        "--run",
        str(run),
        "--data",
        str(config["data"]["path"]),
        "--out",
        str(out),
        "--device",
        "cpu",
    ]
    environment = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    print(f"running {shlex.join(command)}", file=sys.stderr, flush=True)
    done = subprocess.run(command, stdout=sys.stderr, env=environment, cwd=REPO, check=False)
    if done.returncode != 0:
        return {"model": config["model"], "error": f"evaluate exited with {done.returncode}"}
    result = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    trained = run / "metrics.json"  # written by train: its train_seconds
    train_seconds = None
    if trained.exists():
        train_seconds = json.loads(trained.read_text(encoding="utf-8")).get("train_seconds")
    counts = json.loads(args.split.read_text(encoding="utf-8"))["parts"]
    return {
        "model": config["model"],
        "dataset": result.get("split"),
        "split": result.get("split"),
        "image_size": config["data"]["image_size"],
        "epochs": 1,
        "n_train": sum(1 for s in counts["train"] if s["label"] == 0),
        "n_normal": result.get("n_normal"),
        "n_defect": result.get("n_defect"),
        **{k: result.get(k) for k in KEYS},
        **{f"{k}_model_resolution": result.get(f"{k}_model_resolution") for k in MODEL_GRID_KEYS},
        "threads": args.threads,
        "train_seconds": train_seconds,
        "images_per_second": result.get("images_per_second"),
        "command": shlex.join(command),
    }


# --- driver ----------------------------------------------------------------------------------


def run_in_subprocess(args: argparse.Namespace, model: str) -> dict:
    """Run one model in a fresh interpreter; its row (or its error) comes back in a file."""
    with tempfile.TemporaryDirectory(prefix=f"anomalib-peer-{model}-") as tmp:
        result_file = Path(tmp) / "row.json"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--one",
            model,
            "--result-file",
            str(result_file),
            "--work-dir",
            str(Path(tmp) / "work"),
            "--split",
            str(args.split),
            "--image-size",
            str(args.image_size),
            "--out",
            str(args.out),
            "--batch-size",
            str(args.batch_size),
            "--workers",
            str(args.workers),
            "--seed",
            str(args.seed),
            "--threads",
            str(args.threads),
            "--speed-images",
            str(args.speed_images),
        ]
        for flag, value in (
            ("--epochs", args.epochs),
            ("--max-train", max_train_for(args.max_train, model)),
            ("--max-test", args.max_test),
        ):
            if value is not None:
                command += [flag, str(value)]
        if args.progress:
            command.append("--progress")
        # The child's own output (lightning's logs) goes to our stderr, so stdout holds rows.
        environment = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
        if not args.progress:
            environment["TQDM_DISABLE"] = "1"  # anomalib's coreset progress bar
        child = subprocess.Popen(command, stdout=sys.stderr, env=environment)
        try:
            code = child.wait()
        finally:  # interrupted: lightning defers SIGTERM, so the child is killed outright
            if child.poll() is None:
                child.kill()
                child.wait()
        if result_file.exists():
            return json.loads(result_file.read_text())
        return {"model": f"anomalib-{model}", "error": f"process exited with code {code}"}


def gathered_rows(args: argparse.Namespace) -> list[dict]:
    """``--rows``: the rows in the given files (JSON lists, or lines starting with ``{``) whose
    split is this one; for each model the last one found, ordered as ``--models`` after the
    defectlab row (the one with a ``command``)."""
    name = json.loads(args.split.read_text(encoding="utf-8"))["name"]
    found: dict[str, dict] = {}
    for path in args.rows:
        text = path.read_text(encoding="utf-8")
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
        for row in rows:
            if row.get("split") == name or "error" in row:
                found[row["model"]] = row
    wanted = [f"anomalib-{m}" for m in args.models]
    ordered = [r for m, r in found.items() if "command" in r and m not in wanted]
    ordered += [found[m] for m in wanted if m in found]
    missing = [m for m in wanted if m not in found]
    ordered += [{"model": m, "error": "no row in the given files"} for m in missing]
    return ordered


def fmt(value: object, metric: bool) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if metric else str(value)


def table(rows: list[dict]) -> str:
    columns = (
        *("model", "dataset", "split", "image_size", "epochs", "n_train", "n_normal", "n_defect"),
        *KEYS,
        *("threads", "train_seconds", "images_per_second", "peak_rss_mb"),
    )
    cells = [[fmt(row.get(c), c in KEYS) for c in columns] for row in rows if "error" not in row]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    lines += [f"FAILED: {row['model']}: {row['error']}" for row in rows if "error" in row]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", type=Path, required=True, help="RUN_DIR/split.json")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("runs/anomalib-peer"))
    parser.add_argument(
        "--epochs", type=int, help=f"max_epochs for every model (default {DEFAULT_EPOCHS})"
    )
    parser.add_argument(
        "--max-train",
        nargs="+",
        metavar="[MODEL=]N",
        help="use the first N train normals (of every model, or of MODEL); 0 = all "
        f"(default {DEFAULT_MAX_TRAIN}; None = all)",
    )
    parser.add_argument("--max-test", type=int, help="development: about N/2 normal + N/2 defect")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="dataloader workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show lightning progress bars")
    parser.add_argument(
        "--speed-images",
        type=int,
        default=128,
        help="img/s: model time over the first N test images (default 128; 0 = all)",
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="torch / OpenMP threads of every model (default 2)"
    )
    parser.add_argument(
        "--check-mapping",
        action="store_true",
        help="only compare timm's Lite0 with defectlab's features of one image of the split",
    )
    parser.add_argument(
        "--defectlab",
        action="store_true",
        help="also evaluate the split's defectlab run with `defectlab evaluate` (its venv)",
    )
    parser.add_argument(
        "--defectlab-run",
        type=Path,
        help="--defectlab: the run to evaluate (default: the split's run); its split.json "
        "must hold exactly the same images",
    )
    parser.add_argument(
        "--wait-for-run",
        type=float,
        default=3600,
        help="--defectlab: seconds to wait for the run's model.pt (default 3600)",
    )
    parser.add_argument(
        "--defectlab-python",
        type=Path,
        default=DEFECTLAB_PYTHON,
        help=f"python of defectlab's venv (default {DEFECTLAB_PYTHON.relative_to(REPO)})",
    )
    parser.add_argument(
        "--rows",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="run nothing: table (and --write-docs) of the rows of earlier invocations on this "
        "split (their OUT/results.json, or their logs' JSON lines), in --models order with "
        "defectlab's row first; the section's notes then name those files",
    )
    parser.add_argument(
        "--note", action="append", help="a sentence for the --write-docs section (repeatable)"
    )
    parser.add_argument("--one", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    add_write_docs(parser, "detection")
    args = parser.parse_args(argv)
    args.split = args.split.resolve()
    if not args.defectlab_python.is_absolute():
        args.defectlab_python = Path.cwd() / args.defectlab_python  # not resolved: a venv link

    if args.check_mapping:
        check_mapping(args)
        return
    if args.one:
        try:
            row = run_one(args)
        except Exception as exc:  # reported per model; the driver carries on with the others
            row = {"model": f"anomalib-{args.one}", "error": f"{type(exc).__name__}: {exc}"}
        if args.result_file:
            args.result_file.write_text(json.dumps(row))
        else:
            print(json.dumps(row))
        return

    if args.rows:
        rows = gathered_rows(args)
        print(table(rows), flush=True)
        if args.write_docs:
            write_docs(args, rows)
        return

    # SIGTERM ends the driver through its finally blocks, which also end the running child.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = []
    for model in args.models:
        print(f"running anomalib-{model} on {args.split}", file=sys.stderr, flush=True)
        row = run_in_subprocess(args, model)
        rows.append(row)
        if "error" in row:
            print(f"FAILED: {model}: {row['error']}", flush=True)
        else:
            print(json.dumps(row), flush=True)
    if args.defectlab:  # last (its training may still be running), but the table's first row
        row = defectlab_row(args)
        rows.insert(0, row)
        print(json.dumps(row) if "error" not in row else f"FAILED: defectlab: {row}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows), flush=True)
    if args.write_docs:
        write_docs(args, rows)


def write_docs(args: argparse.Namespace, rows: list[dict]) -> None:
    """``--write-docs``: this invocation's rows as one section, keyed by the run whose split
    they used, the models and the epochs. With ``--defectlab`` or a model on defectlab's
    Lite0 (:data:`LITE0_MODELS`) the section is the side-by-side table of
    :func:`write_side_by_side`."""
    if args.defectlab or any(m in LITE0_MODELS for m in args.models):
        write_side_by_side(args, rows)
        return
    columns = [
        ("model", "model", str),
        ("epochs", "epochs", str),
        ("n_train", "training normals", str),
        *((key, key, lambda v: fmt(v, True)) for key in KEYS),
        ("train_seconds", "train s", lambda v: fmt(v, False)),
        ("images_per_second", "img/s", lambda v: f"{v:.1f}" if v is not None else "-"),
        ("peak_rss_mb", "peak RAM MB", lambda v: f"{v:.0f}" if v is not None else "-"),
    ]
    done = [row for row in rows if "error" not in row]
    epochs = f"epochs-{args.epochs}" if args.epochs else ""
    path = write_section(
        args.write_docs,
        docs_key("anomalib", args.split.parent.name, *args.models, epochs),
        f"anomalib peers on the split of {args.split.parent.name}",
        markdown_table(done, columns),
        notes=(
            "Trained with anomalib's Engine on the run's normal training images, scored with "
            "defectlab's metrics at the same normal-quantile thresholds."
        ),
    )
    print(f"results → {path}", file=sys.stderr)


#: how each model of the side-by-side table is described in its first column
MODEL_TITLES = {
    "patchmemory": "defectlab `patchmemory` (Lite0 blocks 4 + 10)",
    "padim": "defectlab `padim` (Lite0 blocks 4 + 10, 152 channels)",
    "anomalib-patchcore": "anomalib `Patchcore` (Lite0 `blocks.2` + `blocks.4`)",
    "anomalib-padim": "anomalib `Padim` (Lite0 `blocks.2` + `blocks.4`, 152 channels)",
    "anomalib-fastflow": "anomalib `Fastflow`",
    "anomalib-draem": "anomalib `Draem`",
    "anomalib-ganomaly": "anomalib `Ganomaly`",
}


def without_notes(command: str) -> list[str]:
    """The words of ``command`` after the interpreter, without ``--note TEXT`` pairs."""
    words, kept = shlex.split(command)[1:], []
    while words:
        word = words.pop(0)
        if word == "--note":
            words = words[1:]
        elif not word.startswith("--note="):
            kept.append(word)
    return kept


def write_side_by_side(args: argparse.Namespace, rows: list[dict]) -> None:
    """defectlab's run and anomalib's feature models on the same Lite0 weights and split."""
    number = lambda v: fmt(v, True)  # noqa: E731
    speed = lambda v: f"{v:.1f}" if v is not None else "-"  # noqa: E731
    columns = [
        ("title", "model", str),
        ("n_train", "training normals", str),
        ("image_auroc", "image AUROC", number),
        ("image_ap", "image AP", number),
        ("pixel_auroc", "pixel AUROC", number),
        ("aupro", "AUPRO", number),
        ("dice", "Dice", number),
        ("pixel_auroc_model_resolution", "pixel AUROC (model grid)", number),
        ("train_seconds", "train s", lambda v: fmt(v, False)),
        ("images_per_second", f"img/s ({args.threads} threads)", speed),
        ("peak_rss_mb", "peak RAM MB", lambda v: f"{v:.0f}" if v is not None else "-"),
    ]
    done = [
        {**row, "title": MODEL_TITLES.get(row["model"], row["model"])}
        for row in rows
        if "error" not in row
    ]
    failed = [row for row in rows if "error" in row]
    split = json.loads(args.split.read_text(encoding="utf-8"))
    counts = {part: len(samples) for part, samples in split["parts"].items()}
    with_masks = any(row.get("pixel_auroc") is not None for row in done)
    notes = [
        f"Split `{split['name']}` written by the defectlab run `{args.split.parent.name}` "
        f"({counts.get('train')} training normals, {counts.get('val')} validation normals, "
        f"{counts.get('test')} test images); {args.image_size} px, seed {args.seed}. Every "
        "model trains on the same normal training images, takes its thresholds from the same "
        "validation normals (0.99 quantile of image scores, 0.999 of map pixels) and is "
        "scored by defectlab's own metrics; no setting was chosen on test images.",
        "Backbone: the anomalib models run timm's `tf_efficientnet_lite0` holding defectlab's "
        f"ImageNet Lite0 weights (`{lite0_timm.WEIGHTS_PACKAGE}`, SHA-256 "
        f"`{lite0_timm.WEIGHTS_SHA256[:12]}…`; keys mapped by `benchmarks/lite0_timm.py`, "
        "`--check-mapping` matches defectlab's features to 1e-4), the same two blocks (last "
        "stride-8 and stride-16) and the Lite input normalisation (x·255 − 127) / 128; anomalib "
        "resizes with its own antialiased `Resize`, defectlab with area averaging.",
        "anomalib's own defaults otherwise. Patchcore: coreset ratio 0.1 of all training "
        "patches (greedy k-center on a sparse random projection, eps 0.9), 3×3 average pooling "
        "counting the zero padding at borders, 9 neighbours, Gaussian σ 4; defectlab's "
        "`patchmemory`: coreset ratio 0.1 capped at 16,384 rows (greedy k-center on a 64-d "
        "Gaussian projection), 3×3 pooling over the pixels inside, 9 neighbours, σ 4. Padim: "
        "anomalib has no `n_features` default for this backbone, so all 152 channels are kept "
        "(no random channel subset); defectlab's `padim` keeps them too (0.01·I ridge, stride-16 "
        "block up-sampled bilinearly, σ 4).",
        f"img/s: model time on {args.threads} threads (OMP_NUM_THREADS and torch threads) with "
        "the test images already decoded at the model size, as `defectlab evaluate` counts it "
        "(anomalib rows: over "
        + ", ".join(
            f"{row['title']} {row.get('speed_images') or 'all'}"
            for row in done
            if row["model"].startswith("anomalib-")
        )
        + " test images; defectlab: all), "
        "measured while other jobs shared the 2 cores (load average "
        f"{os.getloadavg()[0]:.0f} on {os.cpu_count()} cores when this section was written): "
        "compare within a table only.",
    ]
    if with_masks:
        notes.append(
            "Pixel metrics on each mask's native grid (long side capped at 512 px), maps "
            "resized bilinearly to it, as `defectlab evaluate` computes them; the model-grid "
            "column is the same AUROC at the model's 128 px."
        )
    for row in failed:
        notes.append(f"Not in the table: {row['model']} failed: {row['error']}")
    notes += [f"{row['title']}: {row['note']}." for row in done if row.get("note")]
    notes += args.note or []
    for defectlab in (row for row in done if "command" in row):
        notes.append(
            f"The defectlab `{defectlab['model']}` row is `{defectlab['command']}`, run by "
            + ("a `--defectlab` invocation" if args.rows else "this command")
            + " (the run was "
            f"trained with `defectlab train --model {defectlab['model']} --image-size "
            f"{args.image_size} --seed {args.seed}` on this split; train s from its metrics)."
        )
    dataset = split.get("layout") or Path(str(split.get("root", ""))).name
    path = write_section(
        args.write_docs,
        docs_key("peer-lite0", args.split.parent.name, args.image_size, *args.models),
        f"{dataset}, {args.image_size} px: defectlab against anomalib on the same Lite0 weights",
        markdown_table(done, columns),
        notes="\n\n".join(notes),
        command="# anomalib 2.7 in its own venv (benchmarks/anomalib/setup.sh); --note: above\n"
        + shlex.join(["benchmarks/anomalib/.venv/bin/python", *without_notes(invocation())]),
    )
    print(f"results → {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
