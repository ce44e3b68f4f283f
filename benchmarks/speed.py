"""Throughput on an idle machine: procedural synthesis and segmentation-network inference.

Prediction cost of the segmentation networks does not depend on their weights, so untrained
networks are timed (no data needed). Run it with nothing else on the machine.

    .venv/bin/python benchmarks/speed.py --size 256 --threads 2
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import add_write_docs, docs_key, markdown_table, write_section

from defectlab import registry
from defectlab.synth.procedural import ProceduralSynthesizer


def synthesis_rate(size: int, n: int) -> float:
    rng = np.random.default_rng(0)
    x = np.mgrid[0:size, 0:size][1]
    images = [
        np.clip(0.5 + 0.1 * np.sin(x / 7.0 + i) + rng.normal(0, 0.02, (size, size)), 0, 1).astype(
            np.float32
        )[..., None]
        for i in range(16)
    ]
    synthesizer = ProceduralSynthesizer()
    list(synthesizer.generate(images, 8, seed=0))  # warm-up
    started = time.perf_counter()
    for _ in synthesizer.generate(images, n, seed=1):
        pass
    return n / (time.perf_counter() - started)


def predict_rate(model: str, size: int, batch: int, repeats: int) -> float:
    net = registry.get(model)(image_size=size)
    net.is_fitted = True  # inference cost does not depend on the weights' values
    images = torch.rand(batch, 1, size, size)
    with torch.no_grad():
        net.predict(images[:2])  # warm-up
        started = time.perf_counter()
        for _ in range(repeats):
            net.predict(images)
    return batch * repeats / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["synth-unet", "synth-unet3plus"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 32])
    add_write_docs(parser, "inference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    synthesis = synthesis_rate(args.size, 200)
    print(f"procedural synthesis, {args.size}x{args.size} grey: {synthesis:.1f} images/s")
    rows = [{"what": f"procedural synthesis, {args.size}×{args.size} grey", "rate": synthesis}]
    for model in args.models:
        for batch in args.batch:
            rate = predict_rate(model, args.size, batch, repeats=max(1, 64 // batch))
            print(
                f"{model} predict, {args.size} px, batch {batch}, {args.threads} threads: "
                f"{rate:.1f} images/s"
            )
            rows.append({"what": f"`{model}` predict, {args.size} px, batch {batch}", "rate": rate})
    if args.write_docs:
        path = write_section(
            args.write_docs,
            docs_key("speed", args.size),
            f"Synthesis and PyTorch inference speed, {args.size} px, {args.threads} threads",
            markdown_table(rows, [("what", "what", str), ("rate", "images/s", "{:.1f}".format)]),
        )
        print(f"results → {path}")


if __name__ == "__main__":
    main()
