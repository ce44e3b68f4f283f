"""``defectlab train --model auto``: candidates scored on painted normal validation images."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from defectlab import api, selection
from defectlab.cli import main
from defectlab.components.painting import ProceduralConfig
from defectlab.errors import ConfigError, DataError
from defectlab.runs import load_run, predict_arrays
from defectlab.selection import Scored, SelectionConfig
from tests.conftest import write_folder_dataset

#: two cheap candidates: a statistics model and a tiny patch memory
CANDIDATES = "selection.candidates=pixelstats,patchmemory:memory_bank_size=256/coreset_ratio=0.5"
OPTIONS = [CANDIDATES, "train.batch_size=8", "selection.rule=synthetic"]


def run_auto(data: Path, out: Path, seed: int = 0, extra: list[str] | None = None) -> Any:
    return selection.select(
        data, out, image_size=32, seed=seed, overrides=[*OPTIONS, *(extra or [])], progress=False
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder_dataset(
        tmp_path_factory.mktemp("auto") / "data", np.random.default_rng(3), 20, 4, size=48
    )


@pytest.fixture(scope="module")
def loaded_paths() -> list[Path]:
    return []


@pytest.fixture(scope="module")
def chosen(data: Path, tmp_path_factory: pytest.TempPathFactory, loaded_paths: list[Path]) -> Any:
    """One selection, recording every image file the data loader is asked for."""
    original = api.load_images
    patch = pytest.MonkeyPatch()

    def recording(samples: Any, *args: Any, **kwargs: Any) -> Any:
        loaded_paths.extend(Path(s.path) for s in samples)
        return original(samples, *args, **kwargs)

    patch.setattr(api, "load_images", recording)
    try:
        return run_auto(data, tmp_path_factory.mktemp("auto-run") / "run")
    finally:
        patch.undo()


def test_chosen_run_loads_and_predicts(chosen: Any) -> None:
    run = load_run(chosen.run.run_dir, "cpu")
    images = np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)
    scores, maps = predict_arrays(run.model, images)
    assert scores.shape == (2,) and maps.shape == (2, 32, 32)
    config = json.loads((chosen.run.run_dir / "config.json").read_text())
    assert config["resolved"]["model"]["value"] == chosen.chosen
    assert chosen.chosen in (chosen.run.run_dir / "log.txt").read_text()
    assert run.config.model in ("pixelstats", "patchmemory", "ensemble")


def test_selection_csv_has_one_row_per_candidate(chosen: Any) -> None:
    with (chosen.run.run_dir / selection.SELECTION_CSV).open(newline="") as f:
        rows = list(csv.DictReader(f))
    names = [r["candidate"] for r in rows]
    assert names[:2] == ["pixelstats", "patchmemory-memory_bank_size-256-coreset_ratio-0.5"]
    assert len(rows) == 3 and names[2].startswith("ensemble-")  # the two best, fused
    assert sum(int(r["chosen"]) for r in rows) == 1
    for row in rows:
        assert 0.0 <= float(row["synthetic_auroc"]) <= 1.0
        assert float(row["images_per_second"]) > 0 and float(row["size_mb"]) > 0


def test_selection_never_reads_test_images(
    chosen: Any, data: Path, loaded_paths: list[Path]
) -> None:
    _, split = api.dataset_split(chosen.run.config.data)
    val = [Path(s.path) for s in split["val"]]
    test = {Path(s.path) for s in split["test"]}
    assert chosen.scored_paths == val and len(val) >= 1
    assert loaded_paths and not test & set(loaded_paths)
    assert set(loaded_paths) <= {Path(s.path) for s in split["train"]} | set(val)


def test_same_seed_same_choice(chosen: Any, data: Path, tmp_path: Path) -> None:
    again = run_auto(data, tmp_path / "again")
    assert again.chosen == chosen.chosen
    assert [c.synthetic_auroc for c in again.candidates] == [
        c.synthetic_auroc for c in chosen.candidates
    ]
    assert [c.synthetic_pixel_auroc for c in again.candidates] == [
        c.synthetic_pixel_auroc for c in chosen.candidates
    ]


def test_interrupted_selection_resumes_to_the_same_choice(
    chosen: Any, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    original = selection._train_and_score
    calls = {"n": 0}

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 2:  # Ctrl-C while the second candidate trains
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(selection, "_train_and_score", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_auto(data, out)
    monkeypatch.setattr(selection, "_train_and_score", original)
    assert (out / selection.CANDIDATES_DIR / "pixelstats" / "model.pt").exists()
    with pytest.raises(ConfigError, match="--resume"):
        run_auto(data, out)
    resumed = selection.select(
        data, out, image_size=32, overrides=OPTIONS, progress=False, resume=True
    )
    assert [c.status for c in resumed.candidates][:2] == ["reused", "trained"]
    assert resumed.chosen == chosen.chosen
    assert [c.synthetic_auroc for c in resumed.candidates] == [
        c.synthetic_auroc for c in chosen.candidates
    ]
    # with data.image_size=auto the finished candidate is recognised at its resolved size
    auto = tmp_path / "auto"
    options = ["selection.candidates=pixelstats,template", "selection.ensemble=false"]
    monkeypatch.setattr(selection, "_train_and_score", interrupted)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        selection.select(data, auto, overrides=options, progress=False)
    monkeypatch.setattr(selection, "_train_and_score", original)
    again = selection.select(data, auto, overrides=options, progress=False, resume=True)
    assert [c.status for c in again.candidates] == ["reused", "trained"]
    assert again.run.config.data.image_size == 128  # pixel models' auto size


def test_too_few_normal_images_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    few = write_folder_dataset(tmp_path / "few", np.random.default_rng(0), 8, 2, size=32)
    with pytest.raises(DataError, match="needs at least 8 normal training images"):
        run_auto(few, tmp_path / "run")
    code = main(["train", "--model", "auto", "--data", str(few), "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "needs at least 8 normal training images" in err
    assert not (tmp_path / "cli" / "model.pt").exists()


def test_cli_auto_prints_choice_and_summary(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cli"
    argv = ["train", "--model", "auto", "--data", str(data), "--out", str(out)]
    argv += ["--image-size", "32", "--set", "selection.rule=synthetic"]
    argv += ["--set", "selection.candidates=pixelstats"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2].startswith("model=auto → pixelstats: highest synthetic-validation AUROC")
    assert lines[-1].startswith("auto chose pixelstats of 1 candidates")
    assert (out / "model.pt").exists() and (out / "selection.csv").exists()
    code = main([*argv[:-4], "--set", "blur_sigma=2"])
    assert code == 2 and "model settings belong to a candidate" in capsys.readouterr().err


def scored(name: str, value: float) -> Scored:
    return Scored(name, name, Path(name), "trained", synthetic_auroc=value)


def test_ensemble_wins_only_when_strictly_better() -> None:
    config = SelectionConfig(rule="synthetic")
    tie = [scored("a", 0.9), scored("b", 0.8), scored("ensemble-a+b", 0.9)]
    assert selection._choose(tie, config, ("scratch",), 10)[0].name == "a"
    better = [scored("a", 0.9), scored("b", 0.8), scored("ensemble-a+b", 0.91)]
    winner, reason = selection._choose(better, config, ("scratch",), 10)
    assert winner.name == "ensemble-a+b" and "0.9100" in reason and "a 0.9000" in reason


def test_fixed_rule_trains_only_the_fixed_default(data: Path, tmp_path: Path) -> None:
    assert SelectionConfig().rule == "synthetic"
    assert SelectionConfig().fixed_default.startswith("patchmemory")
    first_two = ("patchmemory:backbone=lite0", "padim:backbone=lite0")
    assert SelectionConfig().candidates[:2] == first_two
    chosen = selection.select(
        data,
        tmp_path / "fixed",
        image_size=32,
        overrides=[CANDIDATES, "selection.rule=fixed", "selection.fixed_default=pixelstats"],
        progress=False,
    )
    assert [c.name for c in chosen.candidates] == ["pixelstats"]
    assert chosen.chosen == "pixelstats" and "rule=fixed" in chosen.reason


def test_selection_families_exclude_what_candidates_train_on() -> None:
    config = SelectionConfig()
    memseg = selection.Candidate.parse("memseg:shapes=scratch,crack")
    shapes = selection.selection_shapes(config, [memseg])
    assert "scratch" not in shapes and "crack" not in shapes and "bezier_blob" in shapes
    assert set(shapes) == set(ProceduralConfig().shapes) - {"scratch", "crack"}
    with pytest.raises(ConfigError, match="none is left to score them on"):
        selection.selection_shapes(config, [selection.Candidate.parse("memseg")])  # all shapes
    with pytest.raises(ConfigError, match="painted into a candidate's training data"):
        selection.selection_shapes(SelectionConfig(shapes=("scratch",)), [memseg])


def test_bad_settings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="model settings belong to a candidate"):
        selection.split_overrides(["backbone=lite1"])
    with pytest.raises(ConfigError, match="cannot be a candidate"):
        selection.Candidate.parse("ensemble")
    with pytest.raises(ConfigError, match="rule must be one of"):
        selection.split_overrides(["selection.rule=best"])
    config, shared = selection.split_overrides(["data.image_size=64", "selection.ensemble=false"])
    assert shared == ["data.image_size=64"] and config.ensemble is False


def test_budget_stops_new_candidates(data: Path, tmp_path: Path) -> None:
    budget = [
        "selection.candidates=pixelstats,pixelstats:blur_sigma=2",
        "selection.budget_seconds=1e-6",
        "selection.rule=synthetic",
    ]
    chosen = selection.select(data, tmp_path / "b", image_size=32, overrides=budget, progress=False)
    assert [c.status for c in chosen.candidates] == ["trained", "skipped: over budget"]
    assert chosen.chosen == "pixelstats"
    with (tmp_path / "b" / selection.SELECTION_CSV).open(newline="") as f:
        assert [r["synthetic_auroc"] for r in csv.DictReader(f)][1] == ""


def test_reused_runs_are_scored_not_retrained(chosen: Any, data: Path, tmp_path: Path) -> None:
    first, second = chosen.candidates[:2]  # pixelstats, the tiny patchmemory
    again = selection.select(
        data,
        tmp_path / "reuse",
        image_size=32,
        overrides=[*OPTIONS, "selection.ensemble=false"],
        progress=False,
        reuse={"pixelstats": first.run_dir},
    )
    assert [c.status for c in again.candidates] == ["reused", "trained"]
    assert again.candidates[0].synthetic_auroc == first.synthetic_auroc
    assert again.candidates[0].run_dir == first.run_dir
    only_reused = selection.select(
        data,
        tmp_path / "only" / "reused",  # nothing trains into it: the winner's copy creates it
        image_size=32,
        overrides=["selection.candidates=pixelstats", "selection.rule=synthetic"],
        progress=False,
        reuse={"pixelstats": first.run_dir},
    )
    assert (tmp_path / "only" / "reused" / "model.pt").exists() and only_reused.chosen
    with pytest.raises(ConfigError, match="cannot reuse it for pixelstats: it differs in model"):
        selection.select(
            data,
            tmp_path / "wrong",
            image_size=32,
            overrides=OPTIONS,
            progress=False,
            reuse={"pixelstats": second.run_dir},
        )
