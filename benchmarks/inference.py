"""Inference speed: PyTorch eager vs ONNX Runtime for every exportable model, on real images.

For each model and image size a run is trained briefly on a small share of the bundled
ELPV solar cells (one epoch on ``--train-fraction`` of the normal cells: inference cost
depends on the architecture, not on how well it is trained, though a feature memory's size
does depend on the training images), exported to ONNX, and both backends score the same
real test cells through the same :class:`~defectlab.deploy.backends.Inspector` call
(float NHWC arrays in, scores and maps out). Per (model, size, backend, batch): images/s
and the p50/p99 latency of one batch call, with ``--threads`` CPU threads for both
backends. Run it with nothing else on the machine; runs and exports are cached in ``--out``.

    .venv/bin/python benchmarks/inference.py --sizes 128 256 --threads 2 --out runs/inference
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_MODELS = [
    "ae",
    "vae",
    "wae",
    "mlaae",
    "deepsvdd",
    "pixelstats",
    "flow",
    "patchmemory",
    "synth-unet",
    "synth-unet3plus",
]


def trained_run(model: str, size: int, args: argparse.Namespace) -> Path:
    from defectlab import api

    run_dir = args.out / f"{model}-{size}"
    if not (run_dir / api.MODEL_FILE).exists():
        overrides = [f"data.train_fraction={args.train_fraction}", "data.val_fraction=0.05"]
        if model not in ("pixelstats", "patchmemory"):
            overrides.append("model.epochs=" + ("3" if model == "deepsvdd" else "1"))
        api.train(
            model,
            "elpv",
            run_dir,
            image_size=size,
            device="cpu",
            overrides=overrides,
            progress=False,
        )
    return run_dir


def test_cells(size: int, n: int) -> np.ndarray:
    """``n`` real ELPV cells (normal and defective alternating) at ``size``."""
    from defectlab.data.io import read_image
    from defectlab.data.layouts import load_dataset
    from defectlab.data.transforms import resize_image

    samples = sorted(load_dataset("elpv").samples, key=lambda s: str(s.path))[-n:]
    return np.stack([resize_image(read_image(s.path), size) for s in samples])


def time_calls(score, images: np.ndarray, batch: int, calls: int) -> dict[str, float]:
    chunk = images[:batch]
    score(chunk, batch)  # warm-up (first-call allocation, ORT graph preparation)
    latencies = []
    for _ in range(calls):
        started = time.perf_counter()
        score(chunk, batch)
        latencies.append(time.perf_counter() - started)
    latencies_ms = np.array(latencies) * 1e3
    return {
        "images_per_second": batch * calls / (latencies_ms.sum() / 1e3),
        "p50_ms": float(np.percentile(latencies_ms, 50)),
        "p99_ms": float(np.percentile(latencies_ms, 99)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-fraction", type=float, default=0.05)
    parser.add_argument("--calls", type=int, default=0, help="timed calls (default by batch)")
    parser.add_argument("--out", type=Path, default=Path("runs/inference"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from defectlab.deploy.backends import torch_inspector
    from defectlab.deploy.onnx import export_onnx, onnx_inspector
    from defectlab.errors import DefectlabError
    from defectlab.runs import environment_info

    results = []
    print(
        f"{'model':<16} {'size':>4} {'batch':>5} {'torch img/s':>11} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'onnx img/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'speed-up':>8}"
    )
    for size in args.sizes:
        cells = test_cells(size, max(args.batches))
        for model in args.models:
            try:
                run_dir = trained_run(model, size, args)
                if not (run_dir / "export" / "metadata.json").exists():
                    export_onnx(run_dir)
            except DefectlabError as exc:
                print(f"{model:<16} {size:>4} not exported: {exc}", file=sys.stderr)
                continue
            backends = {
                "torch": torch_inspector(run_dir, "cpu"),
                "onnx": onnx_inspector(run_dir / "export", threads=args.threads),
            }
            for batch in args.batches:
                calls = args.calls or (50 if batch == 1 else 5)
                row = {"model": model, "size": size, "batch": batch, "threads": args.threads}
                for name, inspector in backends.items():
                    row[name] = time_calls(inspector.score, cells, batch, calls)
                row["speedup"] = (
                    row["onnx"]["images_per_second"] / row["torch"]["images_per_second"]
                )
                results.append(row)
                t, o = row["torch"], row["onnx"]
                print(
                    f"{model:<16} {size:>4} {batch:>5} {t['images_per_second']:>11.1f} "
                    f"{t['p50_ms']:>8.1f} {t['p99_ms']:>8.1f} {o['images_per_second']:>10.1f} "
                    f"{o['p50_ms']:>8.1f} {o['p99_ms']:>8.1f} {row['speedup']:>7.2f}x",
                    flush=True,
                )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(
        json.dumps(
            {"command": " ".join(sys.argv), "environment": environment_info(), "rows": results},
            indent=2,
        )
    )
    print(f"{len(results)} rows → {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
