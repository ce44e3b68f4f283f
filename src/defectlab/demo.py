"""``make demo``: the main job on the bundled real default, ELPV solar cells.

Runs ``train --model auto`` on the ELPV v1 normal training split with a two-candidate
shortlist that fits the demo's time (``patchmemory`` and ``padim``, both on frozen ImageNet
EfficientNet-Lite0 patch features shipped offline): each is scored on procedural defects
painted onto held-out normal cells and the better one is kept and calibrated. Then it
evaluates on held-out normal + defective cells and writes one report with procedural
synthesis samples next to the heat maps. Then the deployment path: the run is
exported to ONNX (thresholds baked in, checked against PyTorch) and a folder of test cells
is inspected with ONNX Runtime (``results.jsonl``, ``scores.csv``, masks, overlays). Runs
in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from defectlab import api
from defectlab.data.io import read_image
from defectlab.data.splits import Split
from defectlab.data.transforms import resize_image
from defectlab.deploy.onnx import export_onnx
from defectlab.selection import CANDIDATES_DIR, select

#: test cells copied into a folder and inspected through the ONNX export
INSPECT_CELLS = 48

#: ``--model auto``'s two strongest candidates on the benchmark data, without the ensemble
DEMO_SELECTION = (
    "selection.candidates=patchmemory:backbone=lite0,padim:backbone=lite0",
    "selection.ensemble=false",
)
DEMO_SYNTH = "procedural"


def run_demo(out: Path, device: str = "auto", progress: bool = True) -> dict[str, Any]:
    started = time.perf_counter()
    run_dir, eval_dir, synth_dir = out / "run", out / "eval", out / "synth"
    if (run_dir / api.MODEL_FILE).exists():
        run = api.load_run(run_dir, device)
        print(f"reusing the trained demo run in {run_dir} (delete {out} to retrain)")
    else:
        chosen = select(
            "elpv",
            run_dir,
            device=device,
            overrides=DEMO_SELECTION,
            progress=progress,
            resume=(run_dir / CANDIDATES_DIR).exists(),
        )
        for candidate in chosen.candidates:
            auroc = candidate.synthetic_auroc
            print(
                f"  candidate {candidate.name}: "
                + (f"painted-defect AUROC {auroc:.3f}" if auroc is not None else candidate.status)
            )
        print(f"model=auto → {chosen.chosen}: {chosen.reason}")
        run = chosen.run
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
    export = export_onnx(run_dir, out / "export")
    folder = out / "line"
    folder.mkdir(parents=True, exist_ok=True)
    for sample in split["test"][:: max(1, len(split["test"]) // INSPECT_CELLS)][:INSPECT_CELLS]:
        target = folder / sample.path.name
        if not target.exists():
            shutil.copyfile(sample.path, target)
    inspected = api.predict(
        out / "export", folder, out / "inspect", backend="onnx", progress=progress
    )
    return {
        "model": run.config.model,
        "image_auroc": metrics["image_auroc"],
        "image_ap": metrics["image_ap"],
        "report": str(eval_dir / "report.html"),
        "onnx_max_score_diff": export["check"]["max_abs_score_diff"],
        "inspected": inspected["n_total"],
        "inspected_defective": inspected["n_defect"],
        "inspect_images_per_second": inspected["images_per_second"],
        "inspect_resumed": inspected["n_resumed"],
        "inspect_results": str(out / "inspect" / "scores.csv"),
        "seconds": time.perf_counter() - started,
    }
