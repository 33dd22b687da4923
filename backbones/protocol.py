"""What the tasks, the results files and the benchmarks may rely on in an encoder.

Anything outside :mod:`backbones` talks to an encoder through :class:`Backbone` only, so an
encoder of another family (a timm model in a subclass implementing these methods) can replace
:class:`backbones.ResNet` without touching the tasks. A base class rather than a
``typing.Protocol``: jsonargparse accepts any subclass as ``--model.backbone`` (its protocol check
compares call signatures, which ``nn.Module.__call__`` does not keep).
"""

from __future__ import annotations

import importlib
from abc import ABCMeta, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

from torch import Tensor, nn

from .arguments import CapturesArguments
from .features import FeaturePyramid

#: Suffix naming a block's output before its last activation (``layer3.2.pre_relu``), the block
#: output HSNet correlates (its ``extract_feat_res`` keeps the residual sum before the ReLU).
PRE_RELU = ".pre_relu"


class Backbone(CapturesArguments, nn.Module, metaclass=ABCMeta):
    """A feature-pyramid encoder with named outputs, described by meaning.

    Outputs are the pyramid's stages (``stem``, ``layer1``..``layer4`` for ResNets) and every
    block's output (``layer3.2``), each with a :class:`~backbones.features.FeatureInfo` saying
    its stage, block, stride and channels, so that a head selects what it reads by meaning
    (:class:`~backbones.features.FeaturePyramid`), whatever the encoder calls it.

    Keeping a frozen encoder frozen is the task's job (no gradients, every normalisation layer
    in eval mode), so an encoder needs no freezing logic of its own; what it must guarantee is
    that a forward in eval mode changes no parameter or buffer
    (:func:`backbones.testing.check_backbone` checks it).
    """

    @abstractmethod
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """The selected outputs by name, in network order."""

    @property
    @abstractmethod
    def output_info(self) -> FeaturePyramid:
        """Every output the encoder can give (selected or not), by name, in network order."""

    @abstractmethod
    def select_outputs(self, names: Sequence[str]) -> None:
        """Choose what ``forward`` returns; later modules are not run."""

    @abstractmethod
    def idle_stages(self) -> Iterator[nn.Module]:
        """Modules after the last selected output: kept in checkpoints, never run."""

    def forward_from(
        self, name: str | None, x: Tensor, until: str | None = None
    ) -> dict[str, Tensor]:
        """The selected outputs after output ``name`` up to ``until`` (inclusive; ``None``: the
        last selected), computed from ``x`` standing for ``name``'s output (``None``: ``x`` is
        the image); only the modules in between run.

        Splitting the forward lets a task change a feature mid-network: PFENet's prior reads
        the support's layer4 computed on its mask-multiplied layer3. ``forward(x)`` is
        ``forward_from(None, x)``. Resuming at ``name`` follows a ``forward_from(None, images,
        until=name)`` of the same images, as the task runs it; an encoder may read what that
        forward left (a ViT: its class and register tokens, which a map does not hold).
        Optional: an encoder without it cannot serve a head that declares ``support_mask_at``.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement forward_from, which heads with "
            "support_mask_at (PFENet) need"
        )

    @property
    def resumable(self) -> bool:
        """Whether :meth:`forward_from` works, which heads with ``support_mask_at`` need."""
        return type(self).forward_from is not Backbone.forward_from

    def describe(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": ...}`` rebuilding this encoder's architecture:
        its constructor's arguments as recorded (:class:`backbones.arguments.CapturesArguments`);
        an encoder that reads a weights file clears it here (a checkpoint holds the tensors)."""
        return {"class_path": class_path(self), "init_args": self.init_args}

    @abstractmethod
    def summary(self) -> tuple[dict[str, Any], str]:
        """The configuration a results file records and a short label for tables."""


def build_described(description: dict[str, Any]) -> nn.Module:
    """The object a ``{"class_path": ..., "init_args": ...}`` description names."""
    module_name, _, name = description["class_path"].rpartition(".")
    return getattr(importlib.import_module(module_name), name)(**description["init_args"])


def class_path(obj: object) -> str:
    """The importable dotted path of ``obj``'s class (of ``obj`` itself when it is a class)."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"
