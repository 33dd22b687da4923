"""Test results of few-shot segmentation, written so that they can be reproduced and tabulated.

After ``python -m tasks.segment test`` the per-seed scores computed by
:class:`tasks.segment.FewShotSegmentation` are printed as a table and written beside the
checkpoint (a released model's results: in the run's folder, where its checkpoints would be;
or to ``--results.output_dir``) as
``<checkpoint or released file stem>.<Dataset>-fold<k>-<K>shot-<protocol>.results.json`` and
``.csv``, and logged to W&B as the table ``test/results`` when a W&B run is active. The JSON
(format ``fewshot-dilated/test-results`` version 1, read by :mod:`tasks.report`) records what the
numbers depend on: the resolved protocol, fold, shots, seeds, backbone configuration, the
checkpoint's or released file's path and SHA-256, and the project's version and git commit.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import statistics
import subprocess
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from rich.console import Console
from rich.table import Table

from backbones import Backbone
from datamodules.files import writable_folder, write_atomic

FORMAT = "fewshot-dilated/test-results"
FORMAT_VERSION = 1
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation (0 for one seed) over seeds; per-class IoU means over
    the seeds where the class had episodes."""

    def spread(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    mious = [run["miou"] for run in per_seed]
    fbious = [run["fbiou"] for run in per_seed]
    names = dict.fromkeys(name for run in per_seed for name in run["iou_per_class"])
    per_class = {
        name: statistics.fmean(
            run["iou_per_class"][name] for run in per_seed if name in run["iou_per_class"]
        )
        for name in names
    }
    return {
        "miou_mean": statistics.fmean(mious),
        "miou_std": spread(mious),
        "fbiou_mean": statistics.fmean(fbious),
        "fbiou_std": spread(fbious),
        "iou_per_class_mean": per_class,
    }


def describe_backbone(backbone: Backbone) -> tuple[dict[str, Any], str]:
    """The backbone's configuration and a short label telling configurations apart, e.g.
    ``resnet50-deep-os8-uniform`` (PSPNet dilation) or ``resnet50-standard-os8-contracted``."""
    return backbone.summary()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_state() -> dict[str, Any]:
    """The project's commit and whether the tree had changes; ``None`` outside a git checkout."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"git_commit": commit, "git_dirty": bool(status) if commit else None}


def provenance() -> dict[str, Any]:
    try:
        version = metadata.version("fewshot-dilated")
    except metadata.PackageNotFoundError:
        version = None
    return {
        "version": version,
        **git_state(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def weights_file(trainer: Trainer, module: LightningModule) -> tuple[str, Path] | None:
    """What the tested weights came from: ``("checkpoint", --ckpt_path)`` or
    ``("official_checkpoint", the released file)``; ``None`` for untrained weights."""
    if trainer.ckpt_path:
        return "checkpoint", Path(trainer.ckpt_path)
    released = module.released_file
    return ("official_checkpoint", released) if released else None


def build_result(
    module: LightningModule, datamodule: Any, weights: tuple[str, Path] | None
) -> dict[str, Any]:
    """The results record of a finished ``test`` (see the module docstring)."""
    per_seed = module.test_results
    backbone, label = describe_backbone(module.backbone)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": type(module.head).__name__,
        "backbone": backbone,
        "backbone_label": label,
        "dataset": type(getattr(datamodule, "dataset", datamodule)).__name__,
        "fold": datamodule.fold,
        "shots": datamodule.shots,
        "protocol": datamodule.protocol,
        "min_pixels": datamodule.min_pixels,
        "image_size": datamodule.image_size,
        "seeds": [run["seed"] for run in per_seed],
        "per_seed": per_seed,
        "summary": summarise(per_seed),
        "checkpoint": (
            {"path": str(weights[1]), "sha256": file_sha256(weights[1]), "kind": weights[0]}
            if weights
            else None
        ),
        "provenance": provenance(),
    }


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Columns and rows of the per-seed table: one row per seed, then ``mean`` and ``std``."""
    summary = result["summary"]
    classes = list(summary["iou_per_class_mean"])
    columns = ["seed", "miou", "fbiou", *classes]
    rows = [
        [str(run["seed"]), run["miou"], run["fbiou"]]
        + [run["iou_per_class"].get(name, float("nan")) for name in classes]
        for run in result["per_seed"]
    ]
    rows.append(
        ["mean", summary["miou_mean"], summary["fbiou_mean"]]
        + [summary["iou_per_class_mean"][name] for name in classes]
    )
    rows.append(["std", summary["miou_std"], summary["fbiou_std"]] + [None] * len(classes))
    return columns, rows


class TestResults(Callback):
    """Prints and writes the results of ``test`` (see the module docstring).

    Args:
        output_dir: folder of the results files; default the checkpoint's folder, else the
            run's (``<save_dir>/<name>/<version>`` of the first logger, where its checkpoints
            would go), else the trainer's ``default_root_dir``.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        self.output_dir = Path(output_dir) if output_dir else None

    def folder(self, trainer: Trainer) -> Path:
        if self.output_dir is not None:
            return self.output_dir
        if trainer.ckpt_path:
            return Path(trainer.ckpt_path).parent
        logger = trainer.loggers[0] if trainer.loggers else None
        if logger is not None and logger.save_dir is not None:
            version = (
                logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            )
            return Path(logger.save_dir) / str(logger.name) / version
        return Path(trainer.default_root_dir)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fail before testing if the results cannot be written."""
        if trainer.is_global_zero:
            writable_folder(self.folder(trainer), "--results.output_dir", "test results")

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        weights = weights_file(trainer, pl_module)
        result = build_result(pl_module, trainer.datamodule, weights)
        stem = weights[1].stem if weights else "model"
        name = (
            f"{stem}.{result['dataset']}-fold{result['fold']}-{result['shots']}shot-"
            f"{result['protocol']['name']}.results"
        )
        folder = self.folder(trainer)
        columns, rows = table_rows(result)
        table = io.StringIO()
        writer = csv.writer(table)
        writer.writerow(columns)
        writer.writerows(rows)
        write_atomic(folder / f"{name}.csv", table.getvalue())
        write_atomic(folder / f"{name}.json", json.dumps(result, indent=2) + "\n")
        self.print_table(result, columns, rows, folder / f"{name}.json")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table("test/results", columns=columns, data=rows)

    @staticmethod
    def print_table(
        result: dict[str, Any], columns: list[str], rows: list[list[Any]], path: Path
    ) -> None:
        title = (
            f"{result['method']} {result['backbone_label']}, {result['dataset']} fold "
            f"{result['fold']}, {result['shots']}-shot, protocol {result['protocol']['name']}"
        )
        table = Table()
        for column in columns[:3]:
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(*(v if isinstance(v, str) else f"{100 * v:.2f}" for v in row[:3]))
        console = Console()  # title and path unwrapped: a rich title wraps at the table's width
        console.print(title, soft_wrap=True, highlight=False)
        console.print(table)
        console.print(f"written to {path}", soft_wrap=True, highlight=False)
