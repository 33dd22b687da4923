"""README's two-file recipes, run as written: the blocks after ``<!-- recipe: NAME -->`` are
written to a folder on the import path and used through the command line (issue 22: a head
and an encoder of one's own, no renaming, options surviving the checkpoint; issue 34: a dataset
of one's own, one class that both segmentation tasks run)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_segment import tiny_args

from backbones import ResNet
from backbones.testing import check_backbone
from datamodules.pascal import save_label_png
from tasks import segment, semantic
from tasks.heads.testing import check_head
from tasks.segment import FewShotSegmentation

README = Path(__file__).parents[1] / "README.md"
RECIPE = re.compile(r"<!-- recipe: (?P<name>\S+) -->\n```\w+\n(?P<body>.*?)```", re.S)


@pytest.fixture
def recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "recipes"
    folder.mkdir()
    found = {m["name"]: m["body"] for m in RECIPE.finditer(README.read_text())}
    assert set(found) == {
        f"my_{kind}.{suffix}"
        for kind in ("head", "encoder", "dataset")
        for suffix in ("py", "yaml")
    }
    for name, body in found.items():
        (folder / name).write_text(body)
    monkeypatch.syspath_prepend(str(folder))
    return folder


def fit_and_reload(tmp_path: Path, *configs: Path) -> FewShotSegmentation:
    steps = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"]
    args = [arg for config in configs for arg in ("--config", str(config))]
    segment.main(["fit", *args, *tiny_args(tmp_path, *steps)])
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    return FewShotSegmentation.load_from_checkpoint(last)


def test_a_head_of_ones_own_trains_and_reloads_with_its_option(
    recipes: Path, tmp_path: Path
) -> None:
    from my_head import CosineHead

    check_head(CosineHead, ResNet("resnet18").output_info)
    model = fit_and_reload(tmp_path, recipes / "my_head.yaml")
    assert type(model.head).__name__ == "CosineHead" and model.head.scale == 20.0
    assert model.head.in_features == ("layer4",)


def test_an_encoder_of_ones_own_passes_the_checks_and_runs_the_heads(
    recipes: Path, tmp_path: Path
) -> None:
    from my_encoder import MobileNetV3

    check_backbone(MobileNetV3())
    model = fit_and_reload(tmp_path, recipes / "my_encoder.yaml", recipes / "my_head.yaml")
    assert type(model.backbone).__name__ == "MobileNetV3"
    assert model.head.in_features == ("stage4",)
    default_head = FewShotSegmentation(MobileNetV3())  # the prototype head: stages 3 and 2
    assert default_head.head.in_features == ("stage3", "stage2")
    masks = torch.zeros(1, 1, 64, 64, dtype=torch.long)
    masks[..., 16:48, 16:48] = 1
    logits = default_head(torch.randn(1, 3, 64, 64), torch.randn(1, 1, 3, 64, 64), masks).logits
    assert logits.shape[:2] == (1, 2)


def write_leaves(root: Path, images: dict[str, int], seed: int = 0) -> None:
    """The recipe's layout: ``<root>/<split>/images/<id>.jpg`` and ``labels/<id>.png`` of 48 px
    scenes, each with two rectangles of different classes among six (labels ``c + 1``, a
    255 border)."""
    rng = np.random.default_rng(seed)
    for split, count in images.items():
        for folder in ("images", "labels"):
            (root / split / folder).mkdir(parents=True)
        for index in range(count):
            pixels = rng.integers(0, 60, (48, 48, 3), dtype=np.uint8)
            label = np.zeros((48, 48), dtype=np.uint8)
            for cls, (top, left) in zip(
                rng.choice(6, 2, replace=False), ((4, 4), (26, 26)), strict=True
            ):
                label[top - 1 : top + 19, left - 1 : left + 19] = 255
                label[top : top + 18, left : left + 18] = cls + 1
                pixels[top : top + 18, left : left + 18] = 40 * (cls + 1)
            Image.fromarray(pixels).save(root / split / "images" / f"{index:03d}.jpg")
            save_label_png(label, root / split / "labels" / f"{index:03d}.png")


def test_a_dataset_of_ones_own_runs_both_segmentation_tasks(recipes: Path, tmp_path: Path) -> None:
    from my_dataset import Leaves

    root = tmp_path / "leaves"
    write_leaves(root, {"train": 48, "test": 24})
    run = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
           "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "runs"),
           "--data.num_workers", "0", "--data.cache_dir", str(tmp_path / "cache")]  # fmt: skip
    dataset = ["--data.dataset.root", str(root), "--data.fold", "1"]
    cli = segment.main(["fit", "--config", str(recipes / "my_dataset.yaml"), *dataset, *run])
    data = cli.datamodule
    assert isinstance(data.dataset, Leaves) and data.image_size == 64  # the dataset's default
    assert [data.class_names[c] for c in data.novel_classes] == ["ash", "elm", "pine"]
    assert data.hparams["dataset"]["class_path"] == "my_dataset.Leaves"
    cli = semantic.main(["fit", "--data", "datamodules.semantic.SemanticDataModule",
                         "--data.dataset", "my_dataset.Leaves", *dataset, *run])  # fmt: skip
    data = cli.datamodule
    assert data.class_names == ["background", "oak", "maple", "birch"]
    batch = next(iter(data.train_dataloader()))
    assert set(batch["query_mask"].unique().tolist()) <= {0, 1, 2, 3, 255}
