"""DCAMA (Shi et al., ECCV 2022) in plain torch: the reference for the project's DCAMA head.

Source: repository ``pawn-sxy/DCAMA``, HEAD ``37fa0539edfc293efeb163fa31e0f9ac032779b8`` (the model
code is unchanged since the initial commit ``8f81fe3``), files ``model/DCAMA.py`` (``DCAMA``,
``DCAMA_model``), ``model/base/transformer.py`` (``MultiHeadedAttention``, ``PositionalEncoding``,
``attention``, ``clones``), ``train.py`` (optimizer, one training step), ``test.py`` (checkpoint
loading, K-shot inference) and ``common/config.py`` (``--lr 1e-3``). The Swin-B backbone is the
one of :mod:`reference_dcama_swin` (``model/base/swin_transformer.py``).

Names are the official ones, so :meth:`ReferenceDCAMA.state_dict` has the layout of the released
``best_model.pt`` minus the ``module.`` prefix that DDP/DataParallel put on it:
``feature_extractor.*`` (the backbone module; the official ``self.backbone`` is the backbone's
*name*, a string), ``model.DCAMA_blocks.{0,1,2}.linears.{0,1}.{weight,bias}``,
``model.pe.{0,1,2}.pe`` (persistent buffers ``[1, 10000, d_model]``),
``model.conv{1..5}.{0,3,6}.{weight,bias}`` (convs), ``model.conv{1..5}.{1,4,7}.{weight,bias}``
(GroupNorms), ``model.mixer{1,2,3}.{0,2}.{weight,bias}``.

Dropped, none of which is used by a forward or a training step: loading the backbone file
(``torch.load(pretrained_path)``: the caller builds and loads the backbone and passes it in),
``fix_randseed``, DDP, logging/evaluation/visualisation, ``torch.autograd.Variable`` (a no-op
wrapper in the positional encoding). Changed without effect: ``build_conv_block`` casts its
first ``in_channel`` (a 0-d tensor, ``stack_ids[i] - stack_ids[j]``) to ``int``. Everything else
is transcribed as written, quirks included.

Dropout: ``PositionalEncoding`` and ``MultiHeadedAttention`` each hold ``nn.Dropout(p=0.5)``
(on the query/key tokens after the positional encoding and on the attention weights); the official
training runs them (``train_mode`` puts ``model`` in train). For a deterministic comparison of a
training step, call :func:`disable_dropout` (sets ``p = 0`` on every ``nn.Dropout``), or compare
in eval.
"""

from __future__ import annotations

import copy
import math
from functools import reduce
from operator import add

import torch
import torch.nn.functional as F
from reference_dcama_swin import SwinTransformer, dcama_swin_base
from torch import Tensor, nn

# ----------------------------------------------------------------------------------------------
# model/base/transformer.py
# ----------------------------------------------------------------------------------------------


