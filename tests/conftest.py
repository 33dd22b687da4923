"""Every test runs W&B for real, offline, with no account and nothing written outside tmp."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures_data import write_pascal_tree

from datamodules.shapes import ensure_shapes


@pytest.fixture(autouse=True)
def offline_wandb(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path_factory.mktemp("wandb")))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # An in-process run publishes its W&B service in WANDB_SERVICE; commands started as
    # subprocesses would inherit it and share one service, which refuses a resumed run's id.
    monkeypatch.setenv("WANDB_SERVICE", "")


@pytest.fixture(scope="module")
def pascal_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The PASCAL tree of :func:`fixtures_data.write_pascal_tree`, once per test module."""
    return write_pascal_tree(tmp_path_factory.mktemp("voc") / "VOC2012")


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``--data.root`` of the shapes set of ``tiny_args`` (200 / 80 images), written once per
    test module."""
    root = tmp_path_factory.mktemp("shapes")
    ensure_shapes(root, 200, 80, 0)
    return root
