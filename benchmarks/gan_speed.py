"""Seconds per CrossGAN (or CycleGAN) training step, and where they go.

Builds the model with the given ``--set`` options, trains on random tiles (timing does not
depend on content) in batches of ``--batch`` (half normal, half defect, as the trainer's
pairing gives them), and prints per configuration: s/step over ``--steps`` steps after two
warm-up steps, the steps a 30-minute budget allows, the 1-minute load average before and after
(the machine may be shared), the process's CPU seconds per step (on a shared machine
the better guide to what an unshared one gives: ``steps_in_30_min_unshared`` = 1800 ×
threads / CPU s per step, an estimate that assumes the threads scale perfectly), and with
``--profile`` the torch-profiler operators with the most
self CPU time over ``--profile-steps`` steps.

    .venv/bin/python benchmarks/gan_speed.py --image-size 64 128 --steps 5 --profile
    .venv/bin/python benchmarks/gan_speed.py --image-size 64 --steps 20 \\
        --set width=16 --set disc_scales=2 --set disc_layers=3   # the CPU configuration
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from _common import add_write_docs, docs_key, fmt_number, markdown_table, write_section


def make_model(name: str, size: int, options: list[str]):
    from defectlab import registry
    from defectlab.config import apply_overrides

    cls = registry.get(name)
    config = apply_overrides(cls.Config(), dict(o.split("=", 1) for o in options), "")
    torch.manual_seed(0)
    return cls(config, image_size=size, channels=1)


def batch(size: int, n: int) -> dict[str, torch.Tensor]:
    return {
        "image": torch.rand(n, 1, size, size),
        "label": torch.tensor([0] * (n // 2) + [1] * (n - n // 2)),
        "mask": torch.zeros(n, size, size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="crossgan", choices=["crossgan", "cyclegan"])
    parser.add_argument("--image-size", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    add_write_docs(parser, "synthesis")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.image_size:
        model = make_model(args.model, size, args.set)
        data = batch(size, args.batch)
        for _ in range(2):
            model.training_step(data)
        load_before = os.getloadavg()[0]
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(args.steps):
            model.training_step(data)
        seconds = (time.perf_counter() - started) / args.steps
        cpu_seconds = (time.process_time() - cpu_started) / args.steps
        row = {
            "model": args.model,
            "image_size": size,
            "options": " ".join(args.set) or "defaults",
            "batch": args.batch,
            "threads": args.threads,
            "s_per_step": seconds,
            "cpu_s_per_step": cpu_seconds,
            "steps_in_30_min": int(1800 / seconds),
            "steps_in_30_min_unshared": int(1800 * args.threads / cpu_seconds),
            "load_before": load_before,
            "load_after": os.getloadavg()[0],
            "parameters": sum(model.parameter_counts().values()),
        }
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.profile_steps):
                    model.training_step(data)
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
            print(
                f"--- {args.model} {size} px: top operators by self CPU time "
                f"({args.profile_steps} steps)"
            )
            print(table)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}))
        rows.append(row)
    if args.write_docs:
        columns = [
            ("model", "model", str),
            ("image_size", "px", str),
            ("options", "settings", str),
            ("batch", "batch", str),
            ("s_per_step", "s/step", fmt_number(2)),
            ("steps_in_30_min", "steps in 30 min", str),
            ("cpu_s_per_step", "CPU s/step", fmt_number(2)),
            ("steps_in_30_min_unshared", "steps in 30 min, unshared (CPU-time bound)", str),
            ("load_before", "load (1 min) before", fmt_number(1)),
            ("load_after", "after", fmt_number(1)),
        ]
        path = write_section(
            args.write_docs,
            docs_key("gan-speed", args.model, *args.set),
            f"Training speed: {args.model}, {' '.join(args.set) or 'defaults'}",
            markdown_table(rows, columns),
            notes=(
                "Random tiles, one channel; s/step (wall) and CPU s/step of the process after two "
                "warm-up steps; load: the 1-minute load average of the machine (2 cores), which "
                "others share, so wall times are upper bounds and the unshared step count is "
                "estimated from CPU time."
            ),
        )
        print(f"results → {path}")


if __name__ == "__main__":
    main()
