"""Training and evaluation episodes per second of the segmentation task: heads, encoders and
precision modes (fp32; bf16 autocast with channels_last; the same compiled), with peak memory and
the model FLOP utilisation of the training step.

Synthetic episodes (so that the data loader is not measured) through the real task: one batched
backbone call, the head, the loss and an SGD step for training; the forward pass and scoring at
original resolution for evaluation. The modes of one (encoder, head) run alternately in one
process, so the speed-ups are measured under the same conditions.

    python -m benchmarks.segment --device cuda --size 473 --batch 8
    python -m benchmarks.segment --size 128 --batch 1 --backbones resnet50_deep_os8 --modes fp32
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    BACKBONES,
    add_device_arguments,
    describe,
    device_name,
    load_backbone,
    markdown_row,
    markdown_table,
    setup_device,
    sgd,
    synchronize,
    synthetic_batch,
    time_alternating,
    train_step,
)
from tasks.heads import ASGNetHead, BAMHead, HSNetHead, PFENetHead, PrototypeHead
from tasks.metrics import FewShotIoU
from tasks.scoring import original_resolution_predictions
from tasks.segment import FewShotSegmentation, scored_logits

HEADS = {
    "prototype": PrototypeHead,
    "asgnet": ASGNetHead,
    "pfenet": PFENetHead,
    "hsnet": HSNetHead,
    "bam": BAMHead,  # its base learner random here: the cost is the same
}

#: Dense bf16 tensor-core peaks (TFLOP/s) by device name, first match wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0))


@dataclass(frozen=True)
class Mode:
    bf16: bool
    channels_last: bool
    compile: bool


MODES = {
    "fp32": Mode(bf16=False, channels_last=False, compile=False),
    "bf16+cl": Mode(bf16=True, channels_last=True, compile=False),
    "bf16+cl+compile": Mode(bf16=True, channels_last=True, compile=True),
}


def default_peak_tflops(device: torch.device) -> float | None:
    name = device_name(device) if device.type == "cuda" else ""
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def eval_step(
    model: FewShotSegmentation, metric: FewShotIoU, batch: dict[str, Any], bf16: bool
) -> None:
    """The task's evaluation: forward, logits to original resolution, metric update."""
    model.eval()
    device_type = batch["query_image"].device.type
    with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
        logits = scored_logits(model.segment(batch))
    metric.update(
        original_resolution_predictions(logits.float(), batch),
        batch["query_label"],
        batch["class_id"],
    )


def train_flops(model: FewShotSegmentation, batch: dict[str, Any]) -> int:
    """FLOPs of one training step (forward and backward), counted eagerly in fp32."""
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(model, sgd(model), batch)
    return counter.get_total_flops()


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [
        t for state in optimizer.state.values() for t in state.values() if torch.is_tensor(t)
    ]
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_step_memory(
    model: FewShotSegmentation,
    optimizer: torch.optim.Optimizer,
    step: Callable[[], object],
    device: torch.device,
) -> str:
    """Peak GiB of one training step as if this model were alone on the device: the step's peak
    above what was allocated before it (the other modes' models), plus this model's weights,
    buffers and optimizer state. ``n/a`` off CUDA."""
    if device.type != "cuda":
        return "n/a"
    optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before + resident_bytes(model, optimizer)
    return f"{peak / 2**30:.2f}"


def build(
    backbone: str, head: str, mode: Mode, freeze: bool, device: torch.device
) -> FewShotSegmentation:
    torch.manual_seed(0)  # every mode starts from the same weights
    model = FewShotSegmentation(
        load_backbone(backbone),
        head=HEADS[head],
        # BAM's encoder is always frozen (its base learner reads it)
        freeze_backbone=freeze or getattr(HEADS[head], "requires_frozen_backbone", False),
        channels_last=mode.channels_last,
        compile=mode.compile,
    )
    return model.to(device)


def benchmark(
    args: argparse.Namespace, backbone: str, head: str, device: torch.device
) -> list[list[str]]:
    """Rows of one (encoder, head): every mode, timed alternately."""
    batch = synthetic_batch(args.batch, args.shots, args.size, device)
    freeze = not args.fine_tune
    models = {name: build(backbone, head, MODES[name], freeze, device) for name in args.modes}
    counted = (
        models["fp32"] if "fp32" in models else build(backbone, head, MODES["fp32"], freeze, device)
    )
    flops = train_flops(counted, batch)
    optimizers = {name: sgd(model) for name, model in models.items()}
    trains = {
        name: partial(train_step, model, optimizers[name], batch, MODES[name].bf16)
        for name, model in models.items()
    }
    evals = {
        name: partial(eval_step, model, FewShotIoU(20).to(device), batch, MODES[name].bf16)
        for name, model in models.items()
    }
    train_s = time_alternating(trains, args.repeats, args.warmup, device)
    eval_s = time_alternating(evals, args.repeats, args.warmup, device)
    rows = []
    for name, model in models.items():
        memory = peak_step_memory(model, optimizers[name], trains[name], device)
        tflops = flops / train_s[name] / 1e12
        mfu = f"{100 * tflops / args.peak_tflops:.1f}%" if args.peak_tflops else "n/a"
        rows.append(
            [
                Path(BACKBONES.get(backbone, backbone)).stem,
                head,
                name,
                f"{args.batch / train_s[name]:.2f}",
                f"{train_s['fp32'] / train_s[name]:.2f}x" if "fp32" in train_s else "n/a",
                f"{args.batch / eval_s[name]:.2f}",
                f"{eval_s['fp32'] / eval_s[name]:.2f}x" if "fp32" in eval_s else "n/a",
                memory,
                f"{flops / 1e9:.1f}",
                f"{tflops:.3f}",
                mfu,
            ]
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backbones",
        nargs="+",
        default=["resnet50_deep_os8", "resnet101_deep_os8"],
        help=f"config files or keys of {sorted(BACKBONES)}",
    )
    parser.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--size", type=int, default=473)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls (compilation)")
    parser.add_argument("--fine-tune", action="store_true", help="train the backbone too")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak for MFU (default: the bf16 dense peak of a known GPU, else n/a)",
    )
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    device = setup_device(args)
    if args.peak_tflops is None:
        args.peak_tflops = default_peak_tflops(device)
    print(
        f"# {args.size}x{args.size}, batch {args.batch}, {args.shots}-shot, backbone "
        f"{'fine-tuned' if args.fine_tune else 'frozen'}, {describe(device)}; "
        f"MFU against {args.peak_tflops or 'n/a'} TFLOP/s; speed-ups against fp32 in this run"
    )
    header = [
        "backbone", "head", "mode", "train ep/s", "train speed-up", "eval ep/s",
        "eval speed-up", "peak train GiB", "train GFLOP/step", "TFLOP/s", "MFU",
    ]  # fmt: skip
    print(markdown_table(header), flush=True)
    for backbone in args.backbones:
        for head in args.heads:
            for row in benchmark(args, backbone, head, device):
                print(markdown_row(row), flush=True)


if __name__ == "__main__":
    main()
