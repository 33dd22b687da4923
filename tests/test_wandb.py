"""W&B for real, offline: a fit's run holds the resolved config, metrics and episode images."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_segment import tiny_args
from wandb_records import OfflineRun

from tasks.segment import main


@pytest.mark.slow
def test_fit_writes_config_metrics_and_images(tmp_path: Path) -> None:
    for _ in range(2):  # a second run in the same folder must not trip over the first's config
        short = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "2"]
        main(["fit", *tiny_args(tmp_path), *short, "--trainer.log_every_n_steps", "1"])
    folders = sorted((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(folders) == 2
    run = OfflineRun(folders[-1])
    config = run.config()
    assert config["data"]["class_path"] == "datamodules.ShapesFewShot"
    assert config["model"]["backbone"]["init_args"]["arch"] == "resnet18"
    assert config["parameters"]["trainable"] > 0
    saved = (folders[-1] / "files" / "cli_config.yaml").read_text()
    assert "class_path: tasks.heads.PrototypeHead" in saved
    history = run.history()
    val = [row["val/miou"] for row in history if "val/miou" in row]
    assert len(val) == 2 and all(0 <= v <= 1 for v in val)
    assert any("train/loss" in row for row in history)
    assert any(key.startswith("lr-") for row in history for key in row)
    images = [row for row in history if "val/episodes/_type" in row]
    assert len(images) == 2 and images[0]["val/episodes/_type"] == "images/separated"
    assert images[0]["val/episodes/count"] == 4
    media = list((folders[-1] / "files" / "media" / "images").rglob("*.png"))
    assert len(media) >= 4