def clones(module: nn.Module, N: int) -> nn.ModuleList:
    """Produce N identical layers (deep copies: the copies start with *equal* weights)."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(N)])


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None = None,
    dropout: nn.Module | None = None,
) -> tuple[Tensor, Tensor]:
    """Scaled dot-product attention (``transformer.py::attention``)."""
    d_k = query.size(-1)
    scores = torch.matmul(query, key.transpose(-2, -1)) / math.sqrt(d_k)
    if mask is not None:
        scores = scores.masked_fill(mask == 0, -1e9)
    p_attn = F.softmax(scores, dim=-1)
    if dropout is not None:
        p_attn = dropout(p_attn)
    return torch.matmul(p_attn, value), p_attn


class MultiHeadedAttention(nn.Module):
    """``transformer.py::MultiHeadedAttention``: projects query and key (``linears[0]``,
    ``linears[1]``, no output projection), attends per head with the value a single channel (the
    support mask, repeated over the heads), and averages the heads: ``[B, Lq, 1]``.

    DCAMA calls it as ``block(query, key, mask)``, i.e. the support mask is the *value* and the
    ``mask`` argument stays ``None``."""

    def __init__(self, h: int, d_model: int, dropout: float = 0.1) -> None:
        super().__init__()
        assert d_model % h == 0
        self.d_k = d_model // h
        self.h = h
        self.linears = clones(nn.Linear(d_model, d_model), 2)
        self.attn = None
        self.dropout = nn.Dropout(p=dropout)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        if mask is not None:
            mask = mask.unsqueeze(1)
        nbatches = query.size(0)
        # [B, L, d_model] -> [B, h, L, d_k]; the key is viewed with the *query's* batch size
        query, key = [
            lin(x).view(nbatches, -1, self.h, self.d_k).transpose(1, 2)
            for lin, x in zip(self.linears, (query, key), strict=False)
        ]
        # value [B, Ls] -> [h, B, Ls] -> [B, h, Ls, 1]
        value = value.repeat(self.h, 1, 1).transpose(0, 1).contiguous().unsqueeze(-1)
        x, self.attn = attention(query, key, value, mask=mask, dropout=self.dropout)
        return torch.mean(x, -3)  # mean over heads: [B, Lq, 1]


class PositionalEncoding(nn.Module):
    """``transformer.py::PositionalEncoding``: the sinusoidal encoding of the flattened (row-major)
    token index, added to ``[B, L, d_model]`` tokens, then dropout."""

    def __init__(self, d_model: int, dropout: float, max_len: int = 10000) -> None:
        super().__init__()
        self.dropout = nn.Dropout(p=dropout)
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2) * -(math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        pe = pe.unsqueeze(0)
        self.register_buffer("pe", pe)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.pe[:, : x.size(1)]  # official: Variable(..., requires_grad=False)
        return self.dropout(x)


# ----------------------------------------------------------------------------------------------
# model/DCAMA.py :: DCAMA_model
# ----------------------------------------------------------------------------------------------


class DCAMA_model(nn.Module):  # the official name
    """``DCAMA.py::DCAMA_model``: per-layer attention-weighted mask aggregation at 1/8, 1/16, 1/32,
    then the conv blocks, the cascade and the mixers with the 1/8 and 1/4 skip features."""

    def __init__(self, in_channels: list[int], stack_ids: Tensor) -> None:
        super().__init__()
        self.stack_ids = stack_ids

        # DCAMA blocks (1/8, 1/16, 1/32)
        self.DCAMA_blocks = nn.ModuleList()
        self.pe = nn.ModuleList()
        for inch in in_channels[1:]:
            self.DCAMA_blocks.append(MultiHeadedAttention(h=8, d_model=inch, dropout=0.5))
            self.pe.append(PositionalEncoding(d_model=inch, dropout=0.5))

        outch1, outch2, outch3 = 16, 64, 128

        # conv blocks
        self.conv1 = self.build_conv_block(
            stack_ids[3] - stack_ids[2], [outch1, outch2, outch3], [3, 3, 3], [1, 1, 1]
        )  # 1/32
        self.conv2 = self.build_conv_block(
            stack_ids[2] - stack_ids[1], [outch1, outch2, outch3], [5, 3, 3], [1, 1, 1]
        )  # 1/16
        self.conv3 = self.build_conv_block(
            stack_ids[1] - stack_ids[0], [outch1, outch2, outch3], [5, 5, 3], [1, 1, 1]
        )  # 1/8

        self.conv4 = self.build_conv_block(
            outch3, [outch3, outch3, outch3], [3, 3, 3], [1, 1, 1]
        )  # 1/32 + 1/16
        self.conv5 = self.build_conv_block(
            outch3, [outch3, outch3, outch3], [3, 3, 3], [1, 1, 1]
        )  # 1/16 + 1/8

        # mixer blocks
        self.mixer1 = nn.Sequential(
            nn.Conv2d(
                outch3 + 2 * in_channels[1] + 2 * in_channels[0],
                outch3,
                (3, 3),
                padding=(1, 1),
                bias=True,
            ),
            nn.ReLU(),
            nn.Conv2d(outch3, outch2, (3, 3), padding=(1, 1), bias=True),
            nn.ReLU(),
        )
        self.mixer2 = nn.Sequential(
            nn.Conv2d(outch2, outch2, (3, 3), padding=(1, 1), bias=True),
            nn.ReLU(),
            nn.Conv2d(outch2, outch1, (3, 3), padding=(1, 1), bias=True),
            nn.ReLU(),
        )
        self.mixer3 = nn.Sequential(
            nn.Conv2d(outch1, outch1, (3, 3), padding=(1, 1), bias=True),
            nn.ReLU(),
            nn.Conv2d(outch1, 2, (3, 3), padding=(1, 1), bias=True),
        )

    def forward(
        self, query_feats: list[Tensor], support_feats: list, support_mask: Tensor, nshot: int = 1
    ) -> Tensor:
        """1-shot: ``support_feats`` a list of maps, ``support_mask`` ``[B, H, W]``. K-shot:
        ``support_feats[k][idx]``, ``support_mask`` ``[B, K, H, W]`` (see
        :meth:`ReferenceDCAMA.predict_mask_nshot` for the batch-mixing quirk)."""
        coarse_masks = []
        for idx, query_feat in enumerate(query_feats):
            # 1/4 scale feature only used in skip connect
            if idx < self.stack_ids[0]:
                continue

            bsz, ch, ha, wa = query_feat.size()

            # reshape the input feature and mask
            query = query_feat.view(bsz, ch, -1).permute(0, 2, 1).contiguous()
            if nshot == 1:
                support_feat = support_feats[idx]
                mask = F.interpolate(  # official ``.float()``: the features' type (float64 runs)
                    support_mask.unsqueeze(1).to(query_feat.dtype),
                    support_feat.size()[2:],
                    mode="bilinear",
                    align_corners=True,
                ).view(support_feat.size()[0], -1)
                support_feat = (
                    support_feat.view(support_feat.size()[0], support_feat.size()[1], -1)
                    .permute(0, 2, 1)
                    .contiguous()
                )
            else:
                # [K, B, C, h, w] -> [K*B, h*w, C] (shot-major rows)
                support_feat = torch.stack([support_feats[k][idx] for k in range(nshot)])
                support_feat = support_feat.view(-1, ch, ha * wa).permute(0, 2, 1).contiguous()
                # per episode [K, 1, h, w] -> [B, K, 1, h, w] -> [B, K*h*w] (episode-major rows)
                mask = torch.stack(
                    [
                        F.interpolate(
                            k.unsqueeze(1).to(query_feat.dtype),  # official ``.float()``
                            (ha, wa),
                            mode="bilinear",
                            align_corners=True,
                        )
                        for k in support_mask
                    ]
                )
                mask = mask.view(bsz, -1)

            # DCAMA blocks forward
            if idx < self.stack_ids[1]:
                coarse_mask = self.DCAMA_blocks[0](
                    self.pe[0](query), self.pe[0](support_feat), mask
                )
            elif idx < self.stack_ids[2]:
                coarse_mask = self.DCAMA_blocks[1](
                    self.pe[1](query), self.pe[1](support_feat), mask
                )
            else:
                coarse_mask = self.DCAMA_blocks[2](
                    self.pe[2](query), self.pe[2](support_feat), mask
                )
            coarse_masks.append(coarse_mask.permute(0, 2, 1).contiguous().view(bsz, 1, ha, wa))

        # multi-scale conv blocks forward
        s0, s1, s2, s3 = self.stack_ids
        bsz, ch, ha, wa = coarse_masks[s3 - 1 - s0].size()
        coarse_masks1 = (
            torch.stack(coarse_masks[s2 - s0 : s3 - s0])
            .transpose(0, 1)
            .contiguous()
            .view(bsz, -1, ha, wa)
        )
        bsz, ch, ha, wa = coarse_masks[s2 - 1 - s0].size()
        coarse_masks2 = (
            torch.stack(coarse_masks[s1 - s0 : s2 - s0])
            .transpose(0, 1)
            .contiguous()
            .view(bsz, -1, ha, wa)
        )
        bsz, ch, ha, wa = coarse_masks[s1 - 1 - s0].size()
        coarse_masks3 = (
            torch.stack(coarse_masks[0 : s1 - s0])
            .transpose(0, 1)
            .contiguous()
            .view(bsz, -1, ha, wa)
        )

        coarse_masks1 = self.conv1(coarse_masks1)
        coarse_masks2 = self.conv2(coarse_masks2)
        coarse_masks3 = self.conv3(coarse_masks3)

        # multi-scale cascade (pixel-wise addition)
        coarse_masks1 = F.interpolate(
            coarse_masks1, coarse_masks2.size()[-2:], mode="bilinear", align_corners=True
        )
        mix = coarse_masks1 + coarse_masks2
        mix = self.conv4(mix)

        mix = F.interpolate(mix, coarse_masks3.size()[-2:], mode="bilinear", align_corners=True)
        mix = mix + coarse_masks3
        mix = self.conv5(mix)

        # skip connect 1/8 and 1/4 features (concatenation)
        if nshot == 1:
            support_feat = support_feats[self.stack_ids[1] - 1]
        else:
            support_feat = (
                torch.stack([support_feats[k][self.stack_ids[1] - 1] for k in range(nshot)])
                .max(dim=0)
                .values
            )
        mix = torch.cat((mix, query_feats[self.stack_ids[1] - 1], support_feat), 1)

        upsample_size = (mix.size(-1) * 2,) * 2
        mix = F.interpolate(mix, upsample_size, mode="bilinear", align_corners=True)
        if nshot == 1:
            support_feat = support_feats[self.stack_ids[0] - 1]
        else:
            support_feat = (
                torch.stack([support_feats[k][self.stack_ids[0] - 1] for k in range(nshot)])
                .max(dim=0)
                .values
            )
        mix = torch.cat((mix, query_feats[self.stack_ids[0] - 1], support_feat), 1)

        # mixer blocks forward
        out = self.mixer1(mix)
        upsample_size = (out.size(-1) * 2,) * 2
        out = F.interpolate(out, upsample_size, mode="bilinear", align_corners=True)
        out = self.mixer2(out)
        upsample_size = (out.size(-1) * 2,) * 2
        out = F.interpolate(out, upsample_size, mode="bilinear", align_corners=True)
        logit_mask = self.mixer3(out)

        return logit_mask

    def build_conv_block(
        self,
        in_channel: int,
        out_channels: list[int],
        kernel_sizes: list[int],
        spt_strides: list[int],
        group: int = 4,
    ) -> nn.Sequential:
        """Conv(k, stride, pad k//2) -> GroupNorm(4) -> ReLU, three times."""
        assert len(out_channels) == len(kernel_sizes) == len(spt_strides)

        building_block_layers: list[nn.Module] = []
        for idx, (outch, ksz, stride) in enumerate(
            zip(out_channels, kernel_sizes, spt_strides, strict=False)
        ):
            inch = in_channel if idx == 0 else out_channels[idx - 1]
            pad = ksz // 2
            building_block_layers.append(
                nn.Conv2d(
                    in_channels=int(inch),
                    out_channels=outch,
                    kernel_size=ksz,
                    stride=stride,
                    padding=pad,
                )
            )
            building_block_layers.append(nn.GroupNorm(group, outch))
            building_block_layers.append(nn.ReLU(inplace=True))

        return nn.Sequential(*building_block_layers)


# ----------------------------------------------------------------------------------------------
# model/DCAMA.py :: DCAMA
# ----------------------------------------------------------------------------------------------

#: per backbone name: (feat_channels, nlayers, feat_ids), as ``DCAMA.__init__`` sets them
_BACKBONES: dict[str, tuple[list[int], list[int], list[int] | None]] = {
    "resnet50": ([256, 512, 1024, 2048], [3, 4, 6, 3], list(range(0, 17))),
    "resnet101": ([256, 512, 1024, 2048], [3, 4, 23, 3], list(range(0, 34))),
    "swin": ([128, 256, 512, 1024], [2, 2, 18, 2], None),  # Swin taps all via its feat_maps
}


class ReferenceDCAMA(nn.Module):
    """``DCAMA.py::DCAMA`` with the backbone module passed in (already loaded) instead of
    ``resnet.resnet50()/resnet101()`` + ``load_state_dict(torch.load(path))`` or the Swin-B +
    ``torch.load(path)['model']``.

    ``backbone`` is the official *string* (``'resnet50'``, ``'resnet101'``, ``'swin'``);
    ``feature_extractor`` a torchvision ``resnet50``/``resnet101`` or a
    :class:`reference_dcama_swin.SwinTransformer` (:func:`reference_dcama_swin.dcama_swin_base`).
    """

    def __init__(
        self, backbone: str, feature_extractor: nn.Module, use_original_imgsize: bool = False
    ) -> None:
        super().__init__()
        if backbone not in _BACKBONES:
            raise Exception(f"Unavailable backbone: {backbone}")
        self.backbone = backbone
        self.use_original_imgsize = use_original_imgsize

        # feature extractor initialization
        self.feature_extractor = feature_extractor
        feat_channels, nlayers, feat_ids = _BACKBONES[backbone]
        self.feat_channels = feat_channels
        self.nlayers = nlayers
        if feat_ids is not None:
            self.feat_ids = feat_ids
        self.feature_extractor.eval()

        # define model
        self.lids = reduce(add, [[i + 1] * x for i, x in enumerate(self.nlayers)])
        self.stack_ids = torch.tensor(self.lids).bincount()[-4:].cumsum(dim=0)
        self.model = DCAMA_model(in_channels=self.feat_channels, stack_ids=self.stack_ids)

        self.cross_entropy_loss = nn.CrossEntropyLoss()

    def forward(self, query_img: Tensor, support_img: Tensor, support_mask: Tensor) -> Tensor:
        """1-shot: images ``[B, 3, H, W]``, mask ``[B, H, W]`` -> logits ``[B, 2, H', W']``."""
        with torch.no_grad():
            query_feats = self.extract_feats(query_img)
            support_feats = self.extract_feats(support_img)

        logit_mask = self.model(query_feats, support_feats, support_mask.clone())

        return logit_mask

    def extract_feats(self, img: Tensor) -> list[Tensor]:
        """Swin: every block's output (``feat_maps``, before the stage's patch merging, without the
        final norm) as ``[B, C, h, h]``. ResNet: every bottleneck's output *before* its last ReLU
        (``bn3 + shortcut``), tapped when ``hid + 1 in feat_ids`` (all of them)."""
        feats = []

        if self.backbone == "swin":
            _ = self.feature_extractor.forward_features(img)
            for feat in self.feature_extractor.feat_maps:
                bsz, hw, c = feat.size()
                h = int(hw**0.5)
                feat = feat.view(bsz, h, h, c).permute(0, 3, 1, 2).contiguous()
                feats.append(feat)
        elif self.backbone == "resnet50" or self.backbone == "resnet101":
            fe = self.feature_extractor
            bottleneck_ids = reduce(add, [list(range(x)) for x in self.nlayers])
            # Layer 0
            feat = fe.conv1.forward(img)
            feat = fe.bn1.forward(feat)
            feat = fe.relu.forward(feat)
            feat = fe.maxpool.forward(feat)

            # Layer 1-4
            for hid, (bid, lid) in enumerate(zip(bottleneck_ids, self.lids, strict=False)):
                block = fe.__getattr__(f"layer{lid}")[bid]  # official: "layer%d" % lid
                res = feat
                feat = block.conv1.forward(feat)
                feat = block.bn1.forward(feat)
                feat = block.relu.forward(feat)
                feat = block.conv2.forward(feat)
                feat = block.bn2.forward(feat)
                feat = block.relu.forward(feat)
                feat = block.conv3.forward(feat)
                feat = block.bn3.forward(feat)

                if bid == 0:
                    res = block.downsample.forward(res)

                feat += res

                if hid + 1 in self.feat_ids:
                    feats.append(feat.clone())

                feat = block.relu.forward(feat)

        return feats

    def logit_mask_nshot(self, batch: dict, nshot: int) -> Tensor:
        """:meth:`predict_mask_nshot` before its final ``argmax`` (the same code): the logits
        ``[B, 2, H, W]`` resized to the query's size.

        K-shot quirk (as written officially; harmless at the official test batch size 1): the
        support features are stacked shot-major (``[K, B, C, h, w]`` viewed as ``[K*B, hw, C]``),
        while the attention views the keys as ``[B, K*hw, ...]`` (the query's batch size), so
        episode ``b`` attends to rows ``b*K ... b*K+K-1`` of the shot-major stack, i.e. the
        features of (shot, episode) pairs ``(r // B, r % B)``, with the *right* episode's masks
        (``[B, K*hw]``, episode-major) as values. With ``B > 1`` the episodes' supports mix.
        Each shot's key tokens get positions ``0 .. hw-1`` of the encoding. The 1/8 and 1/4 skip
        support features are the element-wise max over the shots (per episode, correct)."""
        query_img = batch["query_img"]
        support_imgs = batch["support_imgs"]
        support_masks = batch["support_masks"]

        if nshot == 1:
            logit_mask = self(query_img, support_imgs[:, 0], support_masks[:, 0])
        else:
            with torch.no_grad():
                query_feats = self.extract_feats(query_img)
                n_support_feats = []
                for k in range(nshot):
                    support_feats = self.extract_feats(support_imgs[:, k])
                    n_support_feats.append(support_feats)
            logit_mask = self.model(query_feats, n_support_feats, support_masks.clone(), nshot)

        if self.use_original_imgsize:
            org_qry_imsize = tuple(
                [batch["org_query_imsize"][1].item(), batch["org_query_imsize"][0].item()]
            )
            logit_mask = F.interpolate(
                logit_mask, org_qry_imsize, mode="bilinear", align_corners=True
            )
        else:
            logit_mask = F.interpolate(
                logit_mask, support_imgs[0].size()[2:], mode="bilinear", align_corners=True
            )
        return logit_mask

    def predict_mask_nshot(self, batch: dict, nshot: int) -> Tensor:
        """``DCAMA.predict_mask_nshot``: n-shot inference, the predicted mask ``[B, H, W]``;
        ``batch['support_imgs']`` ``[B, K, 3, H, W]``, ``batch['support_masks']``
        ``[B, K, H, W]``."""
        return self.logit_mask_nshot(batch, nshot).argmax(dim=1)

    def compute_objective(self, logit_mask: Tensor, gt_mask: Tensor) -> Tensor:
        """Cross entropy (mean over all pixels of the batch) of the 2-class logits."""
        bsz = logit_mask.size(0)
        logit_mask = logit_mask.view(bsz, 2, -1)
        gt_mask = gt_mask.view(bsz, -1).long()

        return self.cross_entropy_loss(logit_mask, gt_mask)

    def train_mode(self) -> None:
        self.train()
        self.feature_extractor.eval()


# ----------------------------------------------------------------------------------------------
# train.py
# ----------------------------------------------------------------------------------------------


def official_optimizer(model: nn.Module, lr: float = 1e-3) -> torch.optim.SGD:
    """``train.py``: SGD over *all* ``model.parameters()`` (the backbone's included; they get no
    gradient, as the features are computed under ``no_grad``, so SGD skips them), momentum 0.9,
    Nesterov, weight decay ``lr / 10`` (1e-4 at the default ``--lr 1e-3``)."""
    return torch.optim.SGD(
        [
            {
                "params": model.parameters(),
                "lr": lr,
                "momentum": 0.9,
                "weight_decay": lr / 10,
                "nesterov": True,
            }
        ]
    )


def official_train_step(
    model: ReferenceDCAMA, optimizer: torch.optim.Optimizer, batch: dict
) -> tuple[Tensor, Tensor]:
    """One iteration of ``train.py::train(..., training=True)`` (1-shot training; the official
    loop calls ``train_mode`` once per epoch, here once per step, the same thing). ``batch``:
    ``query_img [B,3,H,W]``, ``support_imgs [B,1,3,H,W]``, ``support_masks [B,1,H,W]``,
    ``query_mask [B,H,W]``. Returns ``(loss, logit_mask)``."""
    model.train_mode()
    logit_mask = model(
        batch["query_img"], batch["support_imgs"].squeeze(1), batch["support_masks"].squeeze(1)
    )
    loss = model.compute_objective(logit_mask, batch["query_mask"])
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss, logit_mask


def disable_dropout(model: nn.Module) -> None:
    """Not official: ``p = 0`` on every ``nn.Dropout`` (the 3 ``pe[i].dropout`` and 3
    ``DCAMA_blocks[i].dropout``, p = 0.5 officially) to compare training steps deterministically."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def load_official_checkpoint(model: nn.Module, state_dict: dict) -> None:
    """``test.py``'s loading: the checkpoint's keys are renamed *by position* to the model's keys
    (``zip(ckpt.keys(), model.state_dict().keys())``, no name check), then a strict load.
    Officially the model is wrapped in ``nn.DataParallel`` first (keys ``module.*``); here the bare
    model, so the renaming also drops the checkpoint's ``module.`` prefix."""
    state_dict = dict(state_dict)
    params = model.state_dict()
    for k1, k2 in zip(list(state_dict.keys()), params.keys(), strict=False):
        state_dict[k2] = state_dict.pop(k1)
    model.load_state_dict(state_dict)


def build_reference_dcama(backbone: str, use_original_imgsize: bool = False) -> ReferenceDCAMA:
    """Random-weight backbone (torchvision ``resnet50``/``resnet101``, or DCAMA's Swin-B) wrapped
    in :class:`ReferenceDCAMA`. Load real weights into ``feature_extractor`` afterwards."""
    if backbone == "swin":
        fe: nn.Module = dcama_swin_base()
    else:
        from torchvision.models import resnet

        fe = getattr(resnet, backbone)()
    return ReferenceDCAMA(backbone, fe, use_original_imgsize)


__all__ = [
    "DCAMA_model",
    "MultiHeadedAttention",
    "PositionalEncoding",
    "ReferenceDCAMA",
    "SwinTransformer",
    "attention",
    "build_reference_dcama",
    "clones",
    "disable_dropout",
    "load_official_checkpoint",
    "official_optimizer",
    "official_train_step",
]
