"""Peak memory of a fine-tuned training step with and without the backbone's gradient
checkpointing (``ResNet(grad_checkpointing=True)``), and a check that both compute the same thing.

The issue's setting: ResNet-101, deep stem, output stride 8, fine-tuned (not frozen), prototype
head, 473 px, batch 8, 1-shot (16 images through the backbone). Each variant runs in a fresh
subprocess: it builds the model, warms up with a small no-grad forward, then measures one
forward+backward of the task's loss (no optimizer step):

- CUDA: ``torch.cuda.max_memory_allocated`` during the step (peak), and that peak minus what was
  allocated before it (growth: activations, gradients and workspace).
- CPU: the process's peak resident set size (``ru_maxrss``) after the step (peak, including the
  interpreter and libraries), and that peak minus the resident set size just before the step
  (growth). glibc would keep freed blocks below its adaptive mmap threshold (up to 32 MiB) in
  its heap, so the subprocess fixes the threshold at 128 KiB (``MALLOC_MMAP_THRESHOLD_``): large
  tensors are mapped and unmapped, and the RSS follows live memory (the mmap calls slow the CPU
  step). The step must raise the peak above the warm-up's (checked).

The target (at least 40% less) is judged on the growth, the part checkpointing can change; on
CUDA the peak differs from it only by the weights and the inputs.

A second, timed step gives the loss, gradients and BatchNorm buffers that are compared across the
variants, so the saving cannot come from a different computation.

    python -m benchmarks.memory --device cuda                       # the issue's setting
    python -m benchmarks.memory --size 161 --batch 2 --threads 1    # CPU-sized
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    BACKBONES,
    add_device_arguments,
    describe,
    load_backbone,
    markdown_table,
    setup_device,
    synchronize,
    synthetic_batch,
)
from tasks.segment import FewShotSegmentation

VARIANTS = {"plain": False, "grad_checkpointing": True}
MIB = 2**20


def max_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """The current resident set size (Linux ``/proc/self/statm``)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def forward_backward(model: FewShotSegmentation, batch: dict[str, Any]) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model.train()
    loss = model.loss(model.segment(batch), batch["query_mask"]).total
    loss.backward()
    return loss.detach()


def measure(args: argparse.Namespace, checkpointing: bool) -> dict[str, Any]:
    """One variant, in this (fresh) process: memory of the first step, time and results of the
    second."""
    device = setup_device(args)
    torch.manual_seed(0)
    backbone = load_backbone(args.backbone, grad_checkpointing=checkpointing)
    model = FewShotSegmentation(backbone, freeze_backbone=False).to(device)
    model.eval()
    with torch.no_grad():  # loads the kernels; eval mode leaves BatchNorm statistics alone
        model.segment(synthetic_batch(1, args.shots, 64, device))
    torch.manual_seed(1)
    batch = synthetic_batch(args.batch, args.shots, args.size, device)
    synchronize(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        forward_backward(model, batch)
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        before, high_water = rss_bytes(), max_rss_bytes()
        forward_backward(model, batch)
        peak = max_rss_bytes()
        if peak <= high_water:
            raise RuntimeError("the step did not raise the peak RSS; use a larger --size/--batch")
    start = time.perf_counter()
    loss = forward_backward(model, batch)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "peak": peak,
        "growth": peak - before,
        "seconds": seconds,
        "loss": loss.cpu(),
        "tensors": {
            **{
                f"grad:{name}": p.grad.cpu()
                for name, p in model.named_parameters()
                if p.grad is not None
            },
            **{f"buffer:{name}": b.cpu() for name, b in model.named_buffers()},
        },
        "describe": describe(device),
    }


def run_variant(argv: list[str], variant: str, folder: Path) -> dict[str, Any]:
    """``measure`` in a fresh interpreter, so no allocator cache or high-water mark is shared."""
    result = folder / f"{variant}.pt"
    command = [sys.executable, "-m", "benchmarks.memory", *argv, "--variant", variant]
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    subprocess.run([*command, "--result", str(result)], check=True, env=env)
    return torch.load(result)


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest ``max|a - b| / max|a|`` over the tensors (float ones; counters must be equal)."""
    if a.keys() != b.keys():
        raise ValueError(f"different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    worst = 0.0
    for name, x in a.items():
        y = b[name]
        if not x.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(x, y) else float("inf"))
            continue
        scale = x.abs().max().clamp_min(1e-12)
        worst = max(worst, float((x - y).abs().max() / scale))
    return worst


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="resnet101_deep_os8", help=f"{sorted(BACKBONES)}")
    parser.add_argument("--size", type=int, default=473)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-3,
        help="largest relative difference of loss, gradients and buffers",
    )
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    if args.variant:
        torch.save(measure(args, VARIANTS[args.variant]), args.result)
        return
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as folder:
        results = {variant: run_variant(argv, variant, Path(folder)) for variant in VARIANTS}
    plain, checkpointed = results["plain"], results["grad_checkpointing"]
    print(
        f"# {args.backbone}, fine-tuned, prototype head, {args.size}x{args.size}, batch "
        f"{args.batch}, {args.shots}-shot, forward+backward; {plain['describe']}; "
        + ("torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "ru_maxrss")
    )
    rows = [
        [
            variant,
            f"{float(result['loss']):.6f}",
            f"{result['peak'] / MIB:.0f}",
            f"{result['growth'] / MIB:.0f}",
            f"{result['seconds']:.2f}",
        ]
        for variant, result in results.items()
    ]
    header = ["variant", "loss", "peak (MiB)", "step growth (MiB)", "step time (s)"]
    print(markdown_table(header, rows))
    saving = {key: 1 - checkpointed[key] / plain[key] for key in ("peak", "growth")}
    losses = {"loss": plain["loss"].reshape(1)}, {"loss": checkpointed["loss"].reshape(1)}
    difference = max(
        max_relative_difference(plain["tensors"], checkpointed["tensors"]),
        max_relative_difference(*losses),
    )
    print(
        f"\nsaving with grad_checkpointing: {saving['peak']:.1%} of the peak, "
        f"{saving['growth']:.1%} of the step growth (target >= 40%: "
        f"{'met' if saving['growth'] >= 0.4 else 'NOT met'}); step time x"
        f"{checkpointed['seconds'] / plain['seconds']:.2f}"
    )
    same = difference <= args.tolerance
    print(
        f"same loss, gradients and BatchNorm buffers: {'yes' if same else 'NO'} "
        f"(largest relative difference {difference:.2e}, tolerance {args.tolerance:g})"
    )
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
