"""Helpers shared by the benchmark scripts, so that every script times, describes the machine and
builds its models the same way: device description, synthetic episodes, models and data built
from the project's configs, the training step, interleaved timing and Markdown tables."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import LightningDataModule

from backbones import ResNet
from tasks.segment import FewShotSegmentation

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = CONFIGS / "segment" / "default.yaml"
BACKBONES = {
    "resnet18_os8": CONFIGS / "backbones" / "resnet18_os8.yaml",
    "resnet50_deep_os8": CONFIGS / "backbones" / "resnet50_deep_os8.yaml",
    "resnet101_deep_os8": CONFIGS / "backbones" / "resnet101_deep_os8.yaml",
    "resnet50": CONFIGS / "backbones" / "resnet50.yaml",
}


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda (default: cuda when present)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op CPU threads (default: torch's, one per core); 1 keeps CPU timings stable "
        "when other jobs share the cores, where a waiting OpenMP thread stalls every op",
    )


def setup_device(args: argparse.Namespace) -> torch.device:
    """The device of ``--device``, with ``--threads`` applied."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return torch.device(args.device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def describe(device: torch.device, threads: bool = True) -> str:
    """One header line naming what the numbers were measured on; on CPU with the 1-minute load
    average, since other jobs on the cores change CPU timings."""
    text = f"device {device} ({device_name(device)})"
    if threads:
        text += f", {torch.get_num_threads()} threads"
    if device.type == "cpu":
        text += f", load average {os.getloadavg()[0]:.1f}"
    return f"{text}, torch {torch.__version__}, python {platform.python_version()}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_alternating(
    runs: Mapping[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each function, the calls interleaved so that machine noise
    (other jobs, clock changes) hits all of them alike."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def synthetic_batch(batch: int, shots: int, size: int, device: torch.device) -> dict[str, Any]:
    """Random episodes in the :mod:`datamodules.episode` format (no loader cost is measured)."""
    masks = torch.zeros(batch, shots, size, size, dtype=torch.long, device=device)
    masks[..., size // 4 : 3 * size // 4, size // 3 : 2 * size // 3] = 1
    query_mask = masks[:, 0].clone()
    return {
        "query_image": torch.randn(batch, 3, size, size, device=device),
        "query_mask": query_mask,
        "support_images": torch.randn(batch, shots, 3, size, size, device=device),
        "support_masks": masks,
        "class_id": torch.arange(batch, device=device) % 5,
        "query_label": query_mask,
        "query_size": torch.tensor([[size, size]] * batch, device=device),
        "query_valid": torch.tensor([[size, size]] * batch, device=device),
    }


def import_class(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def load_backbone(config: str | Path, **overrides: Any) -> ResNet:
    """A ``configs/backbones/*.yaml`` encoder (a file path or a key of :data:`BACKBONES`)."""
    spec = yaml.safe_load(Path(BACKBONES.get(str(config), config)).read_text())
    return ResNet(**{**spec.get("init_args", {}), **overrides})


def default_config() -> dict[str, Any]:
    return yaml.safe_load(DEFAULT_CONFIG.read_text())


def default_model(**overrides: Any) -> FewShotSegmentation:
    """The model of ``python -m tasks.segment fit``: the task's defaults."""
    return FewShotSegmentation(**overrides)


def default_datamodule(class_path: str | None = None, **overrides: Any) -> LightningDataModule:
    """The datamodule of ``python -m tasks.segment fit`` (or another episodic datamodule with the
    same episode settings), with ``overrides`` of its arguments."""
    spec = default_config()["data"]
    datamodule = import_class(class_path or spec["class_path"])
    return datamodule(**{**spec.get("init_args", {}), **overrides})


def sgd(model: FewShotSegmentation) -> torch.optim.Optimizer:
    """The task's optimizer (SGD, the model's lr/momentum/weight decay) over what trains."""
    hp = model.hparams
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)


def train_step(
    model: FewShotSegmentation,
    optimizer: torch.optim.Optimizer,
    batch: Mapping[str, Any],
    bf16: bool = False,
) -> torch.Tensor:
    """The task's training step without Lightning: batched backbone call, head, loss (with the
    head's auxiliary losses), backward and SGD update; bf16 autocast around the forward."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    device_type = batch["query_image"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        loss = model.loss(model.segment(batch), batch["query_mask"]).total
    loss.backward()
    optimizer.step()
    return loss.detach()


def episodes_per_second(loader: Iterable[Mapping[str, Any]], batches: int) -> float:
    """Throughput of a loader after one warm-up batch (worker start-up excluded)."""
    iterator = iter(loader)
    next(iterator)
    start, episodes = time.perf_counter(), 0
    for _ in range(batches):
        episodes += len(next(iterator)["class_id"])
    return episodes / (time.perf_counter() - start)


def markdown_row(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]] = ()) -> str:
    """A Markdown table; with no rows its header, for rows printed as they are measured."""
    return "\n".join([markdown_row(header), "|" + " --- |" * len(header), *map(markdown_row, rows)])
