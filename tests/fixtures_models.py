"""Model-side test helpers: normalisation layers worth comparing in eval mode, channels-last
feature dicts."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Random affine parameters of every BatchNorm and GroupNorm, and random BatchNorm
    statistics, so that eval-mode parity with a reference means something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d | nn.GroupNorm):
                n = module.weight.numel()
                module.weight.copy_(0.5 + 0.5 * torch.rand(n, generator=generator))
                module.bias.copy_(0.1 * torch.randn(n, generator=generator))
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(n, generator=generator))


def channels_last_features(
    query: dict[str, Tensor], support: dict[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """The heads' inputs in channels-last memory order: query [B, C, h, w] and support
    [B, K, C, h, w] (channels innermost, same shapes and values)."""
    query_cl = {k: v.contiguous(memory_format=torch.channels_last) for k, v in query.items()}
    support_cl = {
        k: v.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3) for k, v in support.items()
    }
    return query_cl, support_cl
