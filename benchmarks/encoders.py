"""Training-step cost of each encoder config under the heads, and timm's ResNet-50 against the
project's on the same weights.

For every ``configs/backbones/*.yaml`` given (default: the timm and foundation configs), one
training step (forward, loss, backward, SGD update; random weights, synthetic 1-shot episodes)
of the PFENet and HSNet heads is timed in fp32 and bf16 autocast, interleaved, and its peak memory
measured (CUDA: ``max_memory_allocated``; CPU: not measured, ``-``). A head that cannot run on an
encoder (PFENet on a ViT) is listed with its one-line reason. Each encoder runs at its size rule's
resolution rounded to its patch (``--size``).

The last table times timm's ResNet-50 (``TimmEncoder("resnet50")``) against
``backbones.ResNet("resnet50", dilation_scheme="contracted")`` loaded from the same file, output
stride 8, forward and backward of every stage, as a ratio (the same scheme: equal outputs,
tests/test_timm_encoders.py).

    python -m benchmarks.encoders --threads 2 --size 112                 # CPU
    python -m benchmarks.encoders --device cuda --size 476 --batch 4     # a GPU
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import timm
import torch
import yaml

from backbones import ResNet
from backbones.timm_encoders import TimmEncoder
from benchmarks.common import (
    CONFIGS,
    add_device_arguments,
    describe,
    markdown_table,
    setup_device,
    sgd,
    synthetic_batch,
    time_alternating,
    train_step,
)
from tasks.heads import HSNetHead, PFENetHead
from tasks.segment import FewShotSegmentation

TIMM_CONFIGS = ("timm_resnet50_a1h", "timm_resnet50_a1h_os8", "convnext_tiny", "swin_base_384",
                "dinov2_vits14", "dinov2_vitb14_reg4", "clip_vitb16", "samvit_base")  # fmt: skip


def encoder_of(config: str) -> TimmEncoder:
    spec = yaml.safe_load((CONFIGS / "backbones" / f"{config}.yaml").read_text())
    return TimmEncoder(**spec["init_args"])


def peak_memory(device: torch.device, run) -> str:
    if device.type != "cuda":
        run()
        return "-"
    torch.cuda.reset_peak_memory_stats(device)
    run()
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


def head_rows(args: argparse.Namespace, device: torch.device) -> list[list[object]]:
    rows = []
    for config in args.configs:
        for head in (PFENetHead, HSNetHead):
            torch.manual_seed(0)
            try:
                model = FewShotSegmentation(encoder_of(config), head=head).to(device)
            except ValueError as error:
                rows.append([config, head.__name__, "-", "-", "-", str(error).split(";")[0]])
                continue
            batch = synthetic_batch(args.batch, 1, args.size, device)
            optimizer = sgd(model)
            steps = {
                "fp32": lambda m=model, o=optimizer, b=batch: train_step(m, o, b),
                "bf16": lambda m=model, o=optimizer, b=batch: train_step(m, o, b, bf16=True),
            }
            times = time_alternating(steps, args.repeats, 1, device)
            memory = peak_memory(device, steps["fp32"])
            rows.append([config, head.__name__, f"{times['fp32'] * 1000:.0f}",
                         f"{times['bf16'] * 1000:.0f}", memory, ""])  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def resnet_ratio(args: argparse.Namespace, device: torch.device) -> list[object]:
    """timm's ResNet-50 against the project's, output stride 8, same weights, every stage's
    forward and backward."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "resnet50.pth"
        torch.save(timm.create_model("resnet50").state_dict(), path)
        encoders = {
            "timm": TimmEncoder("resnet50", weights=str(path), output_stride=8),
            "project": ResNet(
                "resnet50", weights=str(path), output_stride=8, dilation_scheme="contracted"
            ),
        }
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    runs = {}
    for name, encoder in encoders.items():
        encoder.to(device).select_outputs([s.name for s in encoder.output_info.stages[1:]])
        runs[name] = lambda e=encoder: sum(f.mean() for f in e(x).values()).backward()
    times = time_alternating(runs, args.repeats, 1, device)
    return [f"{times['timm'] * 1000:.0f}", f"{times['project'] * 1000:.0f}",
            f"{times['timm'] / times['project']:.2f}"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_arguments(parser)
    parser.add_argument("--configs", nargs="+", default=list(TIMM_CONFIGS))
    parser.add_argument(
        "--size", type=int, default=112, help="input side (a multiple of 16 and 14: 112, 224, 448)"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = setup_device(args)
    print(describe(device))
    print(f"{args.size} px, batch {args.batch}, 1-shot, median of {args.repeats}\n")
    rows = head_rows(args, device)
    print(markdown_table(["encoder", "head", "fp32 step ms", "bf16 step ms", "peak", "refused"],
                         rows))  # fmt: skip
    print()
    print(markdown_table(["timm ResNet-50 ms", "project ResNet-50 ms", "timm / project"],
                         [resnet_ratio(args, device)]))  # fmt: skip


if __name__ == "__main__":
    main()
