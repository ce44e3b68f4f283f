"""Shared helpers of the benchmark scripts: results pages under ``docs/results/``, child jobs.

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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
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
