"""The user documentation and the results pages the benchmark scripts write."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"


def load_common():
    spec = importlib.util.spec_from_file_location("_common", ROOT / "benchmarks" / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_short_and_links_exist() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\((docs/[^)#]+)\)", text):
        if target in ("docs/models/deepsvdd.md", "docs/models/mlaae.md"):
            continue  # written by other work in progress
        assert (ROOT / target).exists(), target


def test_write_section_replaces_only_its_own_section(tmp_path: Path) -> None:
    common = load_common()
    page = tmp_path / "page.md"
    common.write_section(page, "a", "A", "| x |\n|---|\n| 1 |", command="run a")
    common.write_section(
        page, "b", "B", "text b", command="run b", date="2026-01-02", machine_text="somewhere"
    )
    common.write_section(page, "a", "A", "| x |\n|---|\n| 2 |", command="run a")
    text = page.read_text(encoding="utf-8")
    assert text.count("<!-- section: a -->") == 1 and "| 2 |" in text and "| 1 |" not in text
    assert "Measured 2026-01-02 on somewhere with:" in text
    assert text.index("section: a") < text.index("section: b")


def test_docs_key() -> None:
    common = load_common()
    assert common.docs_key("serve", "synth-unet", "onnx", 128) == "serve-synth-unet-onnx-128"
    assert common.docs_key("x", "", None, "score_levels=1,2") == "x-score_levels-1-2"


@pytest.mark.parametrize(
    "page", sorted(p.name for p in RESULTS.glob("*.md") if p.name != "README.md")
)
def test_results_pages_are_well_formed_sections(page: str) -> None:
    text = (RESULTS / page).read_text(encoding="utf-8")
    begins = re.findall(r"<!-- section: (\S+) -->", text)
    ends = re.findall(r"<!-- end section: (\S+) -->", text)
    assert begins and begins == ends and len(set(begins)) == len(begins)
    for key in begins:
        body = text.split(f"<!-- section: {key} -->", 1)[1].split(f"<!-- end section: {key} -->")[0]
        assert re.search(
            r"Measured \d{4}-\d{2}-\d{2} on .+ with:\n\n```bash\n.+\n```\n$", body, re.S
        ), key
