"""This project's ResNet encoder against torchvision's at the same configuration.

Both models run alternately in one process on the same input (forward, and forward+backward), so
that machine noise hits both alike; the reported number is the ratio of medians, ours over
torchvision's (target: at most 1.02). Modes: float32, channels_last, bf16 autocast (CPU and CUDA).

    python -m benchmarks.backbone --arch resnet50 --output-stride 8 --size 224 --batch 2
"""

from __future__ import annotations

import argparse
from functools import partial

import torch
import torchvision
from torch import nn

from backbones import build_backbone
from benchmarks.common import add_device_arguments, describe, setup_device, time_alternating

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--output-stride", type=int, default=8, choices=sorted(DILATION))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    add_device_arguments(parser)
    parser.add_argument("--modes", default="float32,channels_last,bf16")
    args = parser.parse_args(argv)
    device = setup_device(args)
    torch.manual_seed(0)
    ours = build_backbone(args.arch, output_stride=args.output_stride).to(device)
    reference = getattr(torchvision.models, args.arch)(
        replace_stride_with_dilation=DILATION[args.output_stride]
    )
    reference = TorchvisionFeatures(reference).to(device)
    print(
        f"# {args.arch} output stride {args.output_stride}, batch {args.batch}, "
        f"{args.size}x{args.size}, {describe(device)}"
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
