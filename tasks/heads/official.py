"""Released models of the papers: the heads their checkpoints load into, and the one loader.

A released PFENet, ASGNet, HSNet or BAM file holds its encoder and its head in the paper's own
layout. :class:`OfficialCheckpoint` is the base class of the heads it loads into (each names its
paper, a key only its files hold and its renames); :func:`official_model` recognises a file among
every such head class and builds the encoder and the head from it, strictly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from backbones import VGG, Backbone, FeaturePyramid, ResNet, WeightsError
from backbones.vgg import is_vgg_state, vgg_arch
from backbones.weights import MODEL_ENCODER_PREFIXES, checkpoint_arch, read_checkpoint, to_native

from .base import FewShotHead

HeadFactory = Callable[[FeaturePyramid], nn.Module]

#: Key prefixes of the encoder in the official checkpoints, not part of the heads: PFENet/ASGNet's
#: PSPNet encoder (``layer0`` is the deep stem), HSNet's and DCAMA's (``backbone.``,
#: ``feature_extractor.``).
OFFICIAL_BACKBONE_PREFIXES = ("layer0.", "layer1.", "layer2.", "layer3.", "layer4.",
                              *MODEL_ENCODER_PREFIXES)  # fmt: skip


class OfficialCheckpoint(FewShotHead):
    """Base class of the heads whose authors' released checkpoints load into them.

    Subclasses name their paper (``official_paper``), a head key only their official checkpoints
    hold (``official_signature``, which recognises the file), the official prefixes they rename
    (``official_renames``) and the encoder the file's backbone tensors fit
    (``official_encoder``: :class:`backbones.ResNet` options besides the depth).
    """

    official_paper: ClassVar[str]
    official_signature: ClassVar[str]
    official_renames: ClassVar[tuple[tuple[str, str], ...]] = ()
    official_encoder: ClassVar[Mapping[str, Any]]

    @classmethod
    def official_backbone(cls, encoder: Mapping[str, Tensor], path: str, trusted: bool) -> Backbone:
        """The encoder a released file's encoder tensors (``encoder``, in the paper's layout)
        fit, loaded from ``path``: PFENet's VGG-16 cut (:class:`backbones.VGG`), or the
        :class:`backbones.ResNet` of the file's depth with :attr:`official_encoder`'s options."""
        if is_vgg_state(encoder):
            return VGG(vgg_arch(encoder), weights=path, weights_trusted=trusted)
        depths, archs = checkpoint_arch(to_native(dict(encoder), is_lightning=False)[0])
        if not archs:
            raise WeightsError(
                f"official_checkpoint={path!r} holds no encoder this project builds (ResNet "
                f"blocks per stage {depths}); expected a released {cls.official_paper} "
                "ResNet-50/101 or VGG-16 model"
            )
        return ResNet(archs[0], **cls.official_encoder, weights=path, weights_trusted=trusted)

    @classmethod
    def official_options(cls, head_state: Mapping[str, Tensor]) -> dict[str, Any]:
        """The head options a released file records in its tensors' shapes (BAM: the shots
        its ``kshot_rw`` is built for); by default none."""
        return {}

    def load_official_state_dict(self, checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
        """Load the head part of an official checkpoint strictly, key by key (``module.``
        stripped, ``official_renames`` applied); return the backbone part for the caller.

        Raises:
            RuntimeError: listing the missing and unexpected head keys (e.g. an ASPP-variant
            ASGNet checkpoint, or one with a different number of bins).
        """
        return load_official_head(self, checkpoint, self.official_paper, self.official_renames)


def split_official_state_dict(
    checkpoint: Mapping[str, Any],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split an official PFENet/ASGNet checkpoint into (head, backbone) state dicts.

    Accepts the saved file's dict (``{"state_dict": ...}``, as their ``test.py`` loads it) or
    the state dict itself, and strips the ``module.`` prefix of ``nn.DataParallel``. Keys under
    :data:`OFFICIAL_BACKBONE_PREFIXES` go to the backbone dict, unchanged; all others to the
    head dict.
    """
    state = checkpoint.get("state_dict", checkpoint)
    head: dict[str, Tensor] = {}
    backbone: dict[str, Tensor] = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        (backbone if key.startswith(OFFICIAL_BACKBONE_PREFIXES) else head)[key] = value
    return head, backbone


