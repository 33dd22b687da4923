"""Few-shot segmentation heads.

Every head follows one interface::

    head = Head(in_channels, **options)
    out = head(query_feats, support_feats, support_masks)

* ``in_channels``: ``dict[str, int]``, the channels of every output the backbone can give, by
  name (``stem``, ``layer1`` .. ``layer4``, each block as ``layer3.2`` and its residual sum
  before the last ReLU as ``layer3.2.pre_relu``; resnet50 stages:
  256/512/1024/2048, resnet18: 64/128/256/512).
* ``head.in_features``: the outputs the head reads, set in ``__init__`` (it may depend on
  ``in_channels``: HSNet takes every block of layer2..layer4 before its last ReLU,
  ``layer3.0.pre_relu``...). The task computes exactly
  these, and the modules after the last one get no gradient and are not run. The heads here read
  layer2 and layer3; when layer2 is larger than layer3 (output stride 16) it is resized
  bilinearly to layer3's size. PFENet's declares ``layer4`` too.
* ``head.support_mask_at`` (optional): a backbone output in ``in_features`` at which the
  support's features are multiplied by their foreground mask (label 1, resized bilinearly with
  ``align_corners``) before the later outputs are computed from them, without gradient (the
  stages after it are frozen); the query's later outputs come from its plain features. PFENet
  sets ``"layer3"``: its prior reads the support's layer4 of the masked layer3. The task runs
  this through :meth:`backbones.Backbone.forward_from`.
* ``head.init_args``: the head's own options (not ``in_channels``), which checkpoints store so
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
  ``ce(logits) + aux_weight * mean(ce(a) for a in aux_logits)``. A head that segments with each
  shot alone also sets ``shot_logits`` [B, K, 2, h, w]: evaluation then votes over the shots'
  predictions (HSNet).

Any K >= 1 and batch size work, in train and eval mode.
"""

from .asgnet import ASGNetHead
from .common import HeadOutput
from .hsnet import HSNetHead
from .pfenet import PFENetHead
from .prototype import PrototypeHead

__all__ = ["ASGNetHead", "HSNetHead", "HeadOutput", "PFENetHead", "PrototypeHead"]
