"""Semantic segmentation (BAM's base learner): BAM's relabelling of a fold's base classes and its
training-list filter, the metric against hand-computed IoUs, an official-layout base learner
against a reference written from BAM's ``model/PSPNet.py`` and ``model/PPM.py``
(chunbolang/BAM), and the command line end to end on generated data with W&B offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from fixtures_models import randomise_norms
from lightning.pytorch import Trainer
from PIL import Image
from test_pfenet import official_stage
from torch import Tensor, nn
from wandb_records import OfflineRun

from backbones import WeightsError
from datamodules.episode import Episode
from datamodules.pascal import VOC_CLASSES
from datamodules.semantic import CocoSemantic, PascalSemantic, ShapesSemantic
from datamodules.source import open_label_png
from tasks.decoders import PSPDecoder
from tasks.metrics import SemanticIoU
from tasks.semantic import SemanticSegmentation, main

IMAGE = 65  # (H - 1) % 8 == 0: BAM's output size (H - 1) / 8 * 8 + 1 is the input's


# --- BAM, written from the official code ------------------------------------------------------


def bam_sub_list(dataset: str, split: int) -> list[int]:
    """``util/dataset.py`` ``BaseData``'s ``sub_list`` (1-based base classes), PASCAL and
    COCO with ``use_split_coco=True``."""
    if dataset == "pascal":
        return {
            3: list(range(1, 16)),
            2: list(range(1, 11)) + list(range(16, 21)),
            1: list(range(1, 6)) + list(range(11, 21)),
            0: list(range(6, 21)),
        }[split]
    class_list = list(range(1, 81))
    sub_val_list = {3: range(4, 81, 4), 2: range(3, 80, 4), 1: range(2, 79, 4), 0: range(1, 78, 4)}
    return list(set(class_list) - set(sub_val_list[split]))


def bam_base_label(label: np.ndarray, sub_list: list[int], num_classes: int) -> np.ndarray:
    """``BaseData.__getitem__``'s relabelling loop, as written there."""
    label = label.copy()
    label_tmp = label.copy()
    for cls in range(1, num_classes + 1):
        select_pix = np.where(label_tmp == cls)
        if cls in sub_list:
            label[select_pix[0], select_pix[1]] = sub_list.index(cls) + 1
        else:
            label[select_pix[0], select_pix[1]] = 0
    return label


class ReferencePPM(nn.Module):
    """``model/PPM.py``."""

    def __init__(self, in_dim: int, reduction_dim: int, bins: tuple[int, ...]) -> None:
        super().__init__()
        self.features = nn.ModuleList(
            nn.Sequential(
                nn.AdaptiveAvgPool2d(b),
                nn.Conv2d(in_dim, reduction_dim, kernel_size=1, bias=False),
                nn.BatchNorm2d(reduction_dim),
                nn.ReLU(inplace=True),
            )
            for b in bins
        )

    def forward(self, x: Tensor) -> Tensor:
        out = [x]
        for f in self.features:
            out.append(F.interpolate(f(x), x.size()[2:], mode="bilinear", align_corners=True))
        return torch.cat(out, 1)


