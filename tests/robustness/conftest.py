"""The hostile corpus, built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.robustness.corpus import Case, build


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Case]]:
    folder = tmp_path_factory.mktemp("hostile")
    return folder, build(folder)
