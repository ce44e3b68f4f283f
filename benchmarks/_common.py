"""Shared helpers of the benchmark scripts: results pages under ``docs/results/``, child jobs,
held-out images and the segmentation metrics several benchmarks report.

A results page is written by the benchmarks themselves, never by hand. Each benchmark
invocation owns one *section* of a page, delimited by HTML comments that carry its key; a
rerun with the same key replaces that section in place and leaves the others alone, so a page
can gather several benchmarks and stays current without hand edits. Every section states the
command that produced it, the date and the machine.

    from _common import add_write_docs, markdown_table, write_section

    write_section(args.write_docs, "detection-magnetic-tile", "Magnetic tile",
                  markdown_table(rows, COLUMNS), notes="Split MT-normal-only v1.")
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

ROOT = Path(__file__).resolve().parents[1]
#: the magnetic-tile folder of the standard set-up (``../shared/data`` beside the repository)
DEFAULT_DATA = "../shared/data/magnetic-tile"
RESULTS_DIR = ROOT / "docs" / "results"
_BEGIN = "<!-- section: {key} -->"
_END = "<!-- end section: {key} -->"
_KEY = re.compile(r"^[A-Za-z0-9_.+-]+$")

#: one table column: (row key, header, formatter of the value)
Column = tuple[str, str, Callable[[Any], str]]


def fmt_number(digits: int = 3) -> Callable[[Any], str]:
    """A formatter that prints floats with ``digits`` decimals and ``n/a`` for missing values."""

    def fmt(value: Any) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return "n/a"
        if isinstance(value, float):
            return f"{value:.{digits}f}"
        return str(value)

    return fmt


def markdown_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub-flavoured Markdown table of ``rows`` with the given columns."""
    lines = [
        "| " + " | ".join(header for _, header, _ in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(key)) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def docs_key(*parts: object) -> str:
    """A section key from ``parts``: empty parts dropped, each lower-cased, every run of other
    characters than letters, digits and ``_.+`` turned into one ``-``.

    >>> docs_key("inference", 128, 256, "int8", None, "model.encoder=lite0")
    'inference-128-256-int8-model.encoder-lite0'
    """
    words = [re.sub(r"[^a-z0-9_.+]+", "-", str(p).lower()).strip("-") for p in parts if p != ""]
    return "-".join(w for w in words if w and w != "none")


def invocation() -> str:
    """The command line of this process as a user would type it from the repository root."""
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(ROOT))
    except ValueError:
        script_text = str(script)
    return shlex.join([".venv/bin/python", script_text, *sys.argv[1:]])


def machine() -> str:
    """A one-line description of the machine the numbers were measured on."""
    threads = os.environ.get("OMP_NUM_THREADS")
    extra = f", OMP_NUM_THREADS={threads}" if threads else ""
    python = platform.python_version()
    return f"{platform.machine()}, {os.cpu_count()} CPU cores{extra}, Python {python}"


def render_section(
    key: str,
    title: str,
    body: str,
    *,
    command: str | None = None,
    notes: str = "",
    date: str | None = None,
    machine_text: str | None = None,
) -> str:
    """The Markdown text of one section: title, the table or text, its command, date, machine.

    ``date`` and ``machine_text`` default to today (UTC) and this machine; they are given
    only when a section records a measurement made earlier or elsewhere (a GPU run).
    """
    if not _KEY.match(key):
        raise ValueError(f"section key {key!r} must match {_KEY.pattern}")
    date = date or _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d")
    parts = [
        _BEGIN.format(key=key),
        f"### {title}",
        "",
        body.strip(),
        "",
    ]
    if notes:
        parts += [notes.strip(), ""]
    parts += [
        f"Measured {date} on {machine_text or machine()} with:",
        "",
        "```bash",
        command or invocation(),
        "```",
        _END.format(key=key),
    ]
    return "\n".join(parts)


def write_section(
    page: str | Path,
    key: str,
    title: str,
    body: str,
    *,
    command: str | None = None,
    notes: str = "",
    page_title: str | None = None,
    date: str | None = None,
    machine_text: str | None = None,
) -> Path:
    """Replace section ``key`` of results page ``page`` (created when absent), atomically.

    ``page`` is a path, or a bare name such as ``detection`` for ``docs/results/detection.md``.
    """
    path = Path(page)
    if path.suffix != ".md":
        path = RESULTS_DIR / f"{page}.md"
    section = render_section(
        key, title, body, command=command, notes=notes, date=date, machine_text=machine_text
    )
    if path.exists():
        text = path.read_text(encoding="utf-8")
    else:
        heading = page_title or path.stem.replace("_", " ").replace("-", " ").capitalize()
        text = (
            f"# {heading}\n\n"
            "Written by the benchmark scripts (`--write-docs`); a rerun replaces its own "
            "section. Do not edit by hand.\n"
        )
    begin, end = _BEGIN.format(key=key), _END.format(key=key)
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def add_write_docs(parser: argparse.ArgumentParser, default_page: str) -> None:
    """Add ``--write-docs [PAGE]``: write the results into ``docs/results/PAGE.md``."""
    parser.add_argument(
        "--write-docs",
        nargs="?",
        const=default_page,
        default=None,
        metavar="PAGE",
        help=f"write the results table into docs/results/ (default page: {default_page})",
    )


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def job_rows(command: list[str], label: str) -> list[dict[str, Any]] | None:
    """Run one child job; its JSON rows (echoed as they come), or ``None`` when it failed
    (reported on stderr with ``label``)."""
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        print(f"FAILED: {label} (exit {done.returncode})", file=sys.stderr)
        return None
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def fmt_fixed(value: Any, width: int, digits: int = 4) -> str:
    """``value`` right-aligned in ``width`` with ``digits`` decimals; ``n/a`` for ``None``."""
    if value is None:
        return f"{'n/a':>{width}}"
    return f"{value:>{width}.{digits}f}"


