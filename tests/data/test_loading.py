from pathlib import Path

import numpy as np
import pytest

from defectlab.data.layouts import load_dataset
from defectlab.data.loading import load_samples
from defectlab.errors import DataError
from tests.conftest import write_image


def test_bad_files_are_skipped_and_reported(folder_root: Path, capsys) -> None:
    (folder_root / "normal" / "n03.png").write_bytes(b"")
    (folder_root / "normal" / "n04.png").write_bytes(b"garbage bytes")
    ds = load_dataset(folder_root)
    loaded = load_samples(ds.samples, 32, progress=False)
    assert len(loaded.samples) == len(ds.samples) - 2
    assert loaded.images.shape == (len(ds.samples) - 2, 32, 32, 1)
    assert sorted(Path(p).name for p, _ in loaded.failures) == ["n03.png", "n04.png"]
    err = capsys.readouterr().err
    assert "n03.png: empty file" in err and "2 of 26 files skipped" in err


def test_masks_are_loaded_resized_and_binary(folder_root: Path) -> None:
    ds = load_dataset(folder_root)
    loaded = load_samples(ds.defect, 24, progress=False)
    assert loaded.masks.dtype == bool and loaded.masks.shape == (6, 24, 24)
    assert all(m.any() for m in loaded.masks)


def test_mask_of_wrong_size_is_an_error_naming_it(folder_root: Path) -> None:
    write_image(folder_root / "masks" / "d00.png", np.zeros((10, 10), np.uint8))
    ds = load_dataset(folder_root)
    with pytest.raises(DataError, match=r"d00\.png: mask is 10x10 but its image .* is 48x48"):
        load_samples(ds.defect, 24, progress=False)


def test_all_unreadable_is_an_error(tmp_path: Path) -> None:
    for i in range(3):
        write_image(tmp_path / "normal" / f"{i}.png", np.zeros((8, 8), np.uint8))
        (tmp_path / "normal" / f"{i}.png").write_bytes(b"x")
    ds = load_dataset(tmp_path)
    with pytest.raises(DataError, match="none of the 3 images could be read"):
        load_samples(ds.samples, 16, progress=False)
