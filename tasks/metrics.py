"""Few-shot segmentation metrics with the field's accumulation conventions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from datamodules.source import IGNORE as IGNORE_INDEX


class FewShotIoU(Metric):
    """Class-wise mIoU and FB-IoU of binary few-shot predictions.

    Conventions of PFENet (Tian et al., TPAMI 2020) and ASGNet (``tool/test.py`` of
    github.com/Reagan1311/ASGNet), which the field reports:

    * mIoU: for each class, the foreground intersection and union are summed over all of that
      class's episodes, the class IoU is their ratio, and mIoU is the mean over ``classes`` (the
      fold's classes), a class without episodes counting 0, as every reference divides by all
      of the fold's classes (PFENet/ASGNet/BAM ``class_miou / split_gap``, HSNet
      ``iou.index_select(class_ids_interest).mean()``). Without ``classes`` (training and
      validation monitors), the mean is over the classes that occurred. A class that occurred
      but whose union is empty scores 0, as the reference ``I / (U + 1e-10)`` does.
    * FB-IoU: background and foreground intersection and union are each summed over all
      episodes (whatever their class); FB-IoU is the mean of the two IoUs.

    Target pixels equal to 255 are ignored. All states are integer counts reduced by summation,
    so the result under DDP is exactly the result over the union of the ranks' episodes.

    Args:
        num_classes: Number of episode classes; ``class_ids`` index into ``[0, num_classes)``.
        classes: the classes mIoU averages over (default: those with episodes).
        check_values: check that predictions, targets and class ids hold allowed values (each
            check reads a result back to the host: a device sync per update); the training
            monitor, fed by the model's argmax and checked labels, skips them.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    class_intersection: Tensor
    class_union: Tensor
    class_episodes: Tensor
    fb_intersection: Tensor
    fb_union: Tensor

    def __init__(
        self,
        num_classes: int,
        classes: Sequence[int] | None = None,
        check_values: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.check_values = check_values
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if classes is not None and not all(0 <= c < num_classes for c in classes):
            raise ValueError(f"classes must lie in [0, {num_classes}), got {list(classes)}")
        self.num_classes = num_classes
        self.classes = None if classes is None else sorted(set(classes))
        for name, size in [
            ("class_intersection", num_classes),
            ("class_union", num_classes),
            ("class_episodes", num_classes),
            ("fb_intersection", 2),  # index 0 background, 1 foreground
            ("fb_union", 2),
        ]:
            self.add_state(name, torch.zeros(size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, class_ids: Tensor) -> None:
        """Accumulate a batch of episodes.

        Args:
            preds: [B, H, W] integer prediction, 0 background and 1 foreground.
            target: [B, H, W] integer label, 0 background, 1 foreground, 255 ignored.
            class_ids: [B] long, the class of each episode.
        """
        self._check(preds, target, class_ids)
        valid = target != IGNORE_INDEX
        inter, union = [], []
        for value in (0, 1):
            pred_is = (preds == value) & valid
            target_is = target == value
            inter.append((pred_is & target_is).sum((1, 2)))
            union.append((pred_is | target_is).sum((1, 2)))
        inter_bf, union_bf = torch.stack(inter, 1), torch.stack(union, 1)  # [B, 2]

        self.fb_intersection += inter_bf.sum(0)
        self.fb_union += union_bf.sum(0)
        class_ids = class_ids.long()
        self.class_intersection.index_add_(0, class_ids, inter_bf[:, 1])
        self.class_union.index_add_(0, class_ids, union_bf[:, 1])
        self.class_episodes.index_add_(0, class_ids, torch.ones_like(class_ids))

    def compute(self) -> dict[str, Tensor]:
        """Return ``miou`` and ``fbiou`` (scalars) and ``iou_per_class`` ([num_classes], NaN for
        classes without episodes)."""
        iou = self.class_intersection.double() / self.class_union.clamp(min=1).double()
        iou = iou.masked_fill(self.class_episodes == 0, float("nan"))
        fb = self.fb_intersection.double() / self.fb_union.clamp(min=1).double()
        fold = iou if self.classes is None else iou[self.classes].nan_to_num(0.0)
        miou = fold.nanmean()
        return {
            "miou": miou.float(),
            "fbiou": fb.mean().float(),
            "iou_per_class": iou.float(),
        }

    def _check(self, preds: Tensor, target: Tensor, class_ids: Tensor) -> None:
        if preds.ndim != 3:
            raise ValueError(f"preds must have shape [B, H, W], got {tuple(preds.shape)}")
        if target.shape != preds.shape:
            raise ValueError(
                f"target shape {tuple(target.shape)} does not match preds {tuple(preds.shape)}"
            )
        if preds.is_floating_point() or target.is_floating_point():
            raise ValueError("preds and target must be integer tensors")
        if class_ids.shape != preds.shape[:1]:
            raise ValueError(
                f"class_ids must have shape [{preds.shape[0]}], got {tuple(class_ids.shape)}"
            )
        if not self.check_values:
            return
        if class_ids.numel() and (class_ids.min() < 0 or class_ids.max() >= self.num_classes):
            raise ValueError(
                f"class_ids must lie in [0, {self.num_classes}), got {class_ids.tolist()}"
            )
        if ((preds != 0) & (preds != 1)).any():
            raise ValueError("preds must contain only 0 (background) and 1 (foreground)")
        if ((target != 0) & (target != 1) & (target != IGNORE_INDEX)).any():
            raise ValueError(f"target must contain only 0, 1 and {IGNORE_INDEX} (ignored)")


class SemanticIoU(Metric):
    """Per-class IoU from intersection and union summed over all pixels of all images (255
    excluded, the prediction there too, as BAM's ``intersectionAndUnionGPU``), so the result is
    exact under DDP (integer sums). ``miou`` averages over every class, background included (the
    VOC convention); ``miou_fg`` over the object classes 1.. only, which is what BAM's
    ``train_base.py`` reports as a base learner's mIoU (``class_miou``). A class that is never
    predicted nor present (union 0) is left out of both means (BAM would count it 0; on a real
    test list every class is present).

    Args:
        num_classes: classes, background (0) included.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    intersection: Tensor
    union: Tensor
    target: Tensor

    def __init__(self, num_classes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        for name in ("intersection", "union", "target"):
            self.add_state(name, torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """``preds`` and ``target`` integer ``[B, H, W]`` (``target`` 255 ignored)."""
        if preds.shape != target.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ")
        valid = target != IGNORE_INDEX
        preds, target = preds[valid].long(), target[valid].long()
        count = self.num_classes
        hits = torch.bincount(target[preds == target], minlength=count)[:count]
        predicted = torch.bincount(preds, minlength=count)[:count]
        labelled = torch.bincount(target, minlength=count)[:count]
        self.intersection += hits
        self.union += predicted + labelled - hits
        self.target += labelled

    def compute(self) -> dict[str, Tensor]:
        """``miou``, ``miou_fg``, ``pixel_acc`` and ``iou_per_class`` (NaN for union 0)."""
        iou = self.intersection.double() / self.union.double()
        iou = iou.masked_fill(self.union == 0, float("nan"))
        accuracy = self.intersection.sum().double() / self.target.sum().clamp(min=1).double()
        return {
            "miou": iou.nanmean().float(),
            "miou_fg": iou[1:].nanmean().float(),
            "pixel_acc": accuracy.float(),
            "iou_per_class": iou.float(),
        }
