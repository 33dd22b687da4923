"""The few-shot segmentation task: real backbones, scoring, and the CLI run in-process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backbones import build_backbone
from tasks.heads import ASGNetHead, HSNetHead, PFENetHead, PrototypeHead
from tasks.scoring import original_resolution_predictions, pixel_mean_cross_entropy
from tasks.segment import FewShotSegmentation, main

BACKBONES = {
    "resnet18_os8": dict(name="resnet18", output_stride=8),
    "resnet18_os16": dict(name="resnet18", output_stride=16),
    "resnet50_deep_os8": dict(
        name="resnet50", stem="deep", output_stride=8, dilation_scheme="uniform"
    ),
}


def small_asgnet(features):
    return ASGNetHead(features, reduce_dim=32, bins=(1.0, 0.5))


def small_pfenet(features):
    return PFENetHead(features, reduce_dim=32, bins=(1.0, 0.5))


@pytest.mark.parametrize(
    "backbone",
    [b if "resnet18" in b else pytest.param(b, marks=pytest.mark.slow) for b in BACKBONES],
)
@pytest.mark.parametrize(
    "head", [PrototypeHead, small_asgnet, small_pfenet], ids=["prototype", "asgnet", "pfenet"]
)
@pytest.mark.parametrize("shots", [1, 5])
def test_heads_on_real_backbones(backbone: str, head, shots: int) -> None:
    options = dict(BACKBONES[backbone])
    model = FewShotSegmentation(build_backbone(options.pop("name"), **options), head=head).eval()
    query = torch.randn(2, 3, 65, 65)
    support = torch.randn(2, shots, 3, 65, 65)
    masks = torch.zeros(2, shots, 65, 65, dtype=torch.long)
    masks[..., 20:45, 10:50] = 1
    masks[..., :2, :] = 255
    with torch.no_grad():
        output = model(query, support, masks)
    stride = 16 if backbone.endswith("os16") else 8
    size = (65 - 1) // stride + 1
    assert output.logits.shape == (2, 2, size, size)
    assert all(a.shape[:2] == (2, 2) for a in output.aux_logits)


def test_scoring_crops_the_padding_before_resizing_to_the_original_label() -> None:
    """A query of original size 4x2 fills the top-left 8x4 of an 8x8 input. Foreground logits
    in the padding must not leak into the prediction at original resolution."""
    logits = torch.zeros(1, 2, 8, 8)
    logits[0, 1, :, :2] = 5.0  # foreground in the left half of the valid region
    logits[0, 1, :, 4:] = 5.0  # and in the padding
    batch = {
        "query_image": torch.zeros(1, 3, 8, 8),
        "query_label": torch.tensor([[[1, 0], [1, 0], [1, 0], [1, 255], [255, 255]]]),
        "query_valid": torch.tensor([[8, 4]]),
        "query_size": torch.tensor([[4, 2]]),
    }
    preds = original_resolution_predictions(logits, batch)
    assert preds.tolist() == [[[1, 0], [1, 0], [1, 0], [1, 0], [0, 0]]]


def tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--data.root",
        str(tmp_path / "shapes"),
        "--data.num_train",
        "200",
        "--data.num_test",
        "80",
        "--data.image_size",
        "64",
        "--data.batch_size",
        "4",
        "--data.global_batch_size",
        "4",
        "--data.num_workers",
        "0",
        "--data.val_episodes",
        "8",
        "--data.test_episodes",
        "8",
        "--data.min_pixels",
        "32",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        *extra,
    ]


def test_pfenet_head_is_one_option_on_the_default_experiment(tmp_path: Path) -> None:
    """``fit --model.head tasks.heads.PFENetHead`` trains the default experiment (ResNet-18,
    fine-tuned): layer4 runs for the prior, without gradient."""
    cli = main(["fit", *tiny_args(tmp_path), "--model.head", "tasks.heads.PFENetHead",
                "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                "--trainer.limit_val_batches", "1"])  # fmt: skip
    assert isinstance(cli.model.head, PFENetHead) and cli.trainer.global_step == 2
    assert not any(p.requires_grad for p in cli.model.backbone.layer4.parameters())
    assert all(p.requires_grad for p in cli.model.backbone.layer3.parameters())


def test_hsnet_head_is_one_option_and_votes_over_shots_in_test(tmp_path: Path) -> None:
    """``fit --model.head tasks.heads.HSNetHead`` trains the default experiment (ResNet-18 at
    output stride 8, its blocks' pre-ReLU outputs); ``test --ckpt_path`` with 3 shots scores
    HSNet's vote of the shots' predictions."""
    cli = main(["fit", *tiny_args(tmp_path), "--model.head", "tasks.heads.HSNetHead",
                "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                "--trainer.limit_val_batches", "1"])  # fmt: skip
    assert isinstance(cli.model.head, HSNetHead) and cli.trainer.global_step == 2
    assert cli.model.backbone.out_layers == cli.model.head.in_features
    assert all(p.requires_grad for p in cli.model.backbone.layer4.parameters())
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    tested = main(["test", *tiny_args(tmp_path, "--data.shots", "3"), "--ckpt_path", str(last)])
    model = tested.model
    assert isinstance(model.head, HSNetHead)
    batch = next(iter(tested.datamodule.test_dataloader()[0]))
    output = model.segment(batch)
    assert output.shot_logits is not None and output.shot_logits.shape[1] == 3
    scored = original_resolution_predictions(output.shot_logits, batch)
    mean = original_resolution_predictions(output.logits, batch)
    assert scored.shape == mean.shape == batch["query_label"].shape


@pytest.mark.slow
def test_cli_fit_validate_test_in_process(tmp_path: Path) -> None:
    main(
        [
            "fit",
            *tiny_args(tmp_path),
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "3",
        ]
    )
    checkpoints = sorted((tmp_path / "runs").rglob("*.ckpt"))
    names = {p.name for p in checkpoints}
    assert "last.ckpt" in names and any(n.startswith("best") for n in names)
    best = next(p for p in checkpoints if p.name.startswith("best"))
    for command in ("validate", "test"):
        main([command, *tiny_args(tmp_path), "--ckpt_path", str(best)])


def test_frozen_backbone_is_unchanged_by_fit(tmp_path: Path) -> None:
    """Weights and BatchNorm statistics of a frozen backbone leave fit bit-identical."""
    weights = tmp_path / "resnet18.pth"
    torch.save(build_backbone("resnet18").state_dict(), weights)
    main(
        [
            "fit",
            *tiny_args(tmp_path),
            "--model.freeze_backbone",
            "true",
            "--model.backbone.init_args.weights",
            str(weights),
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "3",
            "--trainer.limit_val_batches",
            "1",
        ]
    )
    state = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), weights_only=False)
    state = state["state_dict"]
    for key, value in torch.load(weights).items():
        assert torch.equal(state["backbone." + key], value), key
    assert any(k.startswith("head.") for k in state)


@pytest.mark.slow
def test_cli_predict_writes_masks_at_original_size(tmp_path: Path) -> None:
    main(
        [
            "fit",
            *tiny_args(tmp_path),
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.limit_val_batches",
            "1",
        ]
    )
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    shapes = next((tmp_path / "shapes").glob("*/JPEGImages"))
    images = sorted(shapes.glob("*.jpg"))[:3]
    labels = shapes.parent / "SegmentationClassAug"
    support_mask = tmp_path / "support.png"
    label = np.array(Image.open(labels / f"{images[0].stem}.png"))
    Image.fromarray(((label > 0) & (label < 255)).astype(np.uint8)).save(support_mask)
    output = tmp_path / "predictions"
    main(
        [
            "predict",
            *tiny_args(tmp_path),
            "--ckpt_path",
            str(last),
            "--data.predict_support",
            f"[{images[0]}]",
            "--data.predict_support_masks",
            f"[{support_mask}]",
            "--data.predict_queries",
            f"[{images[1]}, {images[2]}]",
            "--prediction_writer.output_dir",
            str(output),
        ]
    )
    for image in images[1:]:
        mask = Image.open(output / f"{image.stem}.png")
        assert mask.size == Image.open(image).size
        assert set(np.unique(np.array(mask))) <= {0, 1}
        overlay = Image.open(output / f"{image.stem}_overlay.jpg")
        assert overlay.size == mask.size
    before = sorted(shapes.iterdir())
    with pytest.raises(ValueError, match=r"holds predict queries; choose a folder apart"):
        main(["predict", *tiny_args(tmp_path), "--ckpt_path", str(last),
              "--data.predict_support", f"[{images[0]}]",
              "--data.predict_support_masks", f"[{support_mask}]",
              "--data.predict_queries", f"[{images[1]}]",
              "--prediction_writer.output_dir", str(shapes)])  # fmt: skip
    assert sorted(shapes.iterdir()) == before


@pytest.mark.parametrize(
    "config", sorted(Path(__file__).parents[1].joinpath("configs", "segment").glob("*.yaml"))
)
def test_experiment_configs_parse(config: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--data.fold", "3", "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "fold: 3" in printed and "class_path: backbones." in printed


def test_prediction_folder_that_cannot_be_created_is_named(tmp_path: Path) -> None:
    from tasks.callbacks.predictions import MaskWriter

    blocker = tmp_path / "taken"
    blocker.write_text("a file where the folder should be")
    writer = MaskWriter(str(blocker / "predictions"))
    with pytest.raises(PermissionError, match=r"--prediction_writer\.output_dir") as error:
        writer.on_predict_start(None, None)
    assert str(blocker / "predictions") in str(error.value)


def test_logger_and_progress_bar_can_be_turned_off(tmp_path: Path, monkeypatch) -> None:
    """The default config's LearningRateMonitor and RichProgressBar, which Lightning refuses
    without a logger or a progress bar, are left out instead of failing the run."""
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", *tiny_args(tmp_path), "--trainer.logger", "false",
                "--trainer.enable_progress_bar", "false", "--trainer.max_steps", "1",
                "--trainer.limit_val_batches", "1"])  # fmt: skip
    kinds = {type(callback).__name__ for callback in cli.trainer.callbacks}
    assert "LearningRateMonitor" not in kinds and "RichProgressBar" not in kinds
    assert cli.trainer.global_step == 1 and (tmp_path / "checkpoints" / "last.ckpt").is_file()


def test_pixel_mean_of_a_batch_without_labelled_pixels_is_zero_not_nan() -> None:
    """A device batch whose pixels are all ignored (small batches, large 255 regions) adds
    nothing to the papers' pixel mean instead of stopping training with a NaN loss."""
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    ignored = torch.full((2, 4, 4), 255)
    loss = pixel_mean_cross_entropy(logits, ignored)
    loss.backward()
    assert loss.item() == 0 and torch.isfinite(logits.grad).all()
    target = torch.randint(0, 2, (2, 4, 4))
    torch.testing.assert_close(
        pixel_mean_cross_entropy(logits, target), torch.nn.functional.cross_entropy(logits, target)
    )
