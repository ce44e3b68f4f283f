"""Does ``patchmemory`` stay within its RAM budget when fed 10× more training images?

Trains ``patchmemory`` (default config: ``max_memory_mb=256``) on N and on 10·N real normal
ELPV cells, each in its own process, and prints per run: patches seen, the candidate pool's
high-water mark in rows and in MiB (rows × bytes per row: feature, projection and the
coreset search's distances), the configured budget, how often the pool was reduced to a
coreset, the final memory bank size, and the process's peak RSS (which also holds the
decoded images, the Lite0 network and PyTorch itself, so it is reported next to the
images' own size).

    .venv/bin/python benchmarks/patchmemory_budget.py --n 150 --factor 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    add_write_docs,
    docs_key,
    fmt_number,
    job_rows,
    markdown_table,
    peak_rss_mb,
    write_section,
)


def run_one(n: int, size: int, budget_mb: float) -> dict:
    import numpy as np

    from defectlab import registry
    from defectlab.data.layouts import NORMAL, load_dataset
    from defectlab.data.loading import load_samples
    from defectlab.training import fit

    normals = [s for s in load_dataset("elpv").samples if s.label == NORMAL]
    if len(normals) < n:
        raise SystemExit(f"ELPV has {len(normals)} normal cells, fewer than {n}")
    picked = [normals[i] for i in np.random.default_rng(0).permutation(len(normals))[:n]]
    images = load_samples(picked, size, 1, 127, progress=False).images
    cls = registry.get("patchmemory")
    model = cls(cls.Config(max_memory_mb=budget_mb), image_size=size)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        fit(model, images, run_dir=Path(run_dir), progress=False)
    cfg = model.config
    return {
        "images": n,
        "image_size": size,
        "patches_seen": model.patches_seen,
        "pool_rows_cap": cfg.pool_rows,
        "peak_pool_rows": model.peak_pool_rows,
        "peak_pool_mb": model.peak_pool_rows * cfg.row_bytes / 2**20,
        "budget_mb": cfg.max_memory_mb,
        "reductions": model.reductions,
        "memory_bank_rows": int(model.memory.shape[0]),
        "train_seconds": round(time.perf_counter() - started, 1),
        "images_mb": images.nbytes / 2**20,
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=150, help="images of the small run")
    parser.add_argument("--factor", type=int, default=10, help="the large run has n × factor")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--budget-mb", type=float, default=256.0)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    add_write_docs(parser, "resources")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.image_size, args.budget_mb)))
        return
    rows = []
    for n in (args.n, args.n * args.factor):
        command = [sys.executable, __file__, "--one", str(n), "--image-size", str(args.image_size)]
        command += ["--budget-mb", str(args.budget_mb)]
        rows += job_rows(command, f"patchmemory on {n} images") or []
    print(
        f"{'images':>7} {'patches':>9} {'pool peak rows':>15} {'pool peak MiB':>14} "
        f"{'budget MiB':>11} {'reductions':>11} {'bank rows':>10} {'images MiB':>11} "
        f"{'peak RSS MiB':>13} {'train s':>8}"
    )
    for r in rows:
        print(
            f"{r['images']:>7} {r['patches_seen']:>9} {r['peak_pool_rows']:>15} "
            f"{r['peak_pool_mb']:>14.1f} {r['budget_mb']:>11.0f} {r['reductions']:>11} "
            f"{r['memory_bank_rows']:>10} {r['images_mb']:>11.1f} {r['peak_rss_mb']:>13.0f} "
            f"{r['train_seconds']:>8.1f}"
        )
    if args.write_docs:
        columns = [
            ("images", "images", str),
            ("patches_seen", "patches seen", str),
            ("peak_pool_rows", "candidate pool peak rows", str),
            ("peak_pool_mb", "pool peak MiB", fmt_number(1)),
            ("budget_mb", "budget MiB", fmt_number(0)),
            ("reductions", "reductions", str),
            ("memory_bank_rows", "memory bank rows", str),
            ("images_mb", "decoded images MiB", fmt_number(1)),
            ("peak_rss_mb", "process peak RSS MiB", fmt_number(0)),
            ("train_seconds", "train s", fmt_number(1)),
        ]
        path = write_section(
            args.write_docs,
            docs_key("patchmemory-budget", args.n, f"x{args.factor}", args.image_size),
            f"`patchmemory` within its RAM budget: {args.n} and {args.n * args.factor} images",
            markdown_table(rows, columns),
            notes="Real ELPV normal cells; each run in its own process.",
        )
        print(f"results → {path}")
