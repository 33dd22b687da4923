"""README's two-file recipes, run as written: the blocks after ``<!-- recipe: NAME -->`` are
written to a folder on the import path and used through the command line (issue 22: a head
and an encoder of one's own, no renaming, options surviving the checkpoint)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_segment import tiny_args

from backbones import ResNet
from backbones.testing import check_backbone
from tasks import segment
from tasks.heads.testing import check_head
from tasks.segment import FewShotSegmentation

README = Path(__file__).parents[1] / "README.md"
RECIPE = re.compile(r"<!-- recipe: (?P<name>\S+) -->\n```\w+\n(?P<body>.*?)```", re.S)


@pytest.fixture
def recipes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "recipes"
    folder.mkdir()
    found = {m["name"]: m["body"] for m in RECIPE.finditer(README.read_text())}
    assert set(found) == {"my_head.py", "my_head.yaml", "my_encoder.py", "my_encoder.yaml"}
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
