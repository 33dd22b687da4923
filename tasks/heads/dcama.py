"""DCAMA head: Shi, Wei, Chen, Wang, Ge and Zhang, "Dense Cross-Query-and-Support Attention
Weighted Mask Aggregation for Few-Shot Segmentation", ECCV 2022; official code
github.com/pawn-sxy/DCAMA (``model/DCAMA.py``, ``model/base/transformer.py``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones import Backbone
from backbones.features import FeaturePyramid
from backbones.timm_encoders import TimmEncoder
from tasks.layers import check_dropout, resize

from .common import HeadOutput, check_inputs, foreground_masks
from .official import OfficialCheckpoint, load_official_head

#: The stages whose every block is attended, counted from the deepest, with the official names
#: of their mask decoders (``conv1`` at 1/32, ``conv2`` at 1/16, ``conv3`` at 1/8) and kernels.
ATTENDED_STAGES = {-1: ("conv1", (3, 3, 3)), -2: ("conv2", (5, 3, 3)), -3: ("conv3", (5, 5, 3))}

#: The stages whose last block is a skip connection, coarse first (1/8, then 1/4).
SKIP_STAGES = (-3, -4)

#: DCAMA's Swin-B (``SwinTransformer(img_size=384, window_size=12, embed_dim=128, depths=[2, 2,
#: 18, 2])``) in timm.
OFFICIAL_SWIN = "swin_base_patch4_window12_384"

#: Attention heads of every ``DCAMA_blocks`` module (``MultiHeadedAttention(h=8)``).
ATTENTION_HEADS = 8

#: Rows of the official ``PositionalEncoding`` tables (``max_len=10000``).
POSITIONS = 10000

#: Channels of the mask decoders' three convolutions (``outch1, outch2, outch3``).
MASK_CHANNELS = (16, 64, 128)

#: Groups of the GroupNorm after each decoder convolution (``build_conv_block``'s ``group=4``).
NORM_GROUPS = 4


def conv_block(
    in_channels: int, channels: tuple[int, ...], kernels: tuple[int, ...]
) -> nn.Sequential:
    """``build_conv_block``: (conv with bias, GroupNorm(4), ReLU) per layer, stride 1."""
    layers: list[nn.Module] = []
    for out_channels, kernel in zip(channels, kernels, strict=True):
        layers += [nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2),
                   nn.GroupNorm(NORM_GROUPS, out_channels), nn.ReLU(inplace=True)]  # fmt: skip
        in_channels = out_channels
    return nn.Sequential(*layers)


def mixer(in_channels: int, hidden: int, out_channels: int, last_relu: bool) -> nn.Sequential:
    """``mixer1..3``: two 3x3 convolutions with bias, ReLU after the first (and the second)."""
    layers = [nn.Conv2d(in_channels, hidden, 3, padding=1), nn.ReLU(),
              nn.Conv2d(hidden, out_channels, 3, padding=1)]  # fmt: skip
    return nn.Sequential(*layers, nn.ReLU()) if last_relu else nn.Sequential(*layers)


def sinusoidal_encoding(length: int, channels: int, device: torch.device | None = None) -> Tensor:
    """``PositionalEncoding``'s table [length, channels] (float32, on ``device``): sin on even,
    cos on odd channels of the token index (the flattened pixel index), frequencies
    ``10000^(-2i/d)``."""
    position = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    frequency = torch.exp(
        torch.arange(0, channels, 2, device=device) * -(math.log(10000.0) / channels)
    )
    table = torch.zeros(length, channels, device=device)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


class MaskAttention(nn.Module):
    """One ``MultiHeadedAttention`` of DCAMA: query and support tokens (with the positional
    encoding, then dropout) projected by ``linears[0]``/``linears[1]`` into 8 heads; the
    value is the support's foreground mask, so each query pixel gets the attention-weighted
    mask of the support pixels, averaged over the heads. No value or output projection."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.linears = nn.ModuleList(nn.Linear(channels, channels) for _ in range(2))
        self.token_dropout = nn.Dropout(dropout)  # ``PositionalEncoding``'s
        #: of the attention weights: its ``p`` and mode, applied inside
        #: ``scaled_dot_product_attention``
        self.attention_dropout = nn.Dropout(dropout)

    def forward(self, query: Tensor, support: Tensor, mask: Tensor) -> Tensor:
        """query [B, C, h, w], support [B, K, C, h', w'], mask [B, K, h', w'] -> [B, h, w]."""
        batch, channels, height, width = query.shape
        shots = support.shape[1]
        query_tokens = query.flatten(2).transpose(1, 2)
        support_tokens = support.flatten(3).transpose(2, 3)  # [B, K, hw', C]
        encoding = self.encoding(max(query_tokens.shape[1], support_tokens.shape[2]), query)
        query_tokens = self.token_dropout(query_tokens + encoding[: query_tokens.shape[1]])
        # each shot's tokens get positions 0..hw'-1; the K shots are one set of keys
        support_tokens = self.token_dropout(support_tokens + encoding[: support_tokens.shape[2]])
        support_tokens = support_tokens.flatten(1, 2)
        heads, dim = ATTENTION_HEADS, channels // ATTENTION_HEADS
        q = self.linears[0](query_tokens).unflatten(-1, (heads, dim)).transpose(1, 2)
        k = self.linears[1](support_tokens).unflatten(-1, (heads, dim)).transpose(1, 2)
        v = mask.reshape(batch, 1, shots * mask[0, 0].numel(), 1).expand(-1, heads, -1, -1)
        dropout = self.attention_dropout
        attended = F.scaled_dot_product_attention(
            q, k, v.to(q.dtype), dropout_p=dropout.p if dropout.training else 0.0
        )
        return attended.mean(1).reshape(batch, height, width)

    def encoding(self, length: int, like: Tensor) -> Tensor:
        return sinusoidal_encoding(length, like.shape[1], like.device).to(like.dtype)


