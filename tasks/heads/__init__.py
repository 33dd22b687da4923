"""Few-shot segmentation heads.

Every head is a :class:`FewShotHead` (``tasks/heads/base.py``), checked by
:func:`tasks.heads.testing.check_head`::

    head = Head(features, **options)
    out = head(query_feats, support_feats, support_masks, class_ids=class_ids)

* ``features``: :class:`backbones.FeaturePyramid`, the description of every output the encoder
  can give (its ``output_info``): name, channels, stride, stage, block, pre-activation. Heads
  select by meaning, never by an encoder's names: the mid-level features are the outputs of the
  two stages before the deepest (:func:`~tasks.heads.common.mid_level_layers`; a ResNet's
  layer3 and layer2, VGG-16's layer3 and layer2), PFENet's prior reads the deepest stage, HSNet
  every block of the last three stages before its last activation. So every head runs on any
  :class:`backbones.Backbone` that declares its stages.
* ``head.in_features``: the names of the outputs the head reads, set in ``__init__`` from
  ``features``. The task computes exactly these, and the modules after the last one get no
  gradient and are not run. When the shallower mid-level feature is larger than the deeper one
  (output stride 16, VGG-16) it is resized bilinearly to the deeper one's size.
* ``head.support_mask_at`` (optional): a backbone output in ``in_features`` at which the
  support's features are multiplied by their foreground mask (label 1, resized bilinearly with
  ``align_corners``) before the later outputs are computed from them, without gradient (the
  stages after it are frozen); the query's later outputs come from its plain features. PFENet
  sets the second deepest stage: its prior reads the support's layer4 of the masked layer3.
  The task runs this through :meth:`backbones.Backbone.forward_from`.
* ``head.requires_frozen_backbone``, and the hooks the task calls on every head, each with a
  neutral default in :class:`FewShotHead`: ``prepare_backbone`` (the encoder it runs on),
  ``setup(datamodule)``, ``check_ready_to_fit()``, ``param_groups(lr)``; ``forward`` always
  receives ``class_ids`` (each episode's dataset class, or ``None``). BAM's base learner (its
  encoder, class split, channels and dropout) lives in these hooks of :class:`BAMHead`.
* ``head.init_args``: the head's own options (not ``features``), which checkpoints store so
  that they rebuild the head; :class:`backbones.arguments.CapturesArguments` records them from
  the constructor's signature (a head whose ``init_args`` miss one of its options is refused by
  :func:`tasks.base.describe_head`).
* ``query_feats``: ``dict[str, Tensor]`` of [B, C, h, w]; ``support_feats``: ``dict[str, Tensor]``
  of [B, K, C, h, w]; features may be detached, channels_last, and the call may run under
  autocast.
* ``support_masks``: [B, K, H, W] long at image resolution; 1 foreground, 0 background, 255
  ignored (treated as not foreground).
* ``out``: :class:`HeadOutput` with ``logits`` [B, 2, h, w] at feature resolution (upsampled by
  the task), ``aux_logits`` (list of [B, 2, *, *], maybe empty) and ``aux_weight``; the loss is
  ``ce(logits) + aux_weight * mean(ce(a) for a in aux_logits)``, ``ce`` reduced as the
  protocol's ``loss_reduction`` says. A head that segments with each
  shot alone also sets ``shot_logits`` [B, K, 2, h, w]: evaluation then votes over the shots'
  predictions (HSNet).

Any K >= 1 and batch size work, in train and eval mode.
"""

from .asgnet import ASGNetHead
from .bam import BAMHead
from .base import FewShotHead
from .common import HeadOutput
from .dcama import DCAMAHead
from .hsnet import HSNetHead
from .pfenet import PFENetHead
from .prototype import PrototypeHead

__all__ = [
    "ASGNetHead",
    "BAMHead",
    "DCAMAHead",
    "FewShotHead",
    "HSNetHead",
    "HeadOutput",
    "PFENetHead",
    "PrototypeHead",
]
