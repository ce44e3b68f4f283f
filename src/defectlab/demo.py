"""``make demo``: the main job on the bundled real default, ELPV solar cells.

Fits the feature-memory detector (``patchmemory``: frozen ImageNet EfficientNet-Lite0 patch
features, shipped offline) on the ELPV v1 normal training split, calibrates it on held-out
normal cells, evaluates on held-out normal + defective cells, and writes one report with
procedural synthesis samples next to the heat maps. Runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from defectlab import api
from defectlab.data.io import read_image
from defectlab.data.splits import Split
from defectlab.data.transforms import resize_image

DEMO_MODEL = "patchmemory"
DEMO_SYNTH = "procedural"


def run_demo(out: Path, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    run_dir, eval_dir, synth_dir = out / "run", out / "eval", out / "synth"
    if (run_dir / api.MODEL_FILE).exists():
        run = api.load_run(run_dir, device)
        print(f"reusing the trained demo run in {run_dir} (delete {out} to retrain)")
    else:
        run = api.train(DEMO_MODEL, "elpv", run_dir, device=device, progress=progress)
    split = Split.load(run_dir / "split.json")
    size = run.config.data.image_size
    normals = [resize_image(read_image(s.path), size) for s in split["train"][:12]]
    gallery = api.synthesis_gallery(DEMO_SYNTH, normals, n=12, seed=0)
    api.synthesize(DEMO_SYNTH, split.root, synth_dir, 24, progress=progress)
    metrics = api.evaluate(
        run_dir,
        "elpv",
        eval_dir,
        device=device,
        progress=progress,
        galleries=[("Procedural synthetic defects (red: exact mask)", gallery)],
    )
    return {
        "model": DEMO_MODEL,
        "image_auroc": metrics["image_auroc"],
        "image_ap": metrics["image_ap"],
        "report": str(eval_dir / "report.html"),
        "seconds": time.perf_counter() - started,
    }
