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
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import add_write_docs, docs_key, markdown_table, write_section

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
METRICS_FILE = REPO / "src" / "defectlab" / "evaluate" / "metrics.py"
KEYS = ("image_auroc", "image_ap", "pixel_auroc", "aupro", "dice", "f1")
MODELS = ("draem", "ganomaly")
# CPU defaults that keep each model's training near 15 min at 128 px on 2 busy cores. Draem
# (97 M parameters, ~100 GFLOP per 128 px image forward) trains at ~9 s per image there, so
# even one epoch on ~600 images takes over an hour: by default it sees the first 96 training
# normals for one epoch. --epochs / --max-train override these for every model.
DEFAULT_EPOCHS = {"draem": 1, "ganomaly": 3}
DEFAULT_MAX_TRAIN = {"draem": 96, "ganomaly": None}
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


def build_model(name: str, size: int, work: Path):
    from anomalib.models import Draem, Ganomaly
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


def run_one(args: argparse.Namespace) -> dict:
    """Train, calibrate and evaluate one anomalib model in this process."""
    import numpy as np
    from anomalib.data import Folder
    from anomalib.engine import Engine
    from lightning.pytorch import seed_everything

    metrics = load_metrics()
    name = args.one
    epochs = args.epochs or DEFAULT_EPOCHS[name]
    size = args.image_size
    max_train = DEFAULT_MAX_TRAIN[name] if args.max_train is None else args.max_train or None
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
        started = time.perf_counter()
        engine.fit(model=model, datamodule=fit_data)
        train_seconds = time.perf_counter() - started

        val_scores, val_maps = gather(
            data["val"], *collect(engine.predict(model=model, datamodule=fit_data), size)
        )
        started = time.perf_counter()
        test_predictions = engine.predict(model=model, datamodule=test_data)
        predict_seconds = time.perf_counter() - started
        scores, maps = gather(data["test"], *collect(test_predictions, size))
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
        "train_seconds": round(train_seconds, 1),
        "images_per_second": round(len(labels) / predict_seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
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
        ]
        for flag, value in (
            ("--epochs", args.epochs),
            ("--max-train", args.max_train),
            ("--max-test", args.max_test),
        ):
            if value is not None:
                command += [flag, str(value)]
        if args.progress:
            command.append("--progress")
        # The child's own output (lightning's logs) goes to our stderr, so stdout holds rows.
        child = subprocess.Popen(command, stdout=sys.stderr)
        try:
            code = child.wait()
        finally:  # interrupted: lightning defers SIGTERM, so the child is killed outright
            if child.poll() is None:
                child.kill()
                child.wait()
        if result_file.exists():
            return json.loads(result_file.read_text())
        return {"model": f"anomalib-{model}", "error": f"process exited with code {code}"}


def fmt(value: object, metric: bool) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if metric else str(value)


def table(rows: list[dict]) -> str:
    columns = (
        *("model", "dataset", "split", "image_size", "epochs", "n_train", "n_normal", "n_defect"),
        *KEYS,
        *("train_seconds", "images_per_second", "peak_rss_mb"),
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
        type=int,
        help=f"use the first N train normals; 0 = all (default {DEFAULT_MAX_TRAIN}; None = all)",
    )
    parser.add_argument("--max-test", type=int, help="development: about N/2 normal + N/2 defect")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=0, help="dataloader workers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress", action="store_true", help="show lightning progress bars")
    parser.add_argument("--one", choices=MODELS, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", type=Path, help=argparse.SUPPRESS)
    add_write_docs(parser, "detection")
    args = parser.parse_args(argv)
    args.split = args.split.resolve()

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
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table(rows), flush=True)
    if args.write_docs:
        write_docs(args, rows)


def write_docs(args: argparse.Namespace, rows: list[dict]) -> None:
    """``--write-docs``: this invocation's rows as one section, keyed by the run whose split
    they used, the models and the epochs."""
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


if __name__ == "__main__":
    main()
