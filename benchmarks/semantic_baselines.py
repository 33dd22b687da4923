"""Trivial semantic segmentation baselines on a datamodule's test list, scored as ``tasks.semantic``
scores (:class:`tasks.metrics.SemanticIoU` at the original resolution), so a trained model's
``test/miou`` and ``test/miou_fg`` compare directly:

- ``all-background``: every pixel background (the majority class by pixels).
- ``majority-object``: every pixel the object class covering the most training pixels.

    python -m benchmarks.semantic_baselines            # the default experiment's data
    python -m benchmarks.semantic_baselines --data.fold 1
"""

from __future__ import annotations

import torch
from jsonargparse import ArgumentParser

from datamodules.semantic import SemanticDataModule, ShapesSemantic
from tasks.metrics import SemanticIoU


def majority_object(datamodule: SemanticDataModule) -> int:
    """The object class (>= 1) with the most training pixels, after relabelling."""
    pixels = torch.zeros(datamodule.num_classes, dtype=torch.long)
    source = datamodule.source("train")
    for image_id in datamodule.ids("train"):
        label = torch.from_numpy(datamodule.table[source.read_label(image_id)]).long().flatten()
        pixels += torch.bincount(label[label != 255], minlength=datamodule.num_classes)
    return int(pixels[1:].argmax()) + 1


def evaluate(datamodule: SemanticDataModule) -> dict[str, dict[str, float]]:
    """Each baseline's test ``miou``, ``miou_fg`` and ``pixel_acc``."""
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.setup("test")
    constants = {"all-background": 0, "majority-object": majority_object(datamodule)}
    metrics = {name: SemanticIoU(datamodule.num_classes) for name in constants}
    for batch in datamodule.test_dataloader():
        label = batch["query_label"].long()
        for name, value in constants.items():
            metrics[name].update(torch.full_like(label, value), label)
    results = {}
    for name, metric in metrics.items():
        result = metric.compute()
        results[name] = {key: round(result[key].item(), 4)
                         for key in ("miou", "miou_fg", "pixel_acc")}  # fmt: skip
    return results


def main(args: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_subclass_arguments(SemanticDataModule, "data", default={
        "class_path": f"{ShapesSemantic.__module__}.{ShapesSemantic.__name__}"})  # fmt: skip
    config = parser.instantiate_classes(parser.parse_args(args))
    for name, result in evaluate(config.data).items():
        print(name, result)


if __name__ == "__main__":
    main()
