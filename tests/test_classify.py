"""The classification task and its data: real files, hand-computed metrics, the CLI in-process,
and a classification checkpoint reused as the segmentation backbone."""

from __future__ import annotations

import csv
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image
from test_segment import tiny_args

from backbones import build_backbone
from datamodules import CifarData, ImageFolderData, ShapesClassification
from datamodules.classification import shapes_class_folder
from datamodules.transforms import IMAGENET_MEAN, IMAGENET_STD
from tasks.base import build_scheduler, upgrade_scheduler_states
from tasks.classify import ImageClassification, main
from tasks.segment import main as segment_main

CLASSES = ("cat", "dog", "owl")


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (24, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """3 classes of solid colours (learnable in a few steps): 4 train and 2 val images each."""
    root = tmp_path / "folder"
    for label, name in enumerate(CLASSES):
        colour = tuple(255 if c == label else 30 for c in range(3))
        for split, count in (("train", 4), ("val", 2)):
            for index in range(count):
                write_image(root / split / name / f"{index}.png", colour)
    return root


def test_hidden_entries_are_not_classes_or_images(image_folder: Path) -> None:
    """Jupyter's ``.ipynb_checkpoints`` beside the classes and macOS's ``._0.png`` beside the
    images are not data."""
    for split in ("train", "val"):
        write_image(image_folder / split / ".ipynb_checkpoints" / "0-checkpoint.png", (0, 0, 0))
        (image_folder / split / CLASSES[0] / "._0.png").write_bytes(b"\x00\x05\x16\x07")
    dm = ImageFolderData(str(image_folder), image_size=16, batch_size=5, num_workers=0)
    assert dm.class_names == list(CLASSES)
    dm.setup("fit")
    labels = torch.cat([b["label"] for b in dm.val_dataloader()]).tolist()
    assert labels == [0, 0, 1, 1, 2, 2]


def write_pickle(path: Path, content: dict) -> None:
    with path.open("wb") as file:
        pickle.dump(content, file)


def cifar_batch(labels: list[int], labels_key: bytes) -> dict:
    """Image ``i`` is red ``10 * i`` everywhere, green 7, blue ``labels[i]``: the real row format
    (1024 red, 1024 green, 1024 blue values, each plane row-major)."""
    data = np.zeros((len(labels), 3, 32 * 32), dtype=np.uint8)
    data[:, 0] = (10 * np.arange(len(labels)))[:, None]
    data[:, 1] = 7
    data[:, 2] = np.array(labels)[:, None]
    return {b"data": data.reshape(len(labels), 3072), labels_key: labels}


@pytest.fixture
def cifar10(tmp_path: Path) -> Path:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for index in range(1, 6):
        write_pickle(root / f"data_batch_{index}", cifar_batch([index, 9 - index], b"labels"))
    write_pickle(root / "test_batch", cifar_batch([3, 1, 4, 1], b"labels"))
    write_pickle(root / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    return tmp_path


@pytest.fixture
def cifar100(tmp_path: Path) -> Path:
    root = tmp_path / "cifar100"
    root.mkdir()
    write_pickle(root / "train", cifar_batch([0, 99, 42], b"fine_labels"))
    write_pickle(root / "test", cifar_batch([5, 6], b"fine_labels"))
    names = {b"fine_label_names": [f"f{i}".encode() for i in range(100)], b"coarse_label_names": []}
    write_pickle(root / "meta", names)
    return root


# --- data -----------------------------------------------------------------------------------


def test_image_folder_batches(image_folder: Path) -> None:
    dm = ImageFolderData(str(image_folder), image_size=16, batch_size=5, num_workers=0)
    assert dm.class_names == list(CLASSES) and dm.num_classes == 3
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (5, 3, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].dtype == torch.long and len(batch["id"]) == 5
    val = list(dm.val_dataloader())
    labels = torch.cat([b["label"] for b in val]).tolist()
    assert labels == [0, 0, 1, 1, 2, 2]
    assert Path(val[0]["id"][0]) == image_folder / "val" / "cat" / "0.png"
    # Evaluation resizes a solid image to the same colour, ImageNet-normalised.
    expected = (torch.tensor([255, 30, 30]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    assert torch.allclose(val[0]["image"][0, :, 8, 8], expected, atol=1e-5)


def test_cifar10_reads_the_python_batches(cifar10: Path) -> None:
    dm = CifarData(str(cifar10), batch_size=4, num_workers=0)
    assert dm.variant == "cifar10" and dm.class_names[:2] == ["c0", "c1"] and dm.num_classes == 10
    dm.setup("fit")
    train, val = dm.dataset("train"), dm.dataset("val")
    assert len(train) == 10 and train.labels == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4]
    assert val.labels == [3, 1, 4, 1] and val.ids[2] == "test_batch:00002"
    assert val.images.shape == (4, 32, 32, 3)
    assert val.images[2, 5, 9].tolist() == [20, 7, 4]  # HWC pixel from the plane layout
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32)


def test_cifar100_uses_fine_labels(cifar100: Path) -> None:
    dm = CifarData(str(cifar100), num_workers=0)
    assert dm.variant == "cifar100" and dm.num_classes == 100
    dm.setup("fit")
    assert dm.dataset("train").labels == [0, 99, 42] and dm.dataset("val").labels == [5, 6]


def test_shapes_base_only_fold_never_writes_novel_classes(tmp_path: Path) -> None:
    options = dict(root=str(tmp_path), train_per_class=2, val_per_class=1, scene_size=32)
    dm = ShapesClassification(base_only_fold=1, **options)
    full = ShapesClassification(**options)
    assert dm.num_classes == 15 and full.num_classes == 20
    dm.prepare_data()
    full.prepare_data()
    novel = {shapes_class_folder(c) for c in range(5, 10)}
    for split, count in (("train", 2), ("val", 1)):
        folders = {p.name for p in (dm.folder / split).iterdir()}
        assert folders == {shapes_class_folder(c) for c in range(20)} - novel
        assert all(len(list((dm.folder / split / f).iterdir())) == count for f in folders)
    # A base-only tree is exactly the full tree without the novel classes.
    image = Path("train", shapes_class_folder(12), "00001.jpg")
    assert (dm.folder / image).read_bytes() == (full.folder / image).read_bytes()
    dm.setup("fit")
    assert set(dm.dataset("train").samples) == {
        (path, dm.class_names.index(path.parent.name))
        for path in (dm.folder / "train").rglob("*.jpg")
    }


# --- bad input ------------------------------------------------------------------------------


def test_missing_root_shows_the_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"(?s)dataset root not found: .*nowhere.*train/"):
        ImageFolderData(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("split", ["train", "val"])
def test_missing_split_folder_shows_the_layout(image_folder: Path, split: str) -> None:
    shutil.rmtree(image_folder / split)
    with pytest.raises(
        FileNotFoundError, match=rf"(?s){split} folder not found: .*Expected layout"
    ):
        ImageFolderData(str(image_folder))


def test_empty_class_folder_is_named(image_folder: Path) -> None:
    (image_folder / "val" / "emu").mkdir()
    (image_folder / "train" / "emu").mkdir()
    dm = ImageFolderData(str(image_folder), num_workers=0)
    with pytest.raises(ValueError, match=r"class folder .*train/emu holds no images"):
        dm.setup("fit")


def test_val_class_unknown_to_train_is_named(image_folder: Path) -> None:
    write_image(image_folder / "val" / "emu" / "0.png", (0, 0, 0))
    with pytest.raises(ValueError, match=r"class folders \['emu'\] that train/ lacks"):
        ImageFolderData(str(image_folder), num_workers=0).setup("validate")


def test_corrupt_image_is_named(image_folder: Path) -> None:
    bad = image_folder / "val" / "dog" / "1.png"
    bad.write_bytes(b"not a png")
    dm = ImageFolderData(str(image_folder), batch_size=2, num_workers=0)
    dm.setup("validate")
    with pytest.raises(ValueError, match=rf"cannot read image {bad}"):
        list(dm.val_dataloader())


def test_cifar_missing_batch_file_is_named(cifar10: Path) -> None:
    missing = cifar10 / "cifar-10-batches-py" / "data_batch_3"
    missing.unlink()
    dm = CifarData(str(cifar10), num_workers=0)
    with pytest.raises(FileNotFoundError, match=rf"CIFAR batch file not found: {missing}"):
        dm.setup("fit")


def test_cifar_folder_without_meta_shows_the_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"(?s)CIFAR meta file.*data_batch_1"):
        CifarData(str(tmp_path))


@pytest.mark.parametrize(
    ("options", "field"),
    [({"dropout": 1.0}, "dropout"), ({"label_smoothing": -0.1}, "label_smoothing"),
     ({"lr": 0}, "lr"), ({"num_classes": 1}, "num_classes"), ({"schedule": "step"}, "schedule"),
     ({"optimizer": "adam"}, "optimizer")],
)  # fmt: skip
def test_model_arguments_are_validated(options: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}="):
        ImageClassification(build_backbone("resnet18"), **options)


def test_datamodule_arguments_are_validated(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="batch_size=0: input should be greater than 0"):
        ImageFolderData(str(image_folder), batch_size=0)
    with pytest.raises(ValueError, match="scene_size=8: input should be greater than or equal"):
        ShapesClassification(str(tmp_path), scene_size=8)
    with pytest.raises(ValueError, match="base_only_fold must be None or one of"):
        ShapesClassification(str(tmp_path), base_only_fold=4)


# --- model ----------------------------------------------------------------------------------


def test_top1_top5_against_a_hand_computed_example() -> None:
    """True classes ranked 1st, 3rd, 6th and 5th of 6: top-1 = 1/4, top-5 = 3/4."""
    model = ImageClassification(build_backbone("resnet18"), num_classes=6)
    scores = torch.tensor([6.0, 5, 4, 3, 2, 1])  # class c ranked c + 1
    logits = torch.stack([scores.roll(shift) for shift in (0, 2, 5, 4)])
    # shift s moves class 0's score to class s: the true class t has rank (t - s) % 6 + 1
    target = torch.tensor([0, 4, 4, 2])
    result = model.val_metrics(logits, target)
    assert result["val/acc1"].item() == pytest.approx(0.25)
    assert result["val/acc5"].item() == pytest.approx(0.75)
    assert set(ImageClassification(num_classes=4).val_metrics) == {"val/acc1"}


def test_logits_shape_for_dilated_backbones() -> None:
    backbone = build_backbone("resnet18", output_stride=8)
    model = ImageClassification(backbone, num_classes=7).eval()
    assert model(torch.randn(2, 3, 40, 40)).shape == (2, 7)


@pytest.mark.parametrize("total", [10, 3000])
def test_schedules_follow_the_closed_forms_per_step(total: int) -> None:
    """The rate of optimizer step ``t`` (0-based) is the closed form the reference recipes
    write: poly ``lr (1 - (t + 1)/T)^p`` (``poly_learning_rate`` set before iteration ``t + 1``:
    the last step at 0), cosine ``lr (1 + cos(pi t/T)) / 2``."""
    for schedule, power, closed in (
        ("poly", 0.9, lambda t: max(0.0, 1 - (t + 1) / total) ** 0.9),
        ("poly", 2.0, lambda t: max(0.0, 1 - (t + 1) / total) ** 2.0),
        ("cosine", 0.9, lambda t: 0.5 * (1 + math.cos(math.pi * t / total))),
    ):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
        scheduler = build_scheduler(optimizer, schedule, total, power)
        rates = [optimizer.param_groups[0]["lr"]]
        for _ in range(total):
            optimizer.step()
            scheduler.step()
            rates.append(optimizer.param_groups[0]["lr"])
        expected = [0.01 * closed(t) for t in range(total + 1)]
        assert rates == pytest.approx(expected, rel=1e-12, abs=1e-15), schedule


def test_a_polynomial_lr_state_of_an_older_checkpoint_resumes_on_the_papers_schedule() -> None:
    """A run saved with torch's ``PolynomialLR`` (before the papers' schedule) resumes: the state
    loads into :func:`build_scheduler`'s scheduler and the step count carries on."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    old = torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=10, power=0.9)
    for _ in range(3):
        optimizer.step()
        old.step()
    checkpoint = {"lr_schedulers": [old.state_dict()]}
    upgrade_scheduler_states(checkpoint)
    scheduler = build_scheduler(optimizer, "poly", 10, 0.9)
    scheduler.load_state_dict(checkpoint["lr_schedulers"][0])
    optimizer.step()
    scheduler.step()
    assert scheduler.last_epoch == 4
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - 5 / 10) ** 0.9)


def test_per_class_accuracy_is_logged(image_folder: Path) -> None:
    dm = ImageFolderData(str(image_folder), image_size=16, batch_size=4, num_workers=0)
    model = ImageClassification(build_backbone("resnet18"), num_classes=3)
    trainer = Trainer(max_epochs=1, limit_train_batches=1, logger=False, enable_checkpointing=False)
    trainer.fit(model, dm)
    metrics = trainer.callback_metrics
    assert {"val/acc1", "val/loss", "train/loss"} <= set(metrics)
    assert {f"val/acc_class/{name}" for name in CLASSES} <= set(metrics)


# --- the command line -----------------------------------------------------------------------


def cli_args(runs: Path, data: str, root: Path, *extra: str) -> list[str]:
    return [
        "--data",
        data,
        "--data.root",
        str(root),
        "--data.image_size",
        "32",
        "--data.batch_size",
        "4",
        "--data.num_workers",
        "0",
        "--trainer.logger.init_args.save_dir",
        str(runs),
        *extra,
    ]


@pytest.mark.slow
def test_cli_fit_validate_test_predict_in_process(image_folder: Path, tmp_path: Path) -> None:
    args = cli_args(tmp_path / "runs", "ImageFolderData", image_folder)
    main(["fit", *args, "--trainer.max_epochs", "1", "--model.optimizer", "adamw",
          "--model.lr", "0.001", "--model.schedule", "poly"])  # fmt: skip
    checkpoints = list((tmp_path / "runs").rglob("*.ckpt"))
    names = {p.name for p in checkpoints}
    assert "last.ckpt" in names and any(n.startswith("best") for n in names)
    last = str(next(p for p in checkpoints if p.name == "last.ckpt"))
    for command in ("validate", "test"):
        main([command, *args, "--ckpt_path", last])
    output = tmp_path / "out" / "val.csv"
    main(["predict", *args, "--ckpt_path", last, "--prediction_writer.output_file", str(output)])
    rows = list(csv.DictReader(output.open()))
    assert [Path(r["file"]).relative_to(image_folder / "val").parts[0] for r in rows] == [
        name for name in CLASSES for _ in range(2)
    ]
    assert all(r["class"] in CLASSES and 0 < float(r["probability"]) <= 1 for r in rows)
    folder = tmp_path / "unlabelled"
    write_image(folder / "a.jpg", (255, 30, 30))
    write_image(folder / "sub" / "b.png", (30, 30, 255))
    output = tmp_path / "out" / "folder.csv"
    main(["predict", *args, "--ckpt_path", last, "--data.predict_dir", str(folder),
          "--prediction_writer.output_file", str(output)])  # fmt: skip
    assert [r["file"] for r in csv.DictReader(output.open())] == [
        str(folder / "a.jpg"),
        str(folder / "sub" / "b.png"),
    ]


@pytest.mark.slow
def test_cli_fit_on_cifar(cifar10: Path, tmp_path: Path) -> None:
    main(["fit", *cli_args(tmp_path / "runs", "CifarData", cifar10), "--trainer.max_steps", "2"])
    assert len(list((tmp_path / "runs").rglob("last.ckpt"))) == 1


@pytest.mark.slow
def test_pretrain_classify_then_few_shot_segment(tmp_path: Path) -> None:
    """Pretrain on the base classes of fold 0, then load ``last.ckpt`` as the segmentation
    backbone (output stride 8: dilation does not change the tensors) and fit two steps."""
    main(
        [
            "fit",
            *cli_args(tmp_path / "runs", "ShapesClassification", tmp_path / "shapes-cls"),
            "--data.base_only_fold",
            "0",
            "--data.train_per_class",
            "3",
            "--data.val_per_class",
            "1",
            "--data.scene_size",
            "40",
            "--trainer.max_steps",
            "2",
        ]
    )
    checkpoint = next((tmp_path / "runs").rglob("last.ckpt"))
    state = torch.load(checkpoint, weights_only=False)["state_dict"]
    backbone = build_backbone("resnet18", output_stride=8, weights=str(checkpoint))
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state["backbone." + key]), key
    segment = tmp_path / "segment"
    segment_main(["fit", *tiny_args(segment), "--model.backbone.init_args.weights", str(checkpoint),
                  "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1"])  # fmt: skip
    assert len(list((segment / "runs").rglob("last.ckpt"))) == 1