class DCAMAHead(OfficialCheckpoint):
    """DCAMA's attention-weighted mask aggregation and its decoder.

    From the official ``model/DCAMA.py`` (module names kept, so its checkpoints load):

    * Every block of the last three stages (before its last activation where the encoder has
      such taps: ResNet, as DCAMA's ``extract_feats``; Swin's and other encoders' block
      outputs) goes through its stage's :class:`MaskAttention` (``DCAMA_blocks[0..2]`` at 1/8,
      1/16, 1/32): one aggregated mask per block, 1 channel.
    * Per stage the masks are stacked and decoded (``conv3``, ``conv2``, ``conv1``: 16, 64, 128
      channels, GroupNorm(4), ReLU); coarse to fine the maps are resized bilinearly to the next
      stage's size and added (``conv4``, ``conv5`` after each sum).
    * Skips: the query's and the support's last block of the 1/8 stage, concatenated, the map
      upsampled x2, then those of the 1/4 stage (the support's maximum over the shots); three
      mixers with x2 upsampling between them give 2-class logits at 4 times the first skip's
      resolution (the input's size when its stride is 4, as ResNet's and Swin's).
    * K shots in one pass: each shot's tokens carry positions 0..hw-1 and the K shots' tokens
      are the keys together; the loss is the task's cross-entropy (``compute_objective``'s).

    Deviations: the official K-shot path stacks the support features shot-major and views them
    per episode, so a batch of more than one episode attends to other episodes' supports (its
    ``test.sh`` runs K-shot at batch 1, where both agree): here each episode attends to its own
    shots. The x2 upsampling is to the 1/4 skip's size (official: a square of twice the width,
    equal for the square inputs it runs on). A support label 255 is background here, as for
    every head; the official value would be 255 (its data code gives binary masks). The
    positional encoding is computed, not stored
    (the official 10000-row tables, checked when a released file loads). Attention runs
    through ``scaled_dot_product_attention`` (its dropout draws differ from the official
    ``nn.Dropout`` of the weights; equal in eval); with a value of one channel it takes the
    math path, holding the [B, 8, hw, K hw] weights as the official code does (at 384 px, 1/8:
    about 170 MB per block and episode in float32). Positions are not capped at the official
    table's 10000 (1/8 maps above 800 px). The stages are the last three by position: on an
    encoder whose deepest stride is not 32 (VGG-16: 16) they are finer, and cost more.

    Args:
        features: The encoder's outputs; the blocks of its last three stages and the last
            block of the stage before them are read.
        dropout: of the positional encoding's output and of the attention weights (official
            0.5).
    """

    official_paper = "DCAMA"
    official_signature = "model.DCAMA_blocks.0.linears.0.weight"
    official_renames = (("model.", ""),)
    official_encoder: ClassVar[Mapping[str, Any]] = {"stem": "standard", "output_stride": 32}

    @classmethod
    def official_backbone(cls, encoder: Mapping[str, Tensor], path: str, trusted: bool) -> Backbone:
        """DCAMA's Swin-B (Microsoft's layout under ``feature_extractor.``) as timm's, or the
        torchvision ResNet-50/101 of its ResNet models."""
        if any(key.endswith("relative_position_bias_table") for key in encoder):
            return TimmEncoder(OFFICIAL_SWIN, weights=path, weights_trusted=trusted)
        return super().official_backbone(encoder, path, trusted)

    def __init__(self, features: FeaturePyramid, dropout: float = 0.5) -> None:
        super().__init__()
        check_dropout(self, dropout=dropout)
        taps = any(info.pre_activation for info in features.values())
        self.stage_blocks = {
            stage: [info.name for info in features.blocks(stage, pre_activation=taps)]
            for stage in ATTENDED_STAGES
        }
        empty = [features.stage(s).name for s in (*ATTENDED_STAGES, *SKIP_STAGES)
                 if not features.blocks(s, pre_activation=taps)]  # fmt: skip
        if empty:
            raise ValueError(
                f"the encoder declares no block outputs in its stages {empty}; DCAMA attends "
                "to every block of the last three stages and skips the last block of the "
                "stage before them"
            )
        self.skip_features = tuple(
            features.blocks(stage, pre_activation=taps)[-1].name for stage in SKIP_STAGES
        )
        attended = [name for stage in (-3, -2, -1) for name in self.stage_blocks[stage]]
        self.in_features = (self.skip_features[1], *attended)
        odd = {features.stage(stage).name: features[blocks[0]].channels
               for stage, blocks in self.stage_blocks.items()
               if features[blocks[0]].channels % (2 * ATTENTION_HEADS)}  # fmt: skip
        if odd:
            raise ValueError(
                f"DCAMAHead splits each attended stage's channels into {ATTENTION_HEADS} heads "
                f"of an even size; the encoder's stages {odd} have other channel counts"
            )
        self.DCAMA_blocks = nn.ModuleList(
            MaskAttention(features[self.stage_blocks[stage][0]].channels, dropout)
            for stage in (-3, -2, -1)
        )
        for stage, (name, kernels) in ATTENDED_STAGES.items():
            blocks = len(self.stage_blocks[stage])
            self.add_module(name, conv_block(blocks, MASK_CHANNELS, kernels))
        out1, out2, out3 = MASK_CHANNELS
        self.conv4 = conv_block(out3, (out3,) * 3, (3, 3, 3))
        self.conv5 = conv_block(out3, (out3,) * 3, (3, 3, 3))
        skip_channels = sum(features[name].channels for name in self.skip_features)
        self.mixer1 = mixer(out3 + 2 * skip_channels, out3, out2, last_relu=True)
        self.mixer2 = mixer(out2, out2, out1, last_relu=True)
        self.mixer3 = mixer(out1, out1, 2, last_relu=False)

    def forward(
        self,
        query_feats: Mapping[str, Tensor],
        support_feats: Mapping[str, Tensor],
        support_masks: Tensor,
        class_ids: Tensor | None = None,
    ) -> HeadOutput:
        """Segment the query with the K shots at once; see :mod:`tasks.heads` for shapes."""
        check_inputs(query_feats, support_feats, support_masks, self.in_features)
        batch, shots = support_masks.shape[:2]
        resized: dict[tuple[int, int], Tensor] = {}  # the value at each map size, once
        decoded = {}
        for index, stage in enumerate((-3, -2, -1)):
            masks = []
            for name in self.stage_blocks[stage]:
                support = support_feats[name]
                size = tuple(support.shape[-2:])
                if size not in resized:
                    mask = foreground_masks(support_masks, size)
                    resized[size] = mask.reshape(batch, shots, *size)
                masks.append(self.DCAMA_blocks[index](query_feats[name], support, resized[size]))
            conv = getattr(self, ATTENDED_STAGES[stage][0])
            decoded[stage] = conv(torch.stack(masks, 1).to(self.conv4[0].weight.dtype))
        mixed = self.conv4(resize(decoded[-1], decoded[-2].shape[-2:]) + decoded[-2])
        mixed = self.conv5(resize(mixed, decoded[-3].shape[-2:]) + decoded[-3])
        for skip, name in enumerate(self.skip_features):
            query = query_feats[name]
            if skip:  # the official x2 upsampling, onto the 1/4 skip
                mixed = resize(mixed, query.shape[-2:])
            support = support_feats[name].amax(1)
            mixed = torch.cat([mixed, query.to(mixed.dtype), support.to(mixed.dtype)], 1)
        out = self.mixer1(mixed)
        out = self.mixer2(resize(out, [2 * side for side in out.shape[-2:]]))
        logits = self.mixer3(resize(out, [2 * side for side in out.shape[-2:]]))
        return HeadOutput(logits=logits, aux_logits=[], aux_weight=0.0)

    def load_official_state_dict(self, checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
        """The official head keys by name (``module.`` and ``model.`` stripped), strictly; the
        stored positional encodings (``model.pe.{i}.pe``, [1, 10000, C]: fixed sinusoids,
        computed here) are checked for their shape and not kept.

        Official ``test.py`` renames a file's keys to its model's by position; the files are
        written by the same model code (``Logger.save_model_miou``: the DDP model's
        ``state_dict()``), so by position is by name, which is what this loader checks.
        """
        state = dict(checkpoint.get("state_dict", checkpoint))
        tables = {int(k.split(".")[-2]): k for k in state
                  if k.removeprefix("module.").startswith("model.pe.")}  # fmt: skip
        for index, block in enumerate(self.DCAMA_blocks):
            channels = block.linears[0].in_features
            key = tables.pop(index, None)
            if key is None or tuple(state.pop(key).shape) != (1, POSITIONS, channels):
                raise RuntimeError(
                    f"official DCAMA checkpoint: model.pe.{index}.pe missing or not [1, "
                    f"{POSITIONS}, {channels}] (the head's {len(self.DCAMA_blocks)} scales)"
                )
        return load_official_head(self, state, self.official_paper, self.official_renames)