def overlap_metrics(masks: np.ndarray, maps: np.ndarray, threshold: float) -> dict[str, float]:
    """Micro and per-image-mean Dice / IoU of ``maps >= threshold`` against ``masks``."""
    import numpy as np

    from defectlab.evaluate.metrics import dice_iou

    predicted = maps >= threshold
    dice, iou = dice_iou(masks, predicted)
    per_image = np.array([dice_iou(m, p) for m, p in zip(masks, predicted, strict=True)])
    return {
        "dice": dice,
        "iou": iou,
        "dice_mean": float(per_image[:, 0].mean()),
        "iou_mean": float(per_image[:, 1].mean()),
    }


def segmentation_metrics(
    masks: np.ndarray,
    maps: np.ndarray,
    threshold: float,
    types: list[str],
    model_threshold: float | None = None,
) -> dict[str, Any]:
    """All overlap metrics of one model on the held-out defect images; ``model_threshold``:
    the pixel threshold the model fixes itself, if any (``dice_model_rule``)."""
    import numpy as np

    from defectlab.evaluate.metrics import best_dice_threshold, dice_iou, pixel_auroc

    result: dict[str, Any] = {"pixel_threshold": float(threshold)}
    result |= overlap_metrics(masks, maps, threshold)
    _, oracle = best_dice_threshold(masks, maps)
    result["pixel_threshold_oracle"] = oracle
    result |= {f"{k}_oracle": v for k, v in overlap_metrics(masks, maps, oracle).items()}
    if model_threshold is not None:
        result["pixel_threshold_model_rule"] = float(model_threshold)
        result["dice_model_rule"] = dice_iou(masks, maps >= model_threshold)[0]
    result["pixel_auroc_defect"] = pixel_auroc(masks, maps)
    predicted = maps >= threshold
    by_type: dict[str, list[float]] = {}
    for kind, m, p in zip(types, masks, predicted, strict=True):
        by_type.setdefault(kind, []).append(dice_iou(m, p)[0])
    result["dice_mean_by_type"] = {k: round(float(np.mean(v)), 4) for k, v in by_type.items()}
    return result


def held_out(split: Any, run_config: Any, defects: bool = True) -> Any:
    """The split's test defect images that have a mask (or its normal test images), loaded
    like ``api.evaluate`` does."""
    from defectlab.data.layouts import DEFECT, NORMAL
    from defectlab.data.loading import load_samples

    if defects:
        samples = [s for s in split["test"] if s.label == DEFECT and s.mask_path is not None]
    else:
        samples = [s for s in split["test"] if s.label == NORMAL]
    data = run_config.data
    return load_samples(
        samples,
        data.image_size,
        data.channels,
        data.mask_threshold,
        workers=data.workers,
        desc="loading held-out images",
        progress=False,
    )


def train_or_reuse(
    args: argparse.Namespace, model: str, data: str, run_dir: Path, options: list[str]
) -> float:
    """Train into ``run_dir`` unless it holds a finished run; the training seconds."""
    import time

    from defectlab import api

    if (run_dir / api.MODEL_FILE).exists():
        print(f"reusing trained run {run_dir}", file=sys.stderr)
        return float(json.loads((run_dir / "metrics.json").read_text())["train_seconds"])
    started = time.perf_counter()
    api.train(
        model,
        data,
        run_dir,
        image_size=args.image_size,
        seed=args.seed,
        device=args.device,
        overrides=options,
    )
    return round(time.perf_counter() - started, 1)


def content_statistics(images: np.ndarray) -> torch.Tensor:
    """:func:`defectlab.detect.nuisance.image_statistics` (N, 5) of images (N, H, W, C) in
    [0, 1], as loaded by :func:`defectlab.data.loading.load_samples`."""
    import numpy as np
    import torch

    from defectlab.detect.nuisance import image_statistics

    tensor = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return torch.cat([image_statistics(chunk) for chunk in tensor.split(64)])


def dataset_split(data_config: Any) -> Any:
    """The :class:`~defectlab.data.splits.Split` that training with ``data_config`` (a run
    config's ``data`` section) makes: :func:`defectlab.api.dataset_split` without the
    dataset."""
    from defectlab import api

    return api.dataset_split(data_config)[1]
