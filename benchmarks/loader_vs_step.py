"""The training loader's episodes/s against what the training step consumes on the same machine
(target: the loader delivers at least twice what the step consumes).

The real datamodule of the default experiment (``configs/segment/default.yaml``: shapes fold 0,
1-shot, 96 px, batch 8) at each worker count, and the default model's training step (ResNet-18
at output stride 8, fine-tuned, prototype head, SGD) on batches taken from that loader and held
in memory. Each worker count gets its own step measurement right after its loader measurement, so
every ratio compares neighbouring times. The last column runs the step fed by the live loader
(the loop of a real fit, without Lightning): workers and step then share the cores.

``--dataset pascal-like`` runs PascalFewShot on a generated tree of PASCAL-sized JPEGs
(:mod:`benchmarks.voc_like`), so decoding and augmenting cost what they cost on real data.

    python -m benchmarks.loader_vs_step --workers 0 1 2
    python -m benchmarks.loader_vs_step --dataset pascal-like --workers 2
    python -m benchmarks.loader_vs_step --dataset pascal --root /data/VOC2012 --device cuda
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from benchmarks.common import (
    BACKBONES,
    add_device_arguments,
    default_datamodule,
    default_model,
    describe,
    episodes_per_second,
    load_backbone,
    markdown_row,
    markdown_table,
    setup_device,
    sgd,
    synchronize,
    time_alternating,
    train_step,
)
from benchmarks.segment import HEADS
from benchmarks.voc_like import write_voc_like_tree
from datamodules.episode import to_model_inputs
from tasks.segment import FewShotSegmentation

DATASETS = {
    "shapes": "datamodules.ShapesFewShot",
    "pascal": "datamodules.PascalFewShot",
    "pascal-like": "datamodules.PascalFewShot",
}


def moved(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors copied to ``device`` (from pinned memory, asynchronously on a GPU)."""
    return {
        key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
        for key, value in batch.items()
    }


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """What Lightning does with a batch: the copy, then the datamodule's
    ``on_after_batch_transfer`` (rendering and normalisation on the device)."""
    return to_model_inputs(moved(batch, device))


def build_model(args: argparse.Namespace) -> FewShotSegmentation:
    """The default model, or a frozen ``--backbone`` with ``--head`` (channels_last with
    ``--bf16``)."""
    if args.backbone is None:
        return default_model(head=HEADS[args.head], channels_last=args.bf16)
    return FewShotSegmentation(backbone=load_backbone(args.backbone), head=HEADS[args.head],
                               freeze_backbone=True, channels_last=args.bf16)  # fmt: skip


def step_rate(
    model: FewShotSegmentation,
    optimizer: torch.optim.Optimizer,
    batches: list[dict[str, Any]],
    args: argparse.Namespace,
    device: torch.device,
) -> float:
    """Episodes/s of the training step on loader batches held on the device (taken in turn),
    converted there as in every step (:func:`datamodules.episode.to_model_inputs`)."""
    cycle = itertools.cycle(batches)
    runs = {"step": lambda: train_step(model, optimizer, to_model_inputs(next(cycle)), args.bf16)}
    seconds = time_alternating(runs, args.steps, args.warmup, device)["step"]
    return len(batches[0]["class_id"]) / seconds


def fed_rate(
    model: FewShotSegmentation,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    args: argparse.Namespace,
    device: torch.device,
) -> float:
    """Episodes/s of the step fed by the live loader, after one warm-up step."""
    iterator = iter(loader)
    steps = args.steps
    train_step(model, optimizer, to_device(next(iterator), device), args.bf16)
    synchronize(device)
    start, episodes = time.perf_counter(), 0
    for batch in itertools.islice(iterator, steps):
        train_step(model, optimizer, to_device(batch, device), args.bf16)
        episodes += len(batch["class_id"])
    synchronize(device)
    return episodes / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=list(DATASETS), default="shapes")
    parser.add_argument(
        "--root",
        default=None,
        help="dataset root (default: the datamodule's); pascal-like: where to generate it",
    )
    parser.add_argument("--image-size", type=int, default=None, help="default: the datamodule's")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batches", type=int, default=40, help="timed loader batches")
    parser.add_argument("--steps", type=int, default=8, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--backbone",
        default=None,
        help="a frozen encoder: a key of "
        f"{sorted(BACKBONES)} or a config file (default: the default model's)",
    )
    parser.add_argument("--head", choices=list(HEADS), default="prototype")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast and channels_last")
    parser.add_argument("--protocol", default=None, help="data.protocol (default: clean)")
    parser.add_argument("--augment-on", choices=["cpu", "gpu"], default="cpu")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    device = setup_device(args)
    root = args.root
    if args.dataset == "pascal-like":
        base = Path(args.root or tempfile.mkdtemp(prefix="voc-like-"))
        root = str(write_voc_like_tree(base / "VOC2012"))
    overrides: dict[str, Any] = {"root": root, "batch_size": args.batch_size}
    overrides.update(protocol=args.protocol, augment_on=args.augment_on)
    if args.image_size:
        overrides["image_size"] = args.image_size
    probe = default_datamodule(DATASETS[args.dataset], num_workers=0, **overrides)
    probe.prepare_data()
    probe.setup("fit")
    torch.manual_seed(0)
    model = build_model(args).to(device)
    optimizer = sgd(model)
    loaded = itertools.islice(probe.train_dataloader(), 4)
    batches = [moved(batch, device) for batch in loaded]
    print(
        f"# {args.dataset} ({type(probe).__name__}), {probe.image_size} px, batch "
        f"{args.batch_size}, {probe.shots}-shot; model "
        f"({model.backbone.summary()[1]}, "
        f"{type(model.head).__name__}, {'frozen' if args.backbone else 'fine-tuned'}"
        f"{', bf16+channels_last' if args.bf16 else ''}), protocol {probe.protocol['name']}, "
        f"augment on {args.augment_on}; {describe(device)}"
    )
    header = ["loader workers", "loader ep/s", "step ep/s (batches in memory)", "loader / step",
              "step fed by the loader ep/s"]  # fmt: skip
    print(markdown_table(header), flush=True)
    for workers in args.workers:
        datamodule = default_datamodule(DATASETS[args.dataset], num_workers=workers, **overrides)
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        loaded = episodes_per_second(loader, args.batches)
        consumed = step_rate(model, optimizer, batches, args, device)
        fed = fed_rate(model, optimizer, loader, args, device)
        ratio = f"{loaded / consumed:.1f}x"
        print(
            markdown_row([workers, f"{loaded:.1f}", f"{consumed:.2f}", ratio, f"{fed:.2f}"]),
            flush=True,
        )


if __name__ == "__main__":
    main()
