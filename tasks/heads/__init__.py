"""Few-shot segmentation heads.

Every head follows one interface::

    head = Head(in_channels, **options)
    out = head(query_feats, support_feats, support_masks)

* ``in_channels``: ``dict[str, int]``, the channels of every output the backbone can give, by
  name (``stem``, ``layer1`` .. ``layer4``, and each block as ``layer3.2``; resnet50 stages:
  256/512/1024/2048, resnet18: 64/128/256/512).
* ``head.in_features``: the outputs the head reads, set in ``__init__`` (it may depend on
  ``in_channels``: HSNet would take every block of layer2..layer4). The task computes exactly
  these, and the modules after the last one get no gradient and are not run. The heads here read
  layer2 and layer3 (PFENet/ASGNet); when layer2 is larger than layer3 (output stride 16) it is
  resized bilinearly to layer3's size. A PFENet head would declare ``layer4`` too.
* ``head.init_args``: the head's own options (not ``in_channels``), which checkpoints store so
  that they rebuild the head.
* ``query_feats``: ``dict[str, Tensor]`` of [B, C, h, w]; ``support_feats``: ``dict[str, Tensor]``
  of [B, K, C, h, w]; features may be detached, channels_last, and the call may run under
  autocast.
* ``support_masks``: [B, K, H, W] long at image resolution; 1 foreground, 0 background, 255
  ignored (treated as not foreground).
* ``out``: :class:`HeadOutput` with ``logits`` [B, 2, h, w] at feature resolution (upsampled by
  the task), ``aux_logits`` (list of [B, 2, *, *], maybe empty) and ``aux_weight``; the loss is
  ``ce(logits) + aux_weight * mean(ce(a) for a in aux_logits)``.

Any K >= 1 and batch size work, in train and eval mode.
"""

from .asgnet import ASGNetHead
from .common import HeadOutput
from .prototype import PrototypeHead

__all__ = ["ASGNetHead", "HeadOutput", "PrototypeHead"]
