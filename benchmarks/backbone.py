"""This project's ResNet encoder against torchvision's at the same configuration.

Both models run alternately in one process on the same input (forward, and forward+backward), so
that machine noise hits both alike; the reported number is the ratio of medians, ours over
torchvision's (target: at most 1.02). Modes: float32, channels_last, bf16 autocast (CPU and CUDA).

    python -m benchmarks.backbone --arch resnet50 --output-stride 8 --size 224 --batch 2
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torchvision
from torch import nn

from backbones import build_backbone

DILATION = {32: [False, False, False], 16: [False, False, True], 8: [False, True, True]}


class TorchvisionFeatures(nn.Module):
    """torchvision's ResNet run up to layer4, returning the same four features."""

    def __init__(self, model: torchvision.models.ResNet) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        features = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(m, name)(x)
            features[name] = x
        return features


def step(model: nn.Module, x: torch.Tensor, backward: bool, autocast: bool) -> None:
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        features = model(x)
    if backward:
        sum(f.float().mean() for f in features.values()).backward()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_alternating(
    runs: dict[str, Callable[[], None]], repeats: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each function, the calls interleaved."""
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--output-stride", type=int, default=8, choices=sorted(DILATION))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", default="float32,channels_last,bf16")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = build_backbone(args.arch, output_stride=args.output_stride).to(device)
    reference = getattr(torchvision.models, args.arch)(
        replace_stride_with_dilation=DILATION[args.output_stride]
    )
    reference = TorchvisionFeatures(reference).to(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(
        f"# {args.arch} output stride {args.output_stride}, batch {args.batch}, "
        f"{args.size}x{args.size}, device {device} ({name or platform.machine()}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| mode | pass | ours (ms) | torchvision (ms) | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for mode in args.modes.split(","):
        memory_format = torch.channels_last if mode != "float32" else torch.contiguous_format
        x = torch.randn(args.batch, 3, args.size, args.size, device=device)
        x = x.to(memory_format=memory_format)
        for model in (ours, reference):
            model.to(memory_format=memory_format)
        for backward in (False, True):
            for model in (ours, reference):
                model.train(backward)
            with torch.set_grad_enabled(backward):
                medians = time_alternating(
                    {
                        "ours": partial(step, ours, x, backward, mode == "bf16"),
                        "torchvision": partial(step, reference, x, backward, mode == "bf16"),
                    },
                    args.repeats,
                    args.warmup,
                    device,
                )
            ratio = medians["ours"] / medians["torchvision"]
            label = "forward+backward" if backward else "forward"
            print(
                f"| {mode} | {label} | {medians['ours'] * 1e3:.1f} | "
                f"{medians['torchvision'] * 1e3:.1f} | {ratio:.3f} |"
            )


if __name__ == "__main__":
    main()