def load_official_head(
    head: nn.Module,
    checkpoint: Mapping[str, Any],
    paper: str,
    renames: Sequence[tuple[str, str]] = (),
) -> dict[str, Tensor]:
    """Load the head part of an official checkpoint into ``head`` strictly, key by key; return
    the backbone part (:data:`OFFICIAL_BACKBONE_PREFIXES`) for the caller to map.

    ``renames`` are (official prefix, prefix here) pairs; every other key keeps its name.

    Raises:
        RuntimeError: listing the missing and unexpected head keys, as the file names them.
    """

    def ours(key: str) -> str:
        for official, here in renames:
            if key.startswith(official):
                return here + key.removeprefix(official)
        return key

    def theirs(key: str) -> str:
        for official, here in renames:
            if key.startswith(here):
                return official + key.removeprefix(here)
        return key

    head_state, backbone_state = split_official_state_dict(checkpoint)
    head_state = {ours(key): value for key, value in head_state.items()}
    expected = set(head.state_dict())
    missing = sorted(theirs(key) for key in expected - set(head_state))
    unexpected = sorted(theirs(key) for key in set(head_state) - expected)
    if missing or unexpected:
        raise RuntimeError(
            f"official {paper} checkpoint does not match {type(head).__name__}: "
            f"missing keys {missing}, unexpected keys {unexpected}"
        )
    head.load_state_dict(head_state)
    return backbone_state


def official_heads() -> list[type[OfficialCheckpoint]]:
    """Every head class that loads a paper's released files (those naming their
    ``official_signature``), by paper name."""
    found, pending = [], list(OfficialCheckpoint.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if "official_signature" in vars(cls):
            found.append(cls)
    return sorted(found, key=lambda cls: cls.official_paper)


def official_model(
    path: str, trusted: bool = False, head: HeadFactory | nn.Module | None = None
) -> tuple[Backbone, nn.Module]:
    """The encoder and head of a released PFENet, ASGNet, HSNet or BAM model (``model/PFENet.py``'s
    ``train_epoch_*.pth``, ``model/asgnet.py``'s checkpoint, HSNet's ``best_model.pt``, BAM's
    ``train_epoch_*.pth`` with its base learner): the
    encoder the file holds in its paper's layout (PSPNet's deep stem, uniform dilation and
    output stride 8, of the file's depth; HSNet's torchvision ResNet at output stride 32;
    PFENet's VGG-16 cut, :class:`backbones.VGG`, for its COCO models), and the head of the
    model the file holds, both loaded strictly from the one file. The head takes the paper's
    options, or those of ``head`` when it builds that same head class (the bins are not in the
    file: PFENet's COCO models use 1.0/0.5/0.25/0.125, set in
    ``configs/segment/pfenet_coco.yaml``); the options the file records
    (:meth:`OfficialCheckpoint.official_options`, BAM's shots) are the file's, with a warning
    naming each configured value they replace.
    """
    checkpoint = read_checkpoint(path, trusted, option="--model.official_trusted true")
    head_state, encoder = split_official_state_dict(checkpoint)
    heads = official_heads()
    matches = [cls for cls in heads if cls.official_signature in head_state]
    if len(matches) != 1:
        expected = {cls.official_paper: cls.official_signature for cls in heads}
        raise WeightsError(
            f"official_checkpoint={path!r} is not one released model of {list(expected)}: "
            f"expected exactly one of the head keys {expected}, found head keys "
            f"{sorted(head_state)[:10]}"
        )
    head_class = matches[0]
    backbone = head_class.official_backbone(encoder, path, trusted)
    features = backbone.output_info
    built = head if head is None or isinstance(head, nn.Module) else head(features)
    recorded = head_class.official_options(head_state)
    configured = built.init_args if isinstance(built, head_class) else {}
    replaced = {k: v for k, v in recorded.items() if k in configured and configured[k] != v}
    if replaced:
        rank_zero_warn(
            f"official_checkpoint={path!r} holds a {head_class.official_paper} model built with "
            + ", ".join(f"{k}={v!r} (configured {configured[k]!r})" for k, v in replaced.items())
            + ": the file's values are used"
        )
    if isinstance(built, head_class) and not replaced:
        model_head = built
    else:
        model_head = head_class(features, **{**configured, **recorded})
    assert isinstance(model_head, OfficialCheckpoint)
    model_head.load_official_state_dict(checkpoint)
    return backbone, model_head
