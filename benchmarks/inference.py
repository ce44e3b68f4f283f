"""Inference speed: PyTorch eager vs ONNX Runtime for every exportable model, on real images.

For each model and image size a run is trained briefly on a small share of the bundled
ELPV solar cells (one epoch on ``--train-fraction`` of the normal cells: inference cost
depends on the architecture, not on how well it is trained, though a feature memory's size
does depend on the training images), exported to ONNX, and both backends score the same
real test cells through the same :class:`~defectlab.deploy.backends.Inspector` call
(float NHWC arrays in, scores and maps out). Per (model, size, backend, batch): images/s
and the p50/p99 latency of one batch call, with ``--threads`` CPU threads for both
backends. ``--int8`` adds the static int8 export (``defectlab export --quantize int8``,
calibrated on the run's normal validation images) as a third backend. Run it with nothing
else on the machine; runs and exports are cached in ``--out``.

``--serve MODEL``: the HTTP service's throughput under the load test instead: ``defectlab
serve`` on that model's run (``--serve-backend``, ``--sizes``' first size) in its own
process, ``--requests`` uploads of a real 300x300 ELPV cell PNG at ``--concurrency`` from
an asynchronous client; prints req/s, p50/p99 latency, the status counts and the server's
RSS before and after.

    .venv/bin/python benchmarks/inference.py --sizes 128 256 --threads 2 --out runs/inference
    .venv/bin/python benchmarks/inference.py --serve synth-unet --sizes 128 --out runs/inference
    .venv/bin/python benchmarks/inference.py --models synth-unet --sizes 256 --int8 \
        --set model.encoder=lite0 --out runs/inference
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from _common import add_write_docs, docs_key, markdown_table, write_section

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


#: epochs of the short speed-run training where one is not enough (deepsvdd: its
#: pre-training; memseg: the first epoch only builds the memory)
SPEED_RUN_EPOCHS = {"deepsvdd": 3, "memseg": 2}


def trained_run(model: str, size: int, args: argparse.Namespace) -> Path:
    from defectlab import api

    tag = "".join(f"-{option.replace('=', '_').replace(',', '_')}" for option in args.set)
    run_dir = args.out / f"{model}-{size}{tag}"
    if not (run_dir / api.MODEL_FILE).exists():
        overrides = [f"data.train_fraction={args.train_fraction}", "data.val_fraction=0.05"]
        overrides += args.set
        if model not in ("pixelstats", "patchmemory"):
            overrides.append(f"model.epochs={SPEED_RUN_EPOCHS.get(model, 1)}")
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


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load_test(url: str, body: bytes, total: int, concurrency: int) -> dict:
    import httpx

    async def run() -> dict:
        statuses: Counter[int] = Counter()
        latencies: list[float] = []
        remaining = iter(range(total))
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

            async def post() -> int:
                files = {"image": ("cell.png", body, "image/png")}
                return (await client.post("/inspect", files=files)).status_code

            for _ in range(concurrency):  # warm-up
                await post()

            async def worker() -> None:
                for _ in remaining:
                    started = time.perf_counter()
                    statuses[await post()] += 1
                    latencies.append(time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - started
        ms = np.array(latencies) * 1e3
        return {
            "requests": total,
            "concurrency": concurrency,
            "requests_per_second": total / elapsed,
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "statuses": dict(statuses),
        }

    return asyncio.run(run())


def serve_benchmark(args: argparse.Namespace) -> dict:
    import cv2
    import httpx

    from defectlab.data.io import to_uint8

    size = args.sizes[0]
    run_dir = trained_run(args.serve, size, args)
    if args.serve_backend == "onnx" and not (run_dir / "export" / "metadata.json").exists():
        from defectlab.deploy.onnx import export_onnx

        export_onnx(run_dir)
    png = cv2.imencode(".png", to_uint8(test_cells(300, 1)[0]))[1]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | {"OMP_NUM_THREADS": str(args.threads)}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "defectlab",
            "serve",
            "--run",
            str(run_dir),
            "--port",
            str(port),
            "--backend",
            args.serve_backend,
            "--device",
            "cpu",
        ],
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        else:
            raise RuntimeError(f"the service did not start on {url}")
        before = rss_mb(server.pid)
        result = load_test(url, png.tobytes(), args.requests, args.concurrency)
        result |= {
            "model": args.serve,
            "size": size,
            "backend": args.serve_backend,
            "server_rss_mb_before": before,
            "server_rss_mb_after": rss_mb(server.pid),
        }
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(
        f"service {args.serve} ({args.serve_backend}, {size} px): {result['requests']} "
        f"requests at concurrency {result['concurrency']}: "
        f"{result['requests_per_second']:.1f} req/s, p50 {result['p50_ms']:.0f} ms, "
        f"p99 {result['p99_ms']:.0f} ms, statuses {result['statuses']}, server RSS "
        f"{result['server_rss_mb_before']:.0f} → {result['server_rss_mb_after']:.0f} MB"
    )
    return result


def docs_section_key(args: argparse.Namespace) -> str:
    """The results-page section of this invocation: its sizes, models, int8 and settings."""
    if args.serve:
        return docs_key("serve", args.serve, args.serve_backend, args.sizes[0])
    models = [] if args.models == DEFAULT_MODELS else args.models
    return docs_key("inference", *args.sizes, *models, "int8" if args.int8 else "", *args.set)


def write_docs_speed(args: argparse.Namespace, results: list[dict], names: list[str]) -> None:
    """``--write-docs``: images/s (p50 ms) per model, size, batch and backend."""
    table = []
    for row in results:
        cells = {"model": f"`{row['model']}`", "size": row["size"], "batch": row["batch"]}
        for name in names:
            timing = row.get(name)
            cells[name] = (
                f"{timing['images_per_second']:.1f} ({timing['p50_ms']:.0f} ms)"
                if timing
                else "refused"
            )
        cells["speedup"] = ", ".join(f"{n} {v:.1f}×" for n, v in row["speedup"].items())
        table.append(cells)
    columns = [("model", "model", str), ("size", "px", str), ("batch", "batch", str)]
    columns += [(n, f"{n} images/s (p50)", str) for n in names]
    columns += [("speedup", "speed-up over torch", str)]
    path = write_section(
        args.write_docs,
        docs_section_key(args),
        f"Inference speed, {' and '.join(map(str, args.sizes))} px, {args.threads} threads",
        markdown_table(table, columns),
        notes=(
            "Images/s of one `Inspector.score` call on real ELPV cells (decoded beforehand) and "
            f"its p50 latency; runs trained on {args.train_fraction:.0%} of the normal cells "
            "(one epoch where a model has epochs)."
        ),
    )
    print(f"results → {path}")


def write_docs_serve(args: argparse.Namespace, result: dict) -> None:
    """``--write-docs`` with ``--serve``: the load test's throughput, latency and RSS."""
    row = result | {"statuses": ", ".join(f"{k}: {v}" for k, v in result["statuses"].items())}
    columns = [
        ("model", "model", str),
        ("backend", "backend", str),
        ("requests", "requests", str),
        ("concurrency", "concurrency", str),
        ("requests_per_second", "requests/s", lambda v: f"{v:.1f}"),
        ("p50_ms", "p50 ms", lambda v: f"{v:.0f}"),
        ("p99_ms", "p99 ms", lambda v: f"{v:.0f}"),
        ("statuses", "statuses", str),
        ("server_rss_mb_before", "server RSS before, MB", lambda v: f"{v:.0f}"),
        ("server_rss_mb_after", "after, MB", lambda v: f"{v:.0f}"),
    ]
    path = write_section(
        args.write_docs,
        docs_section_key(args),
        f"HTTP service under load: {args.serve}, {args.serve_backend} backend",
        markdown_table([row], columns),
        notes="`defectlab serve` in its own process; uploads of a 300×300 ELPV cell PNG.",
    )
    print(f"results → {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--sizes", nargs="+", type=int, default=[128, 256])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-fraction", type=float, default=0.05)
    parser.add_argument("--calls", type=int, default=0, help="timed calls (default by batch)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="model options of every timed run (e.g. model.encoder=lite0); part of its folder name",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/inference"))
    parser.add_argument(
        "--int8", action="store_true", help="also time a static int8 export (export-int8/)"
    )
    parser.add_argument("--serve", metavar="MODEL", help="load-test the HTTP service instead")
    parser.add_argument("--serve-backend", choices=("torch", "onnx"), default="torch")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    add_write_docs(parser, "inference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.serve:
        result = serve_benchmark(args)
        args.out.mkdir(parents=True, exist_ok=True)
        name = f"service-{args.serve}-{args.serve_backend}-{args.sizes[0]}.json"
        (args.out / name).write_text(json.dumps({"command": " ".join(sys.argv), **result}))
        if args.write_docs:
            write_docs_serve(args, result)
        return
    from defectlab.deploy.backends import onnx_inspector, torch_inspector
    from defectlab.deploy.onnx import export_onnx
    from defectlab.errors import DefectlabError
    from defectlab.runs import environment_info

    names = ["torch", "onnx", *(["onnx-int8"] if args.int8 else [])]
    results = []
    print(
        f"{'model':<16} {'size':>4} {'batch':>5} "
        + " ".join(f"{n + ' img/s':>15} {'p50 ms':>7} {'p99 ms':>7}" for n in names)
        + " speed-up over torch"
    )
    for size in args.sizes:
        cells = test_cells(size, max(args.batches))
        for model in args.models:
            run_dir = trained_run(model, size, args)
            exports = {}
            wanted = {"onnx": (run_dir / "export", None)}
            if args.int8:
                wanted["onnx-int8"] = (run_dir / "export-int8", "int8")
            for name, (folder, quantize) in wanted.items():
                try:
                    if not (folder / "metadata.json").exists():
                        export_onnx(run_dir, folder, quantize=quantize)
                    exports[name] = (folder, quantize)
                except DefectlabError as exc:  # e.g. int8 refused: masks changed too much
                    print(f"{model:<16} {size:>4} no {name} export: {exc}", file=sys.stderr)
            if "onnx" not in exports:
                continue
            backends = {"torch": torch_inspector(run_dir, "cpu")} | {
                name: onnx_inspector(folder, threads=args.threads)
                for name, (folder, _) in exports.items()
            }
            for batch in args.batches:
                calls = args.calls or (50 if batch == 1 else 5)
                row = {"model": model, "size": size, "batch": batch, "threads": args.threads}
                for name, inspector in backends.items():
                    row[name] = time_calls(inspector.score, cells, batch, calls)
                base = row["torch"]["images_per_second"]
                row["speedup"] = {n: row[n]["images_per_second"] / base for n in exports}
                results.append(row)
                print(
                    f"{model:<16} {size:>4} {batch:>5} "
                    + " ".join(
                        f"{row[n]['images_per_second']:>15.1f} {row[n]['p50_ms']:>7.1f} "
                        f"{row[n]['p99_ms']:>7.1f}"
                        if n in row
                        else f"{'refused':>15} {'':>7} {'':>7}"
                        for n in names
                    )
                    + " "
                    + " ".join(f"{n} {v:.2f}x" for n, v in row["speedup"].items()),
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
    if args.write_docs:
        write_docs_speed(args, results, names)


if __name__ == "__main__":
    main()
