"""Area-ratio label CSVs: optional margins and headers, errors naming file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from defectlab.data.area_ratio import read_area_ratio_csv
from defectlab.errors import DataError


def _csv(tmp_path: Path, text: str) -> Path:
    (tmp_path / "img").mkdir(exist_ok=True)
    for name in ("a.png", "b.png"):
        (tmp_path / "img" / name).write_bytes(b"")
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_area_ratio_csv_is_read_with_optional_margins(tmp_path: Path) -> None:
    path = _csv(tmp_path, "path,area_ratio,margin\n# comment\nimg/a.png,0.25,0.05\n\nimg/b.png,0\n")
    assert read_area_ratio_csv(path) == {
        tmp_path / "img" / "a.png": (0.25, 0.05),
        tmp_path / "img" / "b.png": (0.0, None),
    }
    other = tmp_path / "elsewhere"
    other.mkdir()
    path2 = other / "labels.csv"
    path2.write_text("img/a.png,1.0\n")
    assert read_area_ratio_csv(path2, root=tmp_path) == {tmp_path / "img" / "a.png": (1.0, None)}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "path,area_ratio\nimg/a.png,0.2\nimg/missing.png,0.1\n",
            "line 3: image file .* not found",
        ),
        ("img/a.png,1.5\n", "line 1: area_ratio must be in \\[0, 1\\], got 1.5"),
        ("img/a.png,0.2\nimg/b.png\n", "line 2: expected 'path,area_ratio\\[,margin\\]'"),
        ("img/a.png,0.2,0.1,7\n", "line 1: expected"),
        ("img/a.png,lots\n", "line 1: area ratio and margin must be numbers"),
        ("img/a.png,0.2,0.7\n", "line 1: margin must be in"),
        ("img/a.png,0.2\nimg/a.png,0.3\n", "line 2: .* listed twice"),
    ],
)
def test_area_ratio_csv_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = _csv(tmp_path, text)
    with pytest.raises(DataError, match="labels.csv, " + message):
        read_area_ratio_csv(path)
    with pytest.raises(DataError, match="not found"):
        read_area_ratio_csv(tmp_path / "none.csv")
