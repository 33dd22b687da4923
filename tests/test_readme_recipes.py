"""README's two-file recipes, run as written: the blocks after ``<!-- recipe: NAME -->`` are
written to a folder on the import path and used through the command line (issue 22: a head
and an encoder of one's own, no renaming, options surviving the checkpoint; issue 34: a dataset
of one's own, one class that both segmentation tasks run)."""

from __future__ import annotations

import re
import shlex
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
from tasks.heads import ASGNetHead
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


RELEASED = re.compile(r"<!-- released models -->\n```bash\n(?P<body>.*?)```", re.S)


def write_released(path: Path) -> None:
    """A file in its paper's own layout at ``path``, named by its first folder; random weights
    (written by each head's parity test helpers)."""
    from reference_dcama import build_reference_dcama
    from test_bam import official_bam
    from test_bam import write_official as write_bam
    from test_contracts import write_official as write_asgnet
    from test_dcama import write_best_model as write_dcama
    from test_hsnet import ReferenceHSNet, write_best_model
    from test_pfenet import ReferencePFENet
    from test_pfenet import write_official as write_pfenet

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    paper = path.parts[-3] if len(path.parts) > 2 and path.parts[-3] in ("pfenet", "bam") else (
        path.parent.name)  # fmt: skip
    if paper == "asgnet":
        encoder = ResNet("resnet50", stem="deep", output_stride=8, dilation_scheme="uniform")
        write_asgnet(FewShotSegmentation(encoder, head=ASGNetHead, freeze_backbone=True), path)
    elif paper == "pfenet":
        write_pfenet(ReferencePFENet([60, 30, 15, 8], 1), path)
    elif paper == "hsnet":
        write_best_model(ReferenceHSNet(), path)
    elif paper == "dcama":
        write_dcama(build_reference_dcama("resnet50"), path)
    else:
        write_bam(official_bam(5), path)


@pytest.mark.slow
def test_the_released_model_commands_run_as_written(tmp_path: Path, monkeypatch) -> None:
    """Each README line testing a released model runs as written (with a small PASCAL tree and
    few episodes appended), on a file in that paper's layout: no head option, K read from the
    BAM file."""
    from fixtures_data import write_pascal_tree

    body = RELEASED.search(README.read_text())["body"].replace("\\\n", " ")
    commands = [shlex.split(line) for line in body.splitlines() if line.strip()]
    assert len(commands) == 5 and all(c[:4] == ["python", "-m", "tasks.segment", "test"]
                                      for c in commands)  # fmt: skip
    voc = write_pascal_tree(tmp_path / "VOC2012", num_test=120)  # 6 test images a class: 5-shot
    monkeypatch.chdir(tmp_path)
    small = ["--data.root", str(voc), "--data.cache_dir", str(tmp_path / "cache"),
             "--data.image_size", "64", "--data.eval_size", "64", "--data.test_episodes", "5",
             "--data.test_seeds", "1", "--data.batch_size", "2", "--data.num_workers", "0",
             "--trainer.logger", "false", "--results.output_dir", str(tmp_path / "results"),
             "--data.train_list", "ImageSets/SegmentationAug/train_aug.txt"]  # fmt: skip
    for command in commands:
        repo = README.parent  # the commands run from the repository; the files lie in tmp_path
        args = [str(repo / a) if a.startswith("configs/") else a for a in command[3:]]
        released = Path(args[args.index("--model.official_checkpoint") + 1])
        write_released(released)
        cli = segment.main([*args, *small])
        assert 0 <= float(cli.trainer.callback_metrics["test/miou"]) <= 1, command
    assert len(list((tmp_path / "results").glob("*.results.json"))) == 5