class ReferencePSPNet(nn.Module):
    """``model/PSPNet.py``'s ``OneModel`` with a ResNet-50 (``layers: 50``, ``zoom_factor: 8``),
    eval-mode forward. ``layer0`` is the deep stem as ``nn.Sequential(conv1, bn1, relu1, conv2,
    bn2, relu2, conv3, bn3, relu3, maxpool)``; the dilation patch is the official loop; the
    ``encoder`` Sequential is registered after the layers, so the state dict holds every encoder
    tensor twice, as the released ``best.pth`` files do."""

    def __init__(self, classes: int = 16) -> None:
        super().__init__()
        self.zoom_factor = 8
        self.layer0 = nn.Sequential(
            nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.Conv2d(64, 128, 3, padding=1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        )
        self.layer1 = official_stage(128, 64, 3, 1)
        self.layer2 = official_stage(256, 128, 4, 2)
        self.layer3 = official_stage(512, 256, 6, 2)
        self.layer4 = official_stage(1024, 512, 3, 2)
        for n, m in self.layer3.named_modules():
            if "conv2" in n:
                m.dilation, m.padding, m.stride = (2, 2), (2, 2), (1, 1)
            elif "downsample.0" in n:
                m.stride = (1, 1)
        for n, m in self.layer4.named_modules():
            if "conv2" in n:
                m.dilation, m.padding, m.stride = (4, 4), (4, 4), (1, 1)
            elif "downsample.0" in n:
                m.stride = (1, 1)
        self.encoder = nn.Sequential(
            self.layer0, self.layer1, self.layer2, self.layer3, self.layer4
        )
        fea_dim = 2048
        bins = (1, 2, 3, 6)
        self.ppm = ReferencePPM(fea_dim, int(fea_dim / len(bins)), bins)
        self.cls = nn.Sequential(
            nn.Conv2d(fea_dim * 2, 512, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(512),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=0.1),
            nn.Conv2d(512, classes, kernel_size=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        x_size = x.size()
        h = int((x_size[2] - 1) / 8 * self.zoom_factor + 1)
        w = int((x_size[3] - 1) / 8 * self.zoom_factor + 1)
        x = self.encoder(x)
        x = self.ppm(x)
        x = self.cls(x)
        return F.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)


def write_official(reference: nn.Module, path: Path) -> Path:
    """As ``train_base.py`` saves ``best.pth`` from its 4-GPU DDP model: ``{'epoch',
    'state_dict', 'optimizer'}`` with ``module.`` keys."""
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}
    torch.save({"epoch": 99, "state_dict": state, "optimizer": {}}, path)
    return path


@pytest.fixture(scope="module")
def reference() -> ReferencePSPNet:
    torch.manual_seed(0)
    model = ReferencePSPNet()
    randomise_norms(model)
    return model.eval()


# --- data -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dataset", "split"), [("pascal", k) for k in range(4)] + [("coco", 0)])
def test_base_classes_are_relabelled_as_bam_base_data(
    dataset: str, split: int, tmp_path: Path
) -> None:
    """Every label value through BAM's loop and through the datamodule's table: base class ``c``
    to ``sub_list.index(c) + 1``, novel classes to 0, 255 kept; names follow."""
    num_classes = 20 if dataset == "pascal" else 80
    module = PascalSemantic if dataset == "pascal" else CocoSemantic
    dm = module(root=str(tmp_path), fold=split)
    values = np.array([*range(num_classes + 1), 255], dtype=np.uint8)
    label = np.random.default_rng(split).permutation(np.tile(values, 3)).reshape(6, -1)
    sub_list = bam_sub_list(dataset, split)
    np.testing.assert_array_equal(dm.table[label], bam_base_label(label, sub_list, num_classes))
    assert dm.num_classes == len(sub_list) + 1 == (16 if dataset == "pascal" else 61)
    names = dm.dataset.class_names
    assert dm.class_names == ["background", *(names[c - 1] for c in sub_list)]
    full = module(root=str(tmp_path))
    assert full.num_classes == num_classes + 1 and (full.table[label] == label).all()


def test_exclude_novel_from_train_is_bam_filter(pascal_root: Path, tmp_path: Path) -> None:
    """``exclude_novel_from_train`` drops exactly the training images with a pixel of a novel
    class (BAM's ``filter_intersection``), held-out validation images are untouched; without
    it (BAM's base learner) those images train with their novel pixels as background."""
    options = dict(root=str(pascal_root), fold=0, cache_dir=str(tmp_path), num_workers=0)
    kept = PascalSemantic(**options)
    kept.setup("fit")
    dropped = PascalSemantic(**options, exclude_novel_from_train=True)
    dropped.setup("fit")
    source = kept.source("train")
    novel = set(range(1, 6))  # VOC classes 1..5 are fold 0's
    showing = {i for i in source.ids if novel & set(np.unique(source.read_label(i)).tolist())}
    assert showing and set(kept.ids("train")) & showing
    assert set(dropped.ids("train")) == set(kept.ids("train")) - showing
    assert dropped.ids("val") == kept.ids("val") and dropped.excluded_train_images == len(
        set(kept.ids("train")) & showing
    )
    image_id = sorted(set(kept.ids("train")) & showing)[0]
    dataset = kept.val_dataloader().dataset  # evaluation items of the training source
    item = dataset[Episode(image_id, 0, ())]
    raw = source.read_label(image_id)
    assert (item["query_label"] == torch.from_numpy(kept.table[raw])).all()
    assert not item["query_label"][torch.from_numpy(np.isin(raw, sorted(novel)))].any()
    assert (item["query_label"][torch.from_numpy(raw == 255)] == 255).all()


def test_batches_follow_the_episode_query_fields(tmp_path: Path) -> None:
    dm = ShapesSemantic(root=str(tmp_path), num_train=24, num_test=6, num_workers=0,
                        image_size=48, eval_size=64, batch_size=4, val_fraction=0.2)  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    train = next(iter(dm.train_dataloader()))
    assert (
        train["query_image"].shape == (4, 3, 48, 48) and train["query_image"].dtype == torch.uint8
    )
    assert train["query_mask"].shape == (4, 48, 48)
    assert set(train["query_mask"].unique().tolist()) <= {*range(16), 255}
    test = list(dm.test_dataloader())
    assert sum(len(b["query_id"]) for b in test) == 6
    first = test[0]
    assert first["query_image"].shape[-2:] == (64, 64) and first["query_label"].shape[-1] == 128
    assert len(dm.ids("train")) + len(dm.ids("val")) == 24


# --- metric -----------------------------------------------------------------------------------


def test_metric_against_hand_computed_iou() -> None:
    """3 classes on 8 labelled pixels (one 255 pixel, whose prediction is ignored):
    class 0: I 2, U 4; class 1: I 1, U 4; class 2: I 2, U 3. mIoU (1/2 + 1/4 + 2/3) / 3,
    without background (1/4 + 2/3) / 2, pixel accuracy 5/8; updates add up (DDP: summed states)."""
    target = torch.tensor([[0, 0, 1, 1, 1, 2, 2, 255, 0]])
    preds = torch.tensor([[0, 0, 1, 2, 0, 2, 2, 1, 1]])
    metric = SemanticIoU(3)
    metric.update(preds[:, :4].unsqueeze(0), target[:, :4].unsqueeze(0))
    metric.update(preds[:, 4:].unsqueeze(0), target[:, 4:].unsqueeze(0))
    result = metric.compute()
    iou = [1 / 2, 1 / 4, 2 / 3]
    torch.testing.assert_close(result["iou_per_class"], torch.tensor(iou))
    assert result["miou"].item() == pytest.approx(sum(iou) / 3)
    assert result["miou_fg"].item() == pytest.approx((iou[1] + iou[2]) / 2)
    assert result["pixel_acc"].item() == pytest.approx(5 / 8)
    absent = SemanticIoU(4)  # class 3 never present nor predicted: left out of the means
    absent.update(preds.unsqueeze(0), target.unsqueeze(0))
    assert absent.compute()["miou"].item() == pytest.approx(sum(iou) / 3)


# --- official checkpoints ---------------------------------------------------------------------


def test_official_base_learner_loads_strictly_with_bam_logits(
    reference: ReferencePSPNet, tmp_path: Path
) -> None:
    """A ``best.pth`` in BAM's layout loads through ``official_checkpoint`` (encoder from
    ``layer0..4``, decoder from ``ppm``/``cls``) and gives ``OneModel``'s eval logits to float32
    precision."""
    path = write_official(reference, tmp_path / "best.pth")
    model = SemanticSegmentation(official_checkpoint=str(path), num_classes=16).eval()
    assert model.backbone.summary()[1] == "resnet50-deep-os8-uniform"
    assert isinstance(model.decoder, PSPDecoder) and model.hparams.official_checkpoint is None
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, logits = reference(images), model(images)
    scale = expected.abs().max().item()
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5 * scale)
    decoder_keys = {k for k in reference.state_dict() if k.startswith(("ppm.", "cls."))}
    assert set(model.decoder.state_dict()) == decoder_keys


