"""Real DDP, launched as a user would: ``python -m tasks.segment ... --trainer.strategy ddp`` with
two CPU processes (gloo). Evaluation must not depend on the number of processes."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_segment import tiny_args

from datamodules import ShapesFewShot

TIMEOUT = 600  # bounded: a hung rank fails the test instead of the suite


def run_task(task: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", f"tasks.{task}", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def csv_logger(save_dir: Path) -> list[str]:
    return [
        "--trainer.logger",
        "lightning.pytorch.loggers.CSVLogger",
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
    ]


def logged_metrics(save_dir: Path) -> dict[str, float]:
    (metrics,) = save_dir.rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    return {k: float(v) for row in rows for k, v in row.items() if v not in ("", None)}


def ddp(devices: int) -> list[str]:
    return [
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        str(devices),
        "--trainer.strategy",
        "ddp" if devices > 1 else "auto",
    ]


@pytest.mark.slow
def test_ddp_fit_then_test_equals_single_process(tmp_path: Path) -> None:
    data = tiny_args(tmp_path)
    run_task(
        "segment",
        tmp_path,
        "fit",
        *data,
        *ddp(2),
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_train_batches",
        "3",
    )
    wandb_runs = list((tmp_path / "runs").rglob("offline-run-*"))
    assert len(wandb_runs) == 1, wandb_runs  # one W&B run, written by rank zero
    checkpoint = next((tmp_path / "runs").rglob("last.ckpt"))
    results = {}
    for devices in (1, 2):
        save_dir = tmp_path / f"test-{devices}"
        run_task(
            "segment",
            tmp_path,
            "test",
            *data,
            *ddp(devices),
            *csv_logger(save_dir),
            "--data.test_episodes",
            "13",  # odd: the ranks get 7 and 6 episodes, no padding
            "--ckpt_path",
            str(checkpoint),
        )
        results[devices] = logged_metrics(save_dir)
    for key in ("test/miou", "test/fbiou"):
        assert abs(results[1][key] - results[2][key]) < 1e-6, (key, results)
    per_class = {k for k in results[1] if k.startswith("test/iou/")}
    assert per_class and per_class == {k for k in results[2] if k.startswith("test/iou/")}

    # A rank that fails (rank 1's first query image is truncated: its header still reads, its
    # pixels do not) fails the whole command, within the timeout, with that file named.
    datamodule = ShapesFewShot(root=str(tmp_path / "shapes"), num_train=200, num_test=80,
                               image_size=64, min_pixels=32, test_episodes=13)  # fmt: skip
    datamodule.setup("test")
    query = datamodule.sampler("test").episodes()[1].query
    image = datamodule.source("test").image_path(query)
    image.write_bytes(image.read_bytes()[:400])
    failed = subprocess.run(
        [sys.executable, "-m", "tasks.segment", "test", *data, *ddp(2), "--ckpt_path",
         str(checkpoint), "--data.test_episodes", "13"],
        cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert failed.returncode != 0
    assert f"cannot read image {image}" in failed.stdout + failed.stderr


@pytest.mark.slow
def test_ddp_classification_test_equals_single_process(tmp_path: Path) -> None:
    data = [
        "--data.root", str(tmp_path / "shapes-cls"), "--data.train_per_class", "3",
        "--data.val_per_class", "3", "--data.scene_size", "40", "--data.image_size", "32",
        "--data.batch_size", "4", "--data.num_workers", "0",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ]  # fmt: skip
    run_task("classify", tmp_path, "fit", *data, *ddp(2), "--trainer.max_steps", "2")
    assert len(list((tmp_path / "runs").rglob("offline-run-*"))) == 1
    checkpoint = next((tmp_path / "runs").rglob("last.ckpt"))
    results = {}
    for devices in (1, 2):
        save_dir = tmp_path / f"test-{devices}"
        run_task("classify", tmp_path, "test", *data, *ddp(devices), *csv_logger(save_dir),
                 "--ckpt_path", str(checkpoint))  # fmt: skip
        results[devices] = logged_metrics(save_dir)
    for key in ("test/acc1", "test/acc5"):
        assert abs(results[1][key] - results[2][key]) < 1e-6, (key, results)
