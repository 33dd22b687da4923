"""The contract between a few-shot head and the task: :class:`FewShotHead`.

The task (:class:`tasks.segment.FewShotSegmentation`) relies on nothing else: it reads
``in_features``, ``support_mask_at`` and ``requires_frozen_backbone`` and calls every hook, each
with a neutral default, whatever the head. A method's special needs (BAM's base learner: its
encoder, its class split, its dropout; a head's own learning-rate multipliers) live in its head's
hooks, never in the task. :func:`tasks.heads.testing.check_head` checks a head against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from backbones.arguments import CapturesArguments
from backbones.protocol import Backbone

from .common import HeadOutput


class FewShotHead(CapturesArguments, nn.Module):
    """A few-shot segmentation head, built as ``Head(features, **options)`` on the encoder's
    :class:`backbones.FeaturePyramid` (the options recorded as ``init_args`` from the
    constructor's signature, so checkpoints rebuild it).

    Attributes:
        in_features: the names of the backbone outputs the head reads (set in ``__init__``);
            the task computes exactly these.
        support_mask_at: a backbone output in ``in_features`` at which the support's features
            are multiplied by their foreground mask before the later outputs are computed from
            them, without gradient (PFENet's prior); ``None``: none.
        requires_frozen_backbone: the task must keep the encoder frozen (BAM: its base learner
            reads the encoder it was trained with).
    """

    in_features: tuple[str, ...] = ()
    support_mask_at: str | None = None
    requires_frozen_backbone: ClassVar[bool] = False

    def prepare_backbone(self, backbone: Backbone) -> Backbone:
        """The encoder the task runs, given the configured one, once when the model is built
        (BAM: the configured encoder with its base learner file's tensors)."""
        return backbone

    def setup(self, datamodule: Any) -> None:
        """The data the task runs on, at every ``setup`` (``None`` for a module used alone):
        its ``protocol``, ``base_classes``, ``novel_classes``... (BAM: the class split
        check, each class's base-learner channel, the protocol's dropout)."""

    def check_ready_to_fit(self) -> None:
        """Raise, naming the option, when the head cannot be trained as it is (BAM without
        a trained base learner); called when ``fit`` starts."""

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The optimizer's parameter groups of the head's trainable parameters, at ``lr``
        times the head's own multipliers (default: one group at ``lr``)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr}] if params else []

    def forward(
        self,
        query_feats: Mapping[str, Tensor],
        support_feats: Mapping[str, Tensor],
        support_masks: Tensor,
        class_ids: Tensor | None = None,
    ) -> HeadOutput:
        """Segment the query (shapes in :mod:`tasks.heads`); ``class_ids`` [B]: each episode's
        dataset class, or ``None`` (unknown, e.g. ``predict``)."""
        raise NotImplementedError(f"{type(self).__name__} defines no forward")