def test_official_base_learner_mismatches_are_listed(
    reference: ReferencePSPNet, tmp_path: Path
) -> None:
    state = {f"module.{k}": v for k, v in reference.state_dict().items()}

    def attempt(changed: dict, num_classes: int = 16, match: str = "") -> None:
        path = tmp_path / "changed.pth"
        torch.save({"epoch": 1, "state_dict": changed, "optimizer": {}}, path)
        with pytest.raises(WeightsError, match=match):
            SemanticSegmentation(official_checkpoint=str(path), num_classes=num_classes)

    attempt({**state, "module.aux.0.weight": torch.zeros(1)}, match=r"unexpected keys \['aux")
    missing = {k: v for k, v in state.items() if k != "module.ppm.features.2.1.weight"}
    attempt(missing, match=r"missing keys \['ppm.features.2.1.weight'\]")
    attempt(state, num_classes=21, match="predicts 16 classes but the model has num_classes=21")
    drifted = {**state, "module.encoder.4.0.conv1.weight": torch.zeros_like(
        state["module.encoder.4.0.conv1.weight"])}  # fmt: skip
    attempt(drifted, match=r"encoder.4.0.conv1.weight.*do not repeat")


# --- the command line -------------------------------------------------------------------------


def tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--data.root", str(tmp_path / "shapes"), "--data.num_train", "40",
        "--data.num_test", "8", "--data.image_size", "48", "--data.eval_size", "64",
        "--data.batch_size", "4", "--data.global_batch_size", "4", "--data.num_workers", "0",
        "--data.val_fraction", "0.15",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), *extra,
    ]  # fmt: skip


