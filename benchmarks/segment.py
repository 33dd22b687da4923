"""Training and evaluation episodes per second of the segmentation task, both heads.

Synthetic episodes at the PASCAL recipe's size (473, so that the data loader is not measured),
through the real task: one batched backbone call, the head, the loss and an SGD step for
training; the forward pass and scoring at original resolution for evaluation.

    python -m benchmarks.segment --backbone configs/backbones/resnet50_deep_os8.yaml --size 473
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from backbones import ResNet
from tasks.heads import ASGNetHead, PrototypeHead
from tasks.metrics import FewShotIoU
from tasks.segment import FewShotSegmentation, original_resolution_predictions

HEADS = {"prototype": PrototypeHead, "asgnet": ASGNetHead}


def synthetic_batch(batch: int, shots: int, size: int, device: torch.device) -> dict:
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


def median_seconds(run: Callable[[], None], repeats: int, device: torch.device) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build(backbone_config: str, head: str, freeze: bool) -> FewShotSegmentation:
    spec = yaml.safe_load(Path(backbone_config).read_text())
    backbone = ResNet(**spec.get("init_args", {}))
    return FewShotSegmentation(backbone, head=HEADS[head], freeze_backbone=freeze)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="configs/backbones/resnet50_deep_os8.yaml")
    parser.add_argument("--heads", default="prototype,asgnet")
    parser.add_argument("--size", type=int, default=473)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fine-tune", action="store_true", help="train the backbone too")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(
        f"# {args.backbone}, {args.size}x{args.size}, batch {args.batch}, {args.shots}-shot, "
        f"backbone {'fine-tuned' if args.fine_tune else 'frozen'}, device {device} ({name}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print("| head | train episodes/s | eval episodes/s |")
    print("| --- | --- | --- |")
    batch = synthetic_batch(args.batch, args.shots, args.size, device)
    for head in args.heads.split(","):
        torch.manual_seed(0)
        model = build(args.backbone, head, not args.fine_tune).to(device)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        metric = FewShotIoU(20).to(device)

        def train_step(model: FewShotSegmentation = model, optimizer=optimizer) -> None:
            model.train()
            loss, _ = model.loss(model.segment(batch), batch["query_mask"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def eval_step(model: FewShotSegmentation = model, metric: FewShotIoU = metric) -> None:
            model.eval()
            with torch.no_grad():
                logits = model.segment(batch).logits
                preds = original_resolution_predictions(logits, batch)
                metric.update(preds, batch["query_label"], batch["class_id"])

        train = args.batch / median_seconds(train_step, args.repeats, device)
        evaluate = args.batch / median_seconds(eval_step, args.repeats, device)
        print(f"| {head} | {train:.2f} | {evaluate:.2f} |")


if __name__ == "__main__":
    main()
