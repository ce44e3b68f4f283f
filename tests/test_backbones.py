"""``backbone=lite0|lite1|lite2`` through the API: recorded in the run, checked on reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import defectlab.api as dl
from defectlab.errors import CheckpointError, ConfigError


@pytest.mark.parametrize("model", ["patchmemory", "flow", "memseg"])
def test_backbone_is_a_setting_of_the_feature_models(model: str, folder_root: Path) -> None:
    config = dl.build_config(model, folder_root, overrides=["backbone=lite2"])
    assert config.model_config["backbone"] == "lite2"
    with pytest.raises(ConfigError, match=r"backbone must be one of lite0, lite1, lite2; got 'x'"):
        dl.build_config(model, folder_root, overrides=["backbone=x"])


def test_a_run_records_its_backbone_and_refuses_another(
    folder_root: Path, tmp_path: Path, one_thread
) -> None:
    run_dir = tmp_path / "run"
    dl.train(
        "patchmemory",
        folder_root,
        run_dir,
        image_size=32,
        device="cpu",
        overrides=["backbone=lite1", "memory_bank_size=64"],
        progress=False,
    )
    metrics = dl.evaluate(run_dir, folder_root, tmp_path / "eval", progress=False)
    assert metrics["image_auroc"] is not None
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model_config"]["backbone"] == "lite1"
    assert dl.load_run(run_dir).model.features.identity()["backbone"] == "lite1"
    config["model_config"]["backbone"] = "lite0"
    (run_dir / "config.json").write_text(json.dumps(config))
    # the checkpoint carries its own copy of the config: edit that one as the loader reads it
    payload = torch.load(run_dir / "model.pt", weights_only=True)
    payload["run_config"]["model_config"]["backbone"] = "lite0"
    torch.save(payload, run_dir / "model.pt")
    with pytest.raises(CheckpointError, match=r"backbone=lite1 .*uses backbone=lite0"):
        dl.load_run(run_dir)