def test_cli_fit_test_predict_and_checkpoint_rebuild(tmp_path: Path) -> None:
    """The default experiment's config on tiny generated data: fit logs base-class mIoU and
    label-map images to W&B (offline, read back), the checkpoint alone rebuilds the model for
    ``test`` and ``predict`` (same test mIoU through ``load_from_checkpoint``), and predict
    writes class maps at the images' size."""
    cli = main(["fit", *tiny_args(tmp_path), "--trainer.max_epochs", "1",
                "--trainer.log_every_n_steps", "2"])  # fmt: skip
    assert cli.datamodule.num_classes == 16 and cli.model.hparams.num_classes == 16
    (folder,) = (tmp_path / "runs" / "wandb").glob("offline-run-*")
    run = OfflineRun(folder)
    history = run.history()
    logged = {key for row in history for key in row}
    assert {"train/loss", "val/miou", "val/miou_fg", "val/pixel_acc"} <= logged
    images = [row for row in history if "val/label_maps/_type" in row]
    assert len(images) == 1 and images[0]["val/label_maps/count"] == 4
    masks = list((folder / "files" / "media" / "images").rglob("*.png"))
    assert len(masks) >= 4
    assert "val/iou/background" in logged and "val/iou/green circle" in logged
    config = run.config()
    assert config["semantic_data"]["classes"] == 16 and config["semantic_data"]["fold"] == 0
    assert config["semantic_data"]["novel_classes"][0] == "red circle"
    best = next((tmp_path / "runs").rglob("best-*.ckpt"))
    tested = main(["test", *tiny_args(tmp_path), "--ckpt_path", str(best),
                   "--model.backbone.init_args.arch", "resnet34"])  # fmt: skip
    assert tested.model.backbone.arch == "resnet18"  # the checkpoint's model, not the option
    miou = tested.trainer.callback_metrics["test/miou_fg"].item()
    assert 0 <= miou <= 1 and tested.model.test_results["miou_fg"] == pytest.approx(miou)
    rebuilt = SemanticSegmentation.load_from_checkpoint(best)
    assert type(rebuilt.decoder) is PSPDecoder
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.test(rebuilt, datamodule=tested.datamodule, verbose=False)
    assert rebuilt.test_results["miou_fg"] == pytest.approx(miou, abs=1e-6)
    images = tmp_path / "inputs"
    images.mkdir()
    Image.new("RGB", (50, 30), (200, 40, 40)).save(images / "a.jpg")
    out = tmp_path / "predictions"
    main(["predict", *tiny_args(tmp_path), "--ckpt_path", str(best), "--data.predict_images",
          f"[{images}]", "--prediction_writer.output_dir", str(out)])  # fmt: skip
    label = open_label_png(out / "a.png")
    assert label.shape == (30, 50) and label.max() < 16 and (out / "a_overlay.jpg").is_file()


