"""Detection benchmark on real data with the standard splits of ``../shared/data/README.md``.

Trains every requested detector on the normal training share of each dataset, calibrates on
the normal validation share, evaluates on the held-out test share and prints one row per
(model, dataset) with the split name, training wall time, inference images/s (model time at
the run's image size, data already decoded) and the peak resident memory of the process
that trained and evaluated it. Each pair runs in its own process so that peak RAM is that
model's own. Results also go to ``OUT/results.json``; a finished run folder is reused.

    .venv/bin/python benchmarks/detection.py --models pixelstats ae flow \
        --datasets elpv ../shared/data/magnetic-tile --out runs/bench

``--peers draem ganomaly`` also trains those anomalib models in the same run, on exactly the
split of the first model's run for each dataset, with ``benchmarks/anomalib_peer.py`` in the
anomalib venv (``benchmarks/anomalib/setup.sh``), scored with the same metrics and the same
normal-quantile thresholds, and prints their rows in the same table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from weak_supervision import job_rows, peak_rss_mb

PEER_PYTHON = Path(__file__).with_name("anomalib") / ".venv" / "bin" / "python"
PEER_SETUP = "benchmarks/anomalib/setup.sh"
KEYS = ("image_auroc", "image_ap", "pixel_auroc", "aupro", "dice", "f1")


def run_one(args: argparse.Namespace) -> dict:
    """Train (or reuse) and evaluate one model on one dataset, in this process."""
    from defectlab import api

    name = Path(args.datasets[0]).name
    model = args.models[0]
    run_dir = args.out / f"{model}-{name}-{args.image_size}-s{args.seed}"
    started = time.perf_counter()
    if (run_dir / api.MODEL_FILE).exists():
        print(f"reusing trained run {run_dir}", file=sys.stderr)
        train_seconds = json.loads((run_dir / "metrics.json").read_text())["train_seconds"]
    else:
        api.train(
            model,
            args.datasets[0],
            run_dir,
            image_size=args.image_size,
            seed=args.seed,
            device=args.device,
            overrides=args.set,
        )
        train_seconds = round(time.perf_counter() - started, 1)
    metrics = api.evaluate(run_dir, args.datasets[0], run_dir / "eval", device=args.device)
    return {
        "model": model,
        "dataset": name,
        "split": metrics["split"],
        "image_size": args.image_size,
        "seed": args.seed,
        "n_normal": metrics["n_normal"],
        "n_defect": metrics["n_defect"],
        "train_seconds": train_seconds,
        "images_per_second": metrics["images_per_second"],
        "peak_rss_mb": peak_rss_mb(),
        **{k: metrics[k] for k in KEYS},
    }


def peer_rows(args: argparse.Namespace, dataset: str) -> list[dict]:
    """The anomalib peers' rows on the split of the first model's run on ``dataset``."""
    name = Path(dataset).name
    split = args.out / f"{args.models[0]}-{name}-{args.image_size}-s{args.seed}" / "split.json"
    if not split.exists():
        print(f"FAILED: anomalib peers on {dataset}: no split file {split}", file=sys.stderr)
        return []
    command = [str(args.peer_python), str(Path(__file__).with_name("anomalib_peer.py"))]
    command += ["--split", str(split), "--models", *args.peers]
    command += ["--image-size", str(args.image_size), "--seed", str(args.seed)]
    command += ["--out", str(args.out / f"anomalib-{name}")]
    for flag, value in (("--epochs", args.peer_epochs), ("--max-train", args.peer_max_train)):
        if value is not None:
            command += [flag, str(value)]
    return job_rows(command, f"anomalib peers on {dataset}") or []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["pixelstats"])
    parser.add_argument("--datasets", nargs="+", default=["elpv", "../shared/data/magnetic-tile"])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--peers", nargs="*", default=[], help="anomalib models: draem ganomaly")
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    parser.add_argument("--peer-epochs", type=int, help="anomalib_peer.py --epochs")
    parser.add_argument("--peer-max-train", type=int, help="anomalib_peer.py --max-train")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peers and not args.peer_python.exists():
        parser.error(f"--peers needs the anomalib venv {args.peer_python}: run {PEER_SETUP}")

    if args.one:
        print(json.dumps(run_one(args)))
        return

    rows = []
    for dataset in args.datasets:
        for model in args.models:
            command = [sys.executable, __file__, "--one", "--models", model]
            command += ["--datasets", dataset, "--image-size", str(args.image_size)]
            command += ["--seed", str(args.seed), "--device", args.device, "--out", str(args.out)]
            for option in args.set:
                command += ["--set", option]
            rows += job_rows(command, f"{model} on {dataset}") or []
        if args.peers:
            rows += peer_rows(args, dataset)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    header = f"{'model':<16} {'dataset':<15} {'split':<28} " + " ".join(f"{k:>11}" for k in KEYS)
    print(header + f" {'train_s':>8} {'img/s':>8} {'peak_MB':>8}")
    for r in rows:
        values = " ".join(f"{r[k]:>11.4f}" if r[k] is not None else f"{'n/a':>11}" for k in KEYS)
        extra = " ".join(
            f"{r[k]:>8.1f}" for k in ("train_seconds", "images_per_second", "peak_rss_mb")
        )
        print(f"{r['model']:<16} {r['dataset']:<15} {r['split']:<28} {values} {extra}")


if __name__ == "__main__":
    main()
