"""Bad inputs through the real command lines: ``tasks.segment.main`` / ``tasks.classify.main``
in-process (a command-line error is their ``SystemExit(2)``), and ``python -m tasks.segment`` for
the process exit of config-file errors (marked slow: a fresh interpreter each) and of the
one-line form the command line gives every input error (``error: <message>``, exit code 2;
``FEWSHOT_DEBUG=1`` for the traceback).

Every row of :data:`CASES` must fail with one readable message: the first line of the error (or,
for a command-line error, jsonargparse's ``error:`` section) names the field, file or value and
what was expected. Failures must come before training: no checkpoint is written and no
``training_step`` is in the traceback. The non-finite loss is the one failure that needs a
training step; its own test checks that it names the step.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType

import numpy as np
import pytest
import torch
from fixtures_data import HEIGHT, WIDTH, pascal_label, write_pascal_tree
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from PIL import Image
from test_classify import cifar_batch, write_image, write_pickle
from test_pfenet import ReferencePFENet, write_official

from backbones import ResNet
from backbones.weights import WeightsError
from datamodules.pascal import save_label_png
from datamodules.shapes import ensure_shapes
from tasks.base import BaseTask
from tasks.classify import ImageClassification
from tasks.classify import main as classify_main
from tasks.errors import DEBUG_VARIABLE, input_errors_in_one_line
from tasks.segment import FewShotSegmentation
from tasks.segment import main as segment_main

REPO = Path(__file__).resolve().parents[1]
SEGMENT, CLASSIFY = "segment", "classify"


class MessageMissing(Exception):
    """No error of the expected type and message anywhere in the chain: the readable error does
    not exist. (An ``AssertionError`` means it exists but is not the one the caller sees.)"""


# Errors raised while jsonargparse instantiates a ``class_path`` object (``model.backbone``,
# ``data``) arrive wrapped in its multi-line union report; tasks.cli.TaskCLI re-raises the project's
# own error, and condenses the report of a value rejected while parsing to one line. LightningCLI
# reads ``--ckpt_path``'s hyper-parameters before anything is instantiated; TaskCLI names the file
# when that fails (unreadable file, checkpoint of the other task).

# The tiny shapes set of tests/test_segment.py's tiny_args, generated once per module.
SHAPES = ("--data.root", "{shapes}", "--data.num_train", "200", "--data.num_test", "80",
          "--data.image_size", "64", "--data.batch_size", "4", "--data.num_workers", "0",
          "--data.val_episodes", "8", "--data.test_episodes", "8",
          "--data.min_pixels", "32")  # fmt: skip
# The PASCAL tree of tests/fixtures_data.py: 10 training and 2 test images per class.
PASCAL = ("--data", "datamodules.PascalFewShot", "--data.root", "{voc}", "--data.image_size", "32",
          "--data.batch_size", "2", "--data.num_workers", "0", "--data.val_episodes", "2",
          "--data.test_episodes", "5", "--data.val_fraction", "0.2", "--data.min_pixels", "2048",
          "--data.cache_dir", "{tmp}/cache")  # fmt: skip
FOLDER = ("--data", "ImageFolderData", "--data.root", "{folder}", "--data.image_size", "16",
          "--data.batch_size", "2", "--data.num_workers", "0")  # fmt: skip
CIFAR = ("--data", "CifarData", "--data.root", "{cifar}", "--data.batch_size", "2",
         "--data.num_workers", "0")  # fmt: skip
# Evaluating untrained weights, where a case checks another input of validate/test/predict.
UNTRAINED = ("--untrained", "allow")
# Appended to every command: a case that wrongly does not fail stops after two steps.
BOUNDED = ("--trainer.max_steps", "2", "--trainer.limit_val_batches", "1",
           "--trainer.limit_test_batches", "1", "--trainer.limit_predict_batches", "1")  # fmt: skip


# --- damage done to a test's own copy of the data --------------------------------------------


def corrupt_jpeg(paths: dict[str, Path]) -> None:
    (paths["voc"] / "JPEGImages" / "2008_train0007.jpg").write_bytes(b"\xff\xd8 not a jpeg")


def label_of_another_size(paths: dict[str, Path]) -> None:
    label = paths["voc"] / "SegmentationClassAug" / "2008_train0007.png"
    save_label_png(pascal_label(8, 0)[:, : WIDTH - 6], label)


def label_outside_the_classes(paths: dict[str, Path]) -> None:
    label = pascal_label(8, 0)
    label[0, 0] = 21
    save_label_png(label, paths["voc"] / "SegmentationClassAug" / "2008_train0007.png")


def remove_label_folder(paths: dict[str, Path]) -> None:
    shutil.rmtree(paths["voc"] / "SegmentationClassAug")


def empty_class(paths: dict[str, Path]) -> None:
    (paths["folder"] / "train" / "emu").mkdir()


def missing_cifar_batch(paths: dict[str, Path]) -> None:
    (paths["cifar"] / "data_batch_3").unlink()


def block_output(paths: dict[str, Path]) -> None:
    (paths["tmp"] / "taken").write_text("a file where the output folder should be")


def random_bytes_file(paths: dict[str, Path]) -> None:
    (paths["tmp"] / "random.pth").write_bytes(np.random.default_rng(0).bytes(2000))


def yaml_list_config(paths: dict[str, Path]) -> None:
    (paths["tmp"] / "list.yaml").write_text("- model\n- data\n")


def binary_labels(paths: dict[str, Path]) -> None:
    """Every PASCAL label rewritten as a 0/255 mask (a binary mask given as a label map)."""
    for label in (paths["voc"] / "SegmentationClassAug").glob("*.png"):
        values = np.array(Image.open(label))
        save_label_png(np.where(values > 0, 255, 0).astype(np.uint8), label)


def boolean_lr(paths: dict[str, Path]) -> None:
    (paths["tmp"] / "bool.yaml").write_text("model:\n  lr: true\n")


def unknown_yaml_key(paths: dict[str, Path]) -> None:
    (paths["tmp"] / "bad.yaml").write_text("model:\n  lr: 0.01\n  learning_rate: 0.01\n")


# --- the table -------------------------------------------------------------------------------

CASES = [
    # Backbone
    pytest.param(SEGMENT, ("fit", *SHAPES, "--model.backbone.init_args.arch", "resnet19"),
                 ValueError, r"unknown backbone arch 'resnet19'; expected one of \['resnet18'",
                 None, id="unknown-arch"),
    pytest.param(SEGMENT, ("fit", *SHAPES, "--model.backbone.init_args.depth", "50"),
                 2, r"model\.backbone.*Option 'depth' is not accepted", None,
                 id="unknown-backbone-option"),
    pytest.param(SEGMENT, ("fit", *SHAPES, "--model.backbone.init_args.output_stride", "12"),
                 ValueError, r"output_stride=12 is not supported; expected one of \[8, 16, 32\]",
                 None, id="output-stride-12"),
    pytest.param(SEGMENT, ("fit", *SHAPES, "--model.backbone.init_args.multi_grid",
                           '{"layer5": [1, 2]}'),
                 ValueError, r"multi_grid names stage 'layer5', which does not exist; expected "
                 r"one of \['layer1'", None, id="multi-grid-missing-stage"),
    pytest.param(SEGMENT, ("fit", *SHAPES, "--model.backbone.init_args.arch", "resnet50",
                           "--model.backbone.init_args.weights", "{resnet18_weights}"),
                 WeightsError, r"weights '.*resnet18\.pth' \(native layout\) do not fit backbone "
                 r"resnet50-standard-os8-contracted: they hold a resnet18 \(blocks per stage "
                 r"\[2, 2, 2, 2\]\); missing: ", None, id="weights-of-another-depth"),
    pytest.param(SEGMENT, ("fit", *SHAPES, "--model.backbone.init_args.weights",
                           "{truncated_weights}"),
                 WeightsError, r"could not read checkpoint '.*truncated\.pth' .*expected a file "
                 r"written by torch\.save", None, id="truncated-weights-file"),
    pytest.param(SEGMENT, ("fit", *SHAPES, "--model.backbone.init_args.weights",
                           "{pickled_weights}"),
                 WeightsError, r"weights file '.*pickled\.pth' holds Python objects other than "
                 r"tensors .*--model\.backbone\.init_args\.weights_trusted true", None,
                 id="weights-file-needing-unpickling"),
    pytest.param(SEGMENT, ("fit", *SHAPES, "--model.head", "tasks.heads.BAMHead",
                           "--model.head.init_args.base_learner", "{tmp}/random.pth"),
                 WeightsError, r"could not read checkpoint '.*random\.pth' \(not a pickle torch "
                 r"reads: [^)]*\); expected a file written by torch\.save$", random_bytes_file,
                 id="base-learner-of-random-bytes"),
    # Segmentation data
    pytest.param(SEGMENT, ("fit", *SHAPES, "--data.protocol", "pfnet"),
                 2, r"Parser key \"protocol\": expected one of \['clean', 'pfenet', 'asgnet', "
                 r"'hsnet', 'bam', 'dcama'\] or null, got 'pfnet'$", None,
                 id="misspelled-protocol"),
    pytest.param(SEGMENT, ("fit", *SHAPES, "--data", "datamodules.PascalFewShott"),
                 2, r"Parser key \"data\": 'datamodules\.PascalFewShott' module 'datamodules' "
                 r"has no attribute 'PascalFewShott'$", None, id="misspelled-dataset"),
    pytest.param(SEGMENT, ("fit", *SHAPES, "--model.backbone.init_args.dilation_scheme",
                           "unifrom"),
                 2, r"Parser key \"dilation_scheme\": expected one of \['contracted', "
                 r"'uniform'\], got 'unifrom'$", None, id="misspelled-dilation-scheme"),
    pytest.param(SEGMENT, ("fit", *PASCAL, "--data.root", "{tmp}/nowhere"),
                 FileNotFoundError, r"dataset root not found: .*nowhere$", None,
                 id="data-root-missing"),
    pytest.param(SEGMENT, ("fit", *PASCAL), FileNotFoundError,
                 r"folder not found: .*VOC2012/SegmentationClassAug$", remove_label_folder,
                 id="pascal-without-SegmentationClassAug"),
    pytest.param(SEGMENT, ("fit", *PASCAL), ValueError,
                 r"cannot read image .*2008_train0007\.jpg", corrupt_jpeg, id="corrupt-jpeg"),
    pytest.param(SEGMENT, ("fit", *PASCAL), ValueError,
                 rf"size mismatch: image .*2008_train0007\.jpg is \({HEIGHT}, {WIDTH}\) but label "
                 rf".*2008_train0007\.png is \({HEIGHT}, {WIDTH - 6}\)", label_of_another_size,
                 id="label-of-another-size"),
    pytest.param(SEGMENT, ("fit", *PASCAL), ValueError,
                 r"label .*2008_train0007\.png has values \[21\] that are not classes "
                 r"\(allowed: 0\.\.20 and 255\)", label_outside_the_classes,
                 id="label-values-outside-the-classes"),
    pytest.param(SEGMENT, ("fit", *PASCAL), ValueError,
                 r"pascal-train: no label of its \d+ images marks a class pixel \(only 0, "
                 r"background, and 255, ignore; .*a binary 0/255 mask marks nothing",
                 binary_labels, id="binary-0-255-labels"),
    pytest.param(SEGMENT, ("fit", *SHAPES, "--data.val_fraction", "0.99"), ValueError,
                 r"train split: .*too few for .*\(data\.val_fraction=0\.99 of each class's "
                 r"images is held out for validation\)", None, id="val-fraction-0.99"),
    pytest.param(SEGMENT, ("fit", *PASCAL, "--data.fold", "4"), ValueError,
                 r"fold must be one of \[0, 1, 2, 3\], got 4", None, id="fold-4"),
    pytest.param(SEGMENT, ("fit", *SHAPES, "--data.shots", "0"), 2,
                 r'Parser key "shots": .*Input should be greater than 0', None, id="shots-0"),
    pytest.param(SEGMENT, ("fit", *SHAPES, "--data.shots", "two"), 2,
                 r"shots.*Input should be a valid integer.*Got value: two", None,
                 id="shots-not-a-number"),
    pytest.param(SEGMENT, ("test", *PASCAL, "--data.shots", "2", *UNTRAINED), ValueError,
                 r"PascalDataset fold 0, test split: 2-shot episodes need at least 3 images per "
                 r"class .*too few for 'aeroplane' \(class 0\): 2", None,
                 id="class-with-too-few-images-for-the-shots"),
    # Optimisation and trainer
    pytest.param(SEGMENT, ("fit", *SHAPES, "--trainer.default_root_dir", "{blocker}/root"),
                 PermissionError,
                 r"cannot write runs to '.*blocker/root' .*--trainer\.default_root_dir", None,
                 id="runs-folder-not-writable"),
    pytest.param(SEGMENT, ("fit", *SHAPES, "--model.lr", "-0.1"), 2,
                 r'Parser key "model.lr": .*Input should be greater than 0 Got value: -0\.1$',
                 None, id="negative-lr"),
    pytest.param(SEGMENT, ("fit", *SHAPES, "--config", "{tmp}/bool.yaml"), 2,
                 r'Parser key "model.lr": expected a number, got the boolean true', boolean_lr,
                 id="lr-true-in-a-config"),
    pytest.param(SEGMENT, ("fit", *SHAPES, "--model.lr", "inf"), 2,
                 r'Parser key "model.lr": Input should be a finite number Got value: inf$', None,
                 id="lr-inf"),
    pytest.param(SEGMENT, ("test", *SHAPES, "--data.test_seeds", "0"), 2,
                 r'Parser key "test_seeds": input should be greater than 0, a list or null, '
                 r"got '0'$", None, id="test-seeds-0"),
    pytest.param(SEGMENT, ("test", *SHAPES), ValueError,
                 r"^test with neither --ckpt_path nor --model\.official_checkpoint would evaluate "
                 r"untrained weights; pass --ckpt_path <checkpoint> \(or last, best\), a released "
                 r"model as --model\.official_checkpoint <file>, or --untrained allow", None,
                 id="test-without-weights"),
    pytest.param(SEGMENT, ("predict", *SHAPES, "--data.predict_support", "[{image}]",
                           "--data.predict_support_masks", "[{mask}]",
                           "--data.predict_queries", "[{image}]"), ValueError,
                 r"^predict with neither --ckpt_path nor --model\.official_checkpoint would", None,
                 id="predict-without-weights"),
    pytest.param(CLASSIFY, ("validate", *FOLDER), ValueError,
                 r"^validate with no --ckpt_path would evaluate untrained weights", None,
                 id="classify-validate-without-weights"),
    pytest.param(CLASSIFY, ("fit", *FOLDER, "--model.dropout", "1.0"), 2,
                 r'Parser key "model.dropout": .*Input should be less than 1 Got value: 1\.0$',
                 None, id="classify-dropout-1"),
    # Lightning accepts any CPU device count (`--trainer.devices 64` on two cores launches 64
    # processes), so "devices that do not exist" is CUDA: on this CPU machine no CUDA device, on
    # a GPU machine one more than there are.
    pytest.param(SEGMENT, ("fit", *SHAPES, "--trainer.accelerator", "cuda", "--trainer.devices",
                           str(torch.cuda.device_count() + 1)),
                 MisconfigurationException,
                 r"CUDAAccelerator` can not run on your system since the accelerator is not "
                 r"available|only has", None, id="cuda-devices-that-do-not-exist"),
    # Config files (the process exit code itself: test_config_errors_exit_the_process)
    pytest.param(SEGMENT, ("fit", "--config", "{tmp}/bad.yaml"), 2,
                 r"does not accept option 'model\.learning_rate'", unknown_yaml_key,
                 id="unknown-yaml-key"),
    pytest.param(SEGMENT, ("fit", "--config", "{tmp}/list.yaml"), 2,
                 r"list\.yaml: a config is a mapping of options \(trainer:, model:, data: "
                 r"\.\.\.\), got a YAML list", yaml_list_config, id="config-a-yaml-list"),
    pytest.param(SEGMENT, ("fit", "--config", "{tmp}/missing.yaml"), 2,
                 r"Parser key \"config\": File does not exist: '.*missing\.yaml'", None,
                 id="config-file-not-found"),
    # Checkpoints
    pytest.param(SEGMENT, ("test", *SHAPES, "--ckpt_path", "{tmp}/missing.ckpt"),
                 FileNotFoundError, r"Checkpoint file not found: .*missing\.ckpt$", None,
                 id="ckpt-path-missing"),
    pytest.param(SEGMENT, ("test", *SHAPES, "--ckpt_path", "{truncated_ckpt}"), Exception,
                 r"truncated\.ckpt", None, id="ckpt-path-truncated"),
    pytest.param(SEGMENT, ("test", *SHAPES, "--ckpt_path", "{unknown_backbone_ckpt}"), 2,
                 r"--ckpt_path '.*unknown_backbone\.ckpt' describes its backbone as "
                 r"'my_encoders\.NoSuchNet', which does not import here \(No module named "
                 r"'my_encoders'\)", None, id="checkpoint-of-an-unknown-backbone-class"),
    pytest.param(SEGMENT, ("test", *SHAPES, "--ckpt_path", "{classify_ckpt}"), 2,
                 r"ckpt_path .*classify\.ckpt", None, id="classify-checkpoint-to-segment-test"),
    pytest.param(CLASSIFY, ("test", *FOLDER, "--ckpt_path", "{segment_ckpt}"), 2,
                 r"ckpt_path .*segment\.ckpt", None, id="segment-checkpoint-to-classify-test"),
    pytest.param(CLASSIFY, ("test", *FOLDER, "--ckpt_path", "{undescribed_ckpt}",
                            "--model.backbone.init_args.arch", "resnet34"), ValueError,
                 r"checkpoint '.*undescribed\.ckpt' does not fit ImageClassification \(missing: "
                 r"backbone\.layer1\.2\.", None, id="checkpoint-of-another-backbone"),
    # Classification data
    pytest.param(CLASSIFY, ("fit", *FOLDER), ValueError,
                 r"class folder .*train/emu holds no images", empty_class,
                 id="empty-imagefolder-class"),
    pytest.param(CLASSIFY, ("fit", *FOLDER, "--data.root", "{tmp}/nowhere"), FileNotFoundError,
                 r"dataset root not found: .*nowhere$", None, id="imagefolder-root-missing"),
    pytest.param(CLASSIFY, ("fit", *CIFAR), FileNotFoundError,
                 r"CIFAR batch file not found: .*data_batch_3$", missing_cifar_batch,
                 id="cifar-missing-batch"),
    # Prediction
    pytest.param(SEGMENT, ("predict", *SHAPES, *UNTRAINED, "--data.predict_support", "[{image}]",
                           "--data.predict_queries", "[{image}]"), ValueError,
                 r"one mask per support image: got 1 support images \(data\.predict_support\) "
                 r"and 0 masks", None, id="predict-support-without-mask"),
    pytest.param(SEGMENT, ("predict", *SHAPES, *UNTRAINED, "--data.predict_support", "[{image}]",
                           "--data.predict_support_masks", "[{tmp}/missing.png]",
                           "--data.predict_queries", "[{image}]"), FileNotFoundError,
                 r"support mask '.*missing\.png' does not exist", None,
                 id="predict-support-mask-missing"),
    pytest.param(SEGMENT, ("predict", *SHAPES, *UNTRAINED, "--data.predict_support", "[{image}]",
                           "--data.predict_support_masks", "[{mask}]",
                           "--data.predict_queries", "[{tmp}]"), FileNotFoundError,
                 r"predict query folder '.*' holds no images", None,
                 id="predict-query-folder-without-images"),
    pytest.param(SEGMENT, ("predict", *SHAPES, *UNTRAINED, "--data.predict_support", "[{image}]",
                           "--data.predict_support_masks", "[{mask}]",
                           "--data.predict_queries", "[{image}]",
                           "--prediction_writer.output_dir", "{tmp}/taken/predictions"),
                 PermissionError, r"cannot write predictions to '.*taken/predictions' .*pass a "
                 r"writable path as --prediction_writer\.output_dir", block_output,
                 id="segment-output-folder-not-writable"),
    pytest.param(CLASSIFY, ("predict", *FOLDER, *UNTRAINED, "--prediction_writer.output_file",
                            "{tmp}/taken/predictions.csv"),
                 PermissionError, r"cannot write predictions to '.*taken/predictions\.csv' .*pass "
                 r"a writable path as --prediction_writer\.output_file", block_output,
                 id="classify-output-file-not-writable"),
]  # fmt: skip


# --- data shared by the module, copied where a test damages it -------------------------------


def save_checkpoint(model: LightningModule, path: Path) -> Path:
    """A real Lightning checkpoint of ``model``, as ``fit`` writes it."""
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1)  # fmt: skip
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return path


def undescribed(path: Path, name: str) -> Path:
    """A checkpoint as written before checkpoints described their model: the config given at
    test time builds the model, which may not fit."""
    checkpoint = torch.load(path, weights_only=True)
    for key in ("backbone", "_instantiator"):
        del checkpoint["hyper_parameters"][key]
    torch.save(checkpoint, path.with_name(name))
    return path.with_name(name)


def pickled(path: Path, name: str) -> Path:
    """The weights beside an ``argparse.Namespace``, as old training scripts saved their
    arguments: loading it would unpickle arbitrary objects."""
    copy = path.with_name(name)
    torch.save({"state_dict": torch.load(path), "args": argparse.Namespace(lr=0.1)}, copy)
    return copy


def of_unknown_backbone(path: Path, name: str) -> Path:
    """A checkpoint whose model description names an encoder class this installation lacks
    (one of a user's own modules, not on the path)."""
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"]["backbone"]["class_path"] = "my_encoders.NoSuchNet"
    torch.save(checkpoint, path.with_name(name))
    return path.with_name(name)


def truncated(path: Path, name: str) -> Path:
    copy = path.with_name(name)
    copy.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return copy


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-inputs")
    shapes = root / "shapes"
    ensure_shapes(shapes, 200, 80, 0)
    voc = write_pascal_tree(root / "VOC2012")
    folder = root / "folder"
    for label, name in enumerate(("cat", "dog", "owl")):
        colour = tuple(255 if c == label else 30 for c in range(3))
        for split in ("train", "val"):
            for index in range(2):
                write_image(folder / split / name / f"{index}.png", colour)
    cifar = root / "cifar-10-batches-py"
    cifar.mkdir()
    for index in range(1, 6):
        write_pickle(cifar / f"data_batch_{index}", cifar_batch([index, 9 - index], b"labels"))
    write_pickle(cifar / "test_batch", cifar_batch([3, 1], b"labels"))
    write_pickle(cifar / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    mask = root / "mask.png"
    Image.fromarray((pascal_label(1, 0) == 1).astype(np.uint8)).save(mask)
    weights = root / "resnet18.pth"
    torch.save(ResNet("resnet18").state_dict(), weights)
    segment = FewShotSegmentation(ResNet("resnet18", output_stride=8), num_classes=20)
    segment_ckpt = save_checkpoint(segment, root / "segment.ckpt")
    classify = ImageClassification(ResNet("resnet18"), num_classes=3)  # as the folder's
    blocker = root / "blocker"  # a file where a folder is wanted: unwritable even for root
    blocker.write_text("")
    return {
        "blocker": blocker,
        "shapes": shapes,
        "voc": voc,
        "folder": folder,
        "cifar": cifar,
        "image": voc / "JPEGImages" / "2008_train0000.jpg",
        "mask": mask,
        "resnet18_weights": weights,
        "truncated_weights": truncated(weights, "truncated.pth"),
        "pickled_weights": pickled(weights, "pickled.pth"),
        "segment_ckpt": segment_ckpt,
        "truncated_ckpt": truncated(segment_ckpt, "truncated.ckpt"),
        "unknown_backbone_ckpt": of_unknown_backbone(segment_ckpt, "unknown_backbone.ckpt"),
        "classify_ckpt": save_checkpoint(classify, root / "classify.ckpt"),
        "undescribed_ckpt": undescribed(root / "classify.ckpt", "undescribed.ckpt"),
    }


@pytest.fixture(autouse=True)
def outputs_in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing is written to ``~/.cache`` or the working folder, whatever a case leaves at its
    default."""
    monkeypatch.setenv("FEWSHOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)


def workspace(shared: dict[str, Path], tmp_path: Path, args: tuple[str, ...]) -> dict[str, Path]:
    """The paths the placeholders of ``args`` name; trees a case may damage are copied."""
    paths = dict(shared, tmp=tmp_path)
    for tree in ("voc", "folder", "cifar"):
        if any(f"{{{tree}}}" in arg for arg in args):
            paths[tree] = Path(shutil.copytree(shared[tree], tmp_path / shared[tree].name))
    return paths


def substitute(arg: str, paths: dict[str, Path]) -> str:
    """``{name}`` placeholders replaced by the workspace's paths; other braces (JSON) kept."""
    return re.sub(r"\{(\w+)\}", lambda m: str(paths.get(m[1], m[0])), arg)


# --- checking a failure ----------------------------------------------------------------------


def chain(error: BaseException | None) -> Iterator[BaseException]:
    """``error`` and the errors it was raised from or while handling."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def frames(error: BaseException) -> set[str]:
    """Function names on the tracebacks of ``error`` and the errors it was raised from."""
    names = set()
    for link in chain(error):
        tb: TracebackType | None = link.__traceback__
        while tb is not None:
            names.add(tb.tb_frame.f_code.co_name)
            tb = tb.tb_next
    return names


def first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else ""


def cli_error(stderr: str) -> str:
    """jsonargparse's message: what follows the last ``error:`` of the usage text."""
    if "error:" not in stderr:
        pytest.fail(f"no 'error:' in the output:\n{stderr[-3000:]}")
    return stderr.rsplit("error:", 1)[1].strip()


def check_exception(
    main: Callable[[list[str]], None], args: list[str], expected: type, message: str
) -> None:
    try:
        main(args)
    except Exception as error:
        readable = [e for e in chain(error) if isinstance(e, expected)]
        if "training_step" in frames(error):
            pytest.fail(f"raised during training, not before: {error}")
        if not any(re.search(message, first_line(e)) for e in readable):
            raise MessageMissing(
                f"expected {expected.__name__} matching {message!r}, got "
                f"{type(error).__name__}: {error}"
            ) from error
        assert isinstance(error, expected), f"{type(error).__name__}: {error}"
        assert re.search(message, first_line(error)), f"unreadable message:\n{error}"
    else:
        pytest.fail(f"did not fail: {args}")


def check_exit(
    task: str, args: list[str], code: int, message: str, capsys: pytest.CaptureFixture
) -> None:
    main = segment_main if task == SEGMENT else classify_main
    with pytest.raises(SystemExit) as info:
        main(args)
    stderr = capsys.readouterr().err
    if info.value.code != code:
        pytest.fail(f"exit code {info.value.code}, expected {code}:\n{stderr[-3000:]}")
    text = cli_error(stderr)
    if not re.search(message, text, re.DOTALL):
        raise MessageMissing(f"expected {message!r} in the error, got:\n{text}")
    assert re.search(message, text.splitlines()[0]), f"unreadable message:\n{text}"


@pytest.mark.parametrize(("task", "args", "expected", "message", "damage"), CASES)
def test_bad_input_fails_before_training_with_a_readable_message(
    shared: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    task: str,
    args: tuple[str, ...],
    expected: type | int,
    message: str,
    damage: Callable[[dict[str, Path]], None] | None,
) -> None:
    paths = workspace(shared, tmp_path, args)
    if damage is not None:
        damage(paths)
    runs = tmp_path / "runs"
    argv = [substitute(arg, paths) for arg in args]
    argv += [*BOUNDED, "--trainer.logger.init_args.save_dir", str(runs)]
    if isinstance(expected, int):
        check_exit(task, argv, expected, message, capsys)
    else:
        main = segment_main if task == SEGMENT else classify_main
        check_exception(main, argv, expected, message)
    assert not list(tmp_path.rglob("*.ckpt")), "a checkpoint was written"


def test_non_finite_loss_stops_with_the_step_and_a_hint(
    shared: dict[str, Path], tmp_path: Path
) -> None:
    """A learning rate of 1e30 blows the weights up in the first update: the second step's loss
    is NaN and the run stops there, naming the step and the option to change."""
    args = [substitute(arg, shared) for arg in SHAPES]
    with pytest.raises(FloatingPointError) as info:
        segment_main(["fit", *args, *BOUNDED, "--trainer.max_steps", "5", "--model.lr", "1e30",
                      "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])  # fmt: skip
    assert re.fullmatch(
        r"non-finite training loss \((nan|inf|-inf)\) at global step 1, epoch 0: lower the "
        r"learning rate \(model\.lr\) or check the data",
        str(info.value),
    )
    assert not list(tmp_path.rglob("*.ckpt"))


def test_config_with_a_key_written_twice_is_refused_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """YAML keeps a repeated key's second value without a word; the CLI refuses the file."""
    config = tmp_path / "twice.yaml"
    config.write_text("data:\n  init_args:\n    shots: 1\n    fold: 0\n    shots: 5\n")
    check_exit(SEGMENT, ["fit", "--config", str(config)], 2,
               rf"{re.escape(str(config))}:5: duplicate key 'shots' \(first at line 3\)",
               capsys)  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["twice.yaml"]


def test_config_with_a_tab_is_refused_with_file_line_and_column(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    config = tmp_path / "tab.yaml"
    config.write_text("model:\n\tlr: 0.1\n")
    check_exit(SEGMENT, ["fit", "--config", str(config)], 2,
               rf"{re.escape(str(config))}:2:1: not valid YAML .*indents with spaces, not tabs",
               capsys)  # fmt: skip


def test_a_ckpt_path_that_is_a_folder_a_state_dict_or_a_config_is_named(
    shared: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    state = tmp_path / "state.ckpt"
    torch.save(ResNet("resnet18").state_dict(), state)
    config = tmp_path / "config.yaml"
    config.write_text("model:\n  lr: 0.01\n")
    cases = (
        (tmp_path, "is a folder; expected a checkpoint file in it"),
        (state, "is not a Lightning checkpoint .*--model.backbone.init_args.weights"),
        (config, "is a YAML file; a config goes to --config, --ckpt_path takes a checkpoint"),
    )
    for path, message in cases:
        check_exit(SEGMENT, ["test", "--data.root", str(shared["shapes"]), "--ckpt_path",
                             str(path)], 2, rf"--ckpt_path '{re.escape(str(path))}' {message}",
                   capsys)  # fmt: skip


def test_deferred_non_finite_check_names_the_step_it_happened(
    shared: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On accelerators the check is recorded on the device and read every few steps (no sync
    per step): forced here on the CPU, read every 3 steps, the run stops at the read after the
    NaN of step 1 and still names step 1; no checkpoint holds the blown-up weights."""
    monkeypatch.setattr(BaseTask, "finite_check_deferred", True)
    monkeypatch.setattr(BaseTask, "finite_check_every", 3)
    args = [substitute(arg, shared) for arg in SHAPES]
    with pytest.raises(FloatingPointError, match=r"at global step 1, epoch 0: lower") as info:
        segment_main(["fit", *args, *BOUNDED, "--trainer.max_steps", "5", "--model.lr", "1e30",
                      "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])  # fmt: skip
    frames = [frame.name for frame in info.traceback]
    assert "raise_if_nonfinite" in frames and "training_step" in frames
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("bad.yaml", r"does not accept option 'model\.learning_rate'"),
        ("missing.yaml", r"File does not exist: '.*missing\.yaml'"),
    ],
    ids=["unknown-yaml-key", "config-file-not-found"],
)
def test_config_errors_exit_the_process(tmp_path: Path, config: str, message: str) -> None:
    """``python -m tasks.segment`` itself exits with code 2 and says why on stderr."""
    unknown_yaml_key({"tmp": tmp_path})
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "tasks.segment", "fit", "--config", str(tmp_path / config)],
        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=path), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(message, cli_error(result.stderr).splitlines()[0])
    assert [p.name for p in tmp_path.iterdir()] == ["bad.yaml"], "the command wrote files"


def test_the_command_line_prints_an_input_error_as_one_line(shared: dict[str, Path]) -> None:
    """``python -m tasks.segment`` prints a project error raised before training as one
    ``error:`` line and exits 2; ``FEWSHOT_DEBUG=1`` shows the traceback (and Python's exit
    code 1)."""
    args = [sys.executable, "-m", "tasks.segment", "fit",
            *[substitute(arg, shared) for arg in SHAPES], "--data.fold", "4"]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, WANDB_MODE="offline")
    env.pop(DEBUG_VARIABLE, None)
    cwd = shared["shapes"].parent
    short = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert short.returncode == 2, short.stderr[-3000:]
    assert short.stderr.strip().splitlines()[-1] == "error: fold must be one of [0, 1, 2, 3], got 4"
    assert "Traceback" not in short.stderr
    debug = subprocess.run(args, cwd=cwd, env=env | {DEBUG_VARIABLE: "1"}, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == (
        "ValueError: fold must be one of [0, 1, 2, 3], got 4"
    )


def _run_stage() -> None:
    """Named as Lightning's frame that runs the loops: what it raises is raised while running."""
    raise ValueError("a shape problem inside a step")


def test_errors_while_running_and_other_crashes_keep_their_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.delenv(DEBUG_VARIABLE, raising=False)
    with pytest.raises(ValueError, match="inside a step"), input_errors_in_one_line():
        _run_stage()
    with pytest.raises(KeyError), input_errors_in_one_line():
        raise KeyError("a bug")
    with pytest.raises(SystemExit) as info, input_errors_in_one_line():
        raise WeightsError("weights 'x.pth' do not fit\n  missing: a, b")
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: weights 'x.pth' do not fit missing: a, b\n"


def test_a_released_model_with_its_paper_config_needs_no_imagenet_weights(
    shared: dict[str, Path], tmp_path: Path
) -> None:
    """``--config configs/segment/pfenet_pascal.yaml --model.official_checkpoint F``: the
    config's ``pretrained/resnet50_v2.pth`` (absent here) is not read, since the file's encoder
    replaces the configured one."""
    torch.manual_seed(0)
    bins = [1.0, 0.5, 0.25, 0.125]
    path = write_official(ReferencePFENet(bins, 1).eval(), tmp_path / "train_epoch_200.pth")
    assert not (tmp_path / "pretrained").exists()
    args = [substitute(arg, shared) for arg in SHAPES]
    cli = segment_main(["test", "--config", str(REPO / "configs/segment/pfenet_pascal.yaml"),
                        "--data", "datamodules.ShapesFewShot", *args, *BOUNDED,
                        "--model.official_checkpoint", str(path),
                        "--model.head.init_args.bins", str(bins),
                        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")])  # fmt: skip
    assert cli.model.backbone.summary()[1] == "resnet50-deep-os8-uniform"
    assert cli.model.hparams.freeze_backbone