def test_bad_options_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fold must be None or one of"):
        PascalSemantic(root=str(tmp_path), fold=4)
    with pytest.raises(ValueError, match=r"val_fraction=1\.0: input should be less than 1"):
        ShapesSemantic(root=str(tmp_path), val_fraction=1.0)
    untrained = r"^predict with neither --ckpt_path nor --model\.official_checkpoint would"
    with pytest.raises(ValueError, match=untrained):
        main(["predict", *tiny_args(tmp_path), "--data.predict_images", f"[{tmp_path}]"])


def test_ranges_are_checked_when_the_command_line_is_parsed(
    capsys: pytest.CaptureFixture,
) -> None:
    """``--data.rotate_p 2`` and an optional size out of range fail in one line at parse time,
    before any data is read."""
    for option, value, expected in (
        ("rotate_p", "2", 'Parser key "rotate_p": Input should be less than or equal to 1 '
         "Got value: 2"),
        ("image_size", "4", 'Parser key "image_size": input should be greater than or equal to '
         "8 or null, got '4'"),
    ):  # fmt: skip
        with pytest.raises(SystemExit):
            main(["fit", f"--data.{option}", value])
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("error: ") and error.endswith(expected), error
    assert len(VOC_CLASSES) == 20


@pytest.mark.parametrize("name", ["bam_pascal", "bam_coco"])
def test_bam_configs_resolve_to_bam_recipes(name: str, capsys: pytest.CaptureFixture) -> None:
    """BAM's ``config/<dataset>/<dataset>_split0_resnet50_base.yaml`` values, layered on the
    default config: crop 417, scale 0.5-2.0, global batch 12, ``base_lr`` 2.5e-4 with the
    decoder (PASCAL, ``index_split: 0``) or every group (COCO, ``index_split: -1``) at 10x,
    100 / 20 epochs, the PSPNet ResNet-50 encoder, scored at 417 as BAM validates."""
    path = Path(__file__).parents[1] / "configs" / "semantic" / f"{name}.yaml"
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    model, data = config["model"], config["data"]["init_args"]
    pascal = name == "bam_pascal"
    assert config["trainer"]["max_epochs"] == (100 if pascal else 20)
    assert model["lr"] == 2.5e-4 and model["decoder_lr_mult"] == 10
    assert model["backbone_lr_mult"] == (1 if pascal else 10)
    encoder = model["backbone"]["init_args"]
    assert (encoder["arch"], encoder["stem"], encoder["output_stride"]) == ("resnet50", "deep", 8)
    assert encoder["dilation_scheme"] == "uniform" and model["decoder"]["init_args"]["bins"] == [
        1, 2, 3, 6]  # fmt: skip
    assert (data["image_size"], data["eval_size"], data["train_scale"]) == (417, 417, [0.5, 2.0])
    assert data["global_batch_size"] == 12 and data["fold"] == 0
    assert (data["eval_resize"], data["eval_pad"], data["scoring"]) == ("floor8", "black", "input")
    assert data["exclude_novel_from_train"] is False
