"""DCAMA's vendored Swin Transformer, transcribed for the parity test of :class:`TimmEncoder`.

Source: repository ``pawn-sxy/DCAMA`` (commit 8f81fe3), file ``model/base/swin_transformer.py``
(Microsoft's Swin, MIT licence, Ze Liu, with DCAMA's per-block ``feat_maps``), and
``model/DCAMA.py`` for the Swin-B it builds (``img_size=384, patch_size=4, window_size=12,
embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32]``, loaded from
``torch.load(path)['model']`` of ``swin_base_patch4_window12_384_22kto1k.pth``) and for
``extract_feats``, which turns ``feat_maps`` into ``[B, C, H, W]`` maps (:func:`extract_feats`).

Plain torch, independent of timm. The parameter and buffer names are the official ones (the
layout of Microsoft's release: ``patch_embed.proj``, ``layers.{i}.blocks.{j}.attn.
relative_position_bias_table``, ``layers.{i}.downsample.reduction`` at the *end* of stage ``i``,
``norm``, ``head``; the persistent buffers ``relative_position_index`` and ``attn_mask``).

Left out, none of which changes an eval forward of DCAMA's Swin-B: dropout and drop path (identity
in eval; DCAMA keeps the backbone in eval), gradient checkpointing, the absolute position
embedding (``ape=False`` in DCAMA), ``flops``/``extra_repr``/``no_weight_decay``. Also changed:
``torch.meshgrid(..., indexing="ij")`` (the official call's implicit default, spelled out).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """(B, H, W, C) -> (num_windows*B, window_size, window_size, C)"""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)


def window_reverse(windows: Tensor, window_size: int, H: int, W: int) -> Tensor:
    """(num_windows*B, window_size, window_size, C) -> (B, H, W, C)"""
    B = int(windows.shape[0] / (H * W / window_size / window_size))
    x = windows.view(B, H // window_size, W // window_size, window_size, window_size, -1)
    return x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, H, W, -1)


class WindowAttention(nn.Module):
    """Window multi-head self attention with relative position bias (shifted or not)."""

    def __init__(self, dim: int, window_size: tuple[int, int], num_heads: int) -> None:
        super().__init__()
        self.dim, self.window_size, self.num_heads = dim, window_size, num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window_size[0] - 1) * (2 * window_size[1] - 1), num_heads)
        )
        coords = torch.stack(
            torch.meshgrid(
                [torch.arange(window_size[0]), torch.arange(window_size[1])], indexing="ij"
            )
        )  # 2, Wh, Ww
        coords_flatten = torch.flatten(coords, 1)  # 2, Wh*Ww
        relative_coords = coords_flatten[:, :, None] - coords_flatten[:, None, :]
        relative_coords = relative_coords.permute(1, 2, 0).contiguous()  # Wh*Ww, Wh*Ww, 2
        relative_coords[:, :, 0] += window_size[0] - 1  # shift to start from 0
        relative_coords[:, :, 1] += window_size[1] - 1
        relative_coords[:, :, 0] *= 2 * window_size[1] - 1
        self.register_buffer("relative_position_index", relative_coords.sum(-1))
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        B_, N, C = x.shape
        qkv = self.qkv(x).reshape(B_, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        area = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(area, area, -1).permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(B_ // nW, nW, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.softmax(attn)
        x = (attn @ v).transpose(1, 2).reshape(B_, N, C)
        return self.proj(x)


class SwinTransformerBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        num_heads: int,
        window_size: int = 7,
        shift_size: int = 0,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.dim, self.input_resolution = dim, input_resolution
        self.window_size, self.shift_size = window_size, shift_size
        if min(self.input_resolution) <= self.window_size:
            # window larger than the map: no partition, no shift (Swin-B's stage 4 at 384: 12x12)
            self.shift_size = 0
            self.window_size = min(self.input_resolution)
        assert 0 <= self.shift_size < self.window_size, "shift_size must in 0-window_size"
        self.norm1 = nn.LayerNorm(dim)
        ws = self.window_size
        self.attn = WindowAttention(dim, window_size=(ws, ws), num_heads=num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        attn_mask = None
        if self.shift_size > 0:  # attention mask of SW-MSA
            H, W = self.input_resolution
            img_mask = torch.zeros((1, H, W, 1))
            slices = (slice(0, -ws), slice(-ws, -self.shift_size), slice(-self.shift_size, None))
            cnt = 0
            for h in slices:
                for w in slices:
                    img_mask[:, h, w, :] = cnt
                    cnt += 1
            mask_windows = window_partition(img_mask, ws).view(-1, ws * ws)
            attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
            attn_mask = attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(
                attn_mask == 0, 0.0
            )
        self.register_buffer("attn_mask", attn_mask)

    def forward(self, x: Tensor) -> Tensor:
        H, W = self.input_resolution
        B, L, C = x.shape
        assert L == H * W, "input feature has wrong size"
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        s = self.shift_size
        shifted_x = torch.roll(x, shifts=(-s, -s), dims=(1, 2)) if s > 0 else x
        x_windows = window_partition(shifted_x, self.window_size)
        x_windows = x_windows.view(-1, self.window_size * self.window_size, C)
        attn_windows = self.attn(x_windows, mask=self.attn_mask)
        attn_windows = attn_windows.view(-1, self.window_size, self.window_size, C)
        shifted_x = window_reverse(attn_windows, self.window_size, H, W)
        x = torch.roll(shifted_x, shifts=(s, s), dims=(1, 2)) if s > 0 else shifted_x
        x = shortcut + x.view(B, H * W, C)
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    def __init__(self, input_resolution: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.input_resolution, self.dim = input_resolution, dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        H, W = self.input_resolution
        B, L, C = x.shape
        assert L == H * W, "input feature has wrong size"
        assert H % 2 == 0 and W % 2 == 0, f"x size ({H}*{W}) are not even."
        x = x.view(B, H, W, C)
        x0 = x[:, 0::2, 0::2, :]
        x1 = x[:, 1::2, 0::2, :]
        x2 = x[:, 0::2, 1::2, :]
        x3 = x[:, 1::2, 1::2, :]
        x = torch.cat([x0, x1, x2, x3], -1).view(B, -1, 4 * C)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One stage: its blocks, each output kept (DCAMA's change), then the patch merging."""

    def __init__(
        self,
        dim: int,
        input_resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        downsample: bool = False,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                input_resolution,
                num_heads,
                window_size,
                shift_size=0 if i % 2 == 0 else window_size // 2,
                mlp_ratio=mlp_ratio,
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(input_resolution, dim) if downsample else None

    def forward(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        feats = []
        for blk in self.blocks:
            x = blk(x)
            feats.append(x.clone().detach())
        if self.downsample is not None:
            x = self.downsample(x)
        return feats, x


class PatchEmbed(nn.Module):
    def __init__(
        self, img_size: int = 224, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96
    ) -> None:
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patches_resolution = [img_size // patch_size, img_size // patch_size]
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)  # patch_norm=True

    def forward(self, x: Tensor) -> Tensor:
        _, _, H, W = x.shape
        assert self.img_size == (H, W), (
            f"Input image size ({H}*{W}) doesn't match model ({self.img_size[0]}*"
            f"{self.img_size[1]})."
        )
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinTransformer(nn.Module):
    """Swin with DCAMA's ``feat_maps``: every block's output of the stages in ``feat_ids``
    (``[B, H*W, C]`` tokens, before the stage's patch merging), set by ``forward_features``."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (3, 6, 12, 24),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        feat_ids: tuple[int, ...] = (1, 2, 3, 4),
    ) -> None:
        super().__init__()
        self.num_layers = len(depths)
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        res = self.patch_embed.patches_resolution
        self.layers = nn.ModuleList(
            BasicLayer(
                dim=int(embed_dim * 2**i),
                input_resolution=(res[0] // 2**i, res[1] // 2**i),
                depth=depths[i],
                num_heads=num_heads[i],
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                downsample=i < self.num_layers - 1,
            )
            for i in range(self.num_layers)
        )
        self.norm = nn.LayerNorm(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.feat_ids = feat_ids
        self.feat_maps: list[Tensor] = []
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        self.feat_maps = []
        for i, layer in enumerate(self.layers):
            feats, x = layer(x)
            if i + 1 in self.feat_ids:
                self.feat_maps += feats
        x = self.norm(x)  # B L C; the final norm is not applied to feat_maps
        x = self.avgpool(x.transpose(1, 2))
        return torch.flatten(x, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


def dcama_swin_base() -> SwinTransformer:
    """The Swin-B of ``DCAMA.__init__`` (``backbone == 'swin'``)."""
    return SwinTransformer(img_size=384, patch_size=4, window_size=12, embed_dim=128,
                           depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))  # fmt: skip


def extract_feats(swin: SwinTransformer, img: Tensor) -> list[Tensor]:
    """``DCAMA.extract_feats`` for the Swin: every block's tokens as a ``[B, C, h, h]`` map."""
    feats = []
    swin.forward_features(img)
    for feat in swin.feat_maps:
        bsz, hw, c = feat.size()
        h = int(hw**0.5)
        feats.append(feat.view(bsz, h, h, c).permute(0, 3, 1, 2).contiguous())
    return feats
