"""Two trivial few-shot baselines on a datamodule's test episodes, scored as the task scores.

- ``all-foreground``: every query pixel is the class.
- ``paste-support``: the (first) support mask, as placed in the model's input canvas, pasted onto
  the query's canvas and mapped to the query's original size like a prediction.

Scored with :class:`tasks.metrics.FewShotIoU` at original resolution, so a trained model's
``test/miou`` is directly comparable:

    python -m benchmarks.baselines --data.fold 0 --data.shots 1
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from jsonargparse import ArgumentParser

from datamodules import FewShotDataModule
from tasks.metrics import FewShotIoU
from tasks.scoring import original_resolution_predictions


def as_logits(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 mask [B, H, W] as two-class logits whose argmax is the mask."""
    return F.one_hot((mask == 1).long(), 2).permute(0, 3, 1, 2).float()


def baseline_predictions(name: str, batch: dict[str, Any]) -> torch.Tensor:
    if name == "all-foreground":
        logits = as_logits(torch.ones_like(batch["query_mask"]))
    else:
        logits = as_logits(batch["support_masks"][:, 0])
    return original_resolution_predictions(logits, batch)


def evaluate(datamodule: FewShotDataModule) -> dict[str, float]:
    """Each baseline's test mIoU, the mean over the protocol's test seeds."""
    datamodule.prepare_data()
    datamodule.setup("test")
    totals = dict.fromkeys(BASELINES, 0.0)
    loaders = datamodule.test_dataloader()
    for loader in loaders:
        metrics = {name: FewShotIoU(datamodule.num_classes) for name in BASELINES}
        for batch in loader:
            for name, metric in metrics.items():
                metric.update(
                    baseline_predictions(name, batch), batch["query_label"], batch["class_id"]
                )
        for name, metric in metrics.items():
            totals[name] += float(metric.compute()["miou"]) / len(loaders)
    return totals


BASELINES = ("all-foreground", "paste-support")


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0], default_config_files=[])
    parser.add_subclass_arguments(FewShotDataModule, "data", required=False)
    parser.set_defaults({"data": {"class_path": "datamodules.ShapesFewShot"}})
    args = parser.parse_args(argv)
    datamodule = parser.instantiate_classes(args).data
    print(f"# {type(datamodule).__name__} fold {datamodule.fold}, {datamodule.shots}-shot, "
          f"protocol {datamodule.protocol}")  # fmt: skip
    print("| baseline | test mIoU |")
    print("| --- | --- |")
    for name, miou in evaluate(datamodule).items():
        print(f"| {name} | {miou:.4f} |")


if __name__ == "__main__":
    main()
