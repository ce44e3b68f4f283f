"""Area-ratio label files: ``path,area_ratio[,margin]`` CSVs, the weak labels that
``arearatio-gcn`` learns from (``data.area_ratio_csv``)."""

from __future__ import annotations

import csv
from pathlib import Path

from defectlab.errors import DataError


def read_area_ratio_csv(
    path: str | Path, root: str | Path | None = None
) -> dict[Path, tuple[float, float | None]]:
    """Read ``path,area_ratio[,margin]`` lines (an optional header starting ``path``, blank
    lines and ``#`` comments skipped) into {image path: (ratio, margin or None)}. Relative
    image paths are taken from ``root`` (default: the CSV's folder). Every error names the
    CSV file and line, so a typo in a long label file is quick to find."""
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    if not path.is_file():
        raise DataError(f"{path}: area-ratio CSV not found")
    out: dict[Path, tuple[float, float | None]] = {}
    with path.open(newline="", encoding="utf-8") as handle:
        for line_no, row in enumerate(csv.reader(handle), start=1):
            where = f"{path}, line {line_no}"
            fields = [field.strip() for field in row]
            if not fields or not any(fields) or fields[0].startswith("#"):
                continue
            if line_no == 1 and fields[0].lower() == "path":
                continue
            if len(fields) not in (2, 3) or not fields[0]:
                raise DataError(
                    f"{where}: expected 'path,area_ratio[,margin]', got {','.join(row)!r}"
                )
            try:
                ratio = float(fields[1])
                margin = float(fields[2]) if len(fields) == 3 and fields[2] else None
            except ValueError:
                raise DataError(
                    f"{where}: area ratio and margin must be numbers, got {row!r}"
                ) from None
            if not 0.0 <= ratio <= 1.0:
                raise DataError(f"{where}: area_ratio must be in [0, 1], got {ratio}")
            if margin is not None and not 0.0 <= margin < 0.5:
                raise DataError(f"{where}: margin must be in [0, 0.5), got {margin}")
            image = Path(fields[0])
            image = image if image.is_absolute() else base / image
            if not image.is_file():
                raise DataError(f"{where}: image file {image} not found")
            if image in out:
                raise DataError(f"{where}: {image} is listed twice")
            out[image] = (ratio, margin)
    return out
