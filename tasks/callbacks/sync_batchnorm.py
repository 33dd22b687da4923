"""BatchNorm synchronised over DDP processes on every device, CPU (gloo) included.

Under DDP each process normalises its own share of the global batch; synchronised BatchNorm
normalises with the statistics of the whole global batch, as one process would. PyTorch's
``nn.SyncBatchNorm`` (and Lightning's ``sync_batchnorm=True``) runs its fused kernels on GPUs only:
it raises for CPU tensors, and DDP refuses it in a CPU module. :class:`AnyDeviceSyncBatchNorm`
keeps PyTorch's layer on accelerators and on the CPU uses :class:`CpuSyncBatchNorm`, which
computes the same statistics with two differentiable all-reduces (their backward all-reduces the
gradients, as ``nn.SyncBatchNorm``'s), so CPU DDP runs train like one process too and the tests
can compare them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.plugins import TorchSyncBatchNorm
from torch import Tensor, nn
from torch.distributed.nn.functional import all_reduce
from torch.nn.modules.batchnorm import _BatchNorm


class CpuSyncBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are those of all processes' batches, for CPU
    tensors (DDP refuses ``nn.SyncBatchNorm`` in CPU modules). Outside distributed training it
    is the BatchNorm it replaced (:func:`to_cpu_sync`)."""

    def __init__(self, *args: Any, reverts_to: type[_BatchNorm] = nn.BatchNorm2d) -> None:
        super().__init__(*args)
        self.reverts_to = reverts_to

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(input)
        self._check_input_dim(input)
        # Statistics in float32 at least, as F.batch_norm's for bfloat16 and float16 inputs.
        dims, dtype = [0, *range(2, input.dim())], torch.promote_types(input.dtype, torch.float32)
        count = torch.tensor([input.numel() / input.shape[1]], dtype=dtype)
        sums = all_reduce(torch.cat([input.sum(dims, dtype=dtype), count]))
        total = sums[-1]
        mean = sums[:-1] / total
        centred = input.to(dtype) - _channels(mean, input.dim())
        var = all_reduce((centred * centred).sum(dims)) / total
        if self.track_running_stats:
            unbiased = var.detach() * total / (total - 1).clamp(min=1)
            self._update_running_stats(mean.detach(), unbiased)
        output = centred * _channels(torch.rsqrt(var + self.eps), input.dim())
        if self.affine:
            output = output * _channels(self.weight, input.dim())
            output = output + _channels(self.bias, input.dim())
        return output.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, unbiased_var: Tensor) -> None:
        """As ``F.batch_norm``: exponential average at ``momentum``, or the cumulative average
        when ``momentum`` is ``None``."""
        self.num_batches_tracked.add_(1)
        factor = self.momentum
        if factor is None:
            factor = 1.0 / self.num_batches_tracked.item()
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased_var, factor)


def _channels(values: Tensor, dims: int) -> Tensor:
    """``[C]`` shaped to broadcast over ``[N, C, ...]``."""
    return values.view(1, -1, *([1] * (dims - 2)))


def swap_norms(
    module: nn.Module, new_class: Callable[[_BatchNorm], type[_BatchNorm] | None]
) -> nn.Module:
    """``module`` with each BatchNorm ``m`` for which ``new_class(m)`` is a class replaced by an
    instance of it sharing ``m``'s parameters, statistics and mode."""
    converted = module
    target = new_class(module) if isinstance(module, _BatchNorm) else None
    if target is not None:
        options = {"reverts_to": type(module)} if target is CpuSyncBatchNorm else {}
        converted = target(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats, **options,
        )  # fmt: skip
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, swap_norms(child, new_class))
    return converted


def to_cpu_sync(module: nn.Module) -> nn.Module:
    """Every BatchNorm of ``module`` synchronised as :class:`CpuSyncBatchNorm`."""
    return swap_norms(
        module,
        lambda m: None if isinstance(m, CpuSyncBatchNorm | nn.SyncBatchNorm) else CpuSyncBatchNorm,
    )


class AnyDeviceSyncBatchNorm(TorchSyncBatchNorm):
    """Lightning's ``LayerSync`` plugin for synchronised BatchNorm on any device:
    ``nn.SyncBatchNorm`` on accelerators, :class:`CpuSyncBatchNorm` on the CPU.
    ``Trainer(plugins=[AnyDeviceSyncBatchNorm()])``; the tasks' CLI adds it for
    ``trainer.sync_batchnorm``. Lightning applies it under DDP strategies for fitting and reverts
    it after."""

    def apply(self, model: nn.Module) -> nn.Module:
        """``model`` is the LightningModule, still on the CPU: its strategy says where it runs."""
        if model.trainer.strategy.root_device.type != "cpu":
            return super().apply(model)
        return to_cpu_sync(model)

    def revert(self, model: nn.Module) -> nn.Module:
        model = swap_norms(
            model, lambda m: m.reverts_to if isinstance(m, CpuSyncBatchNorm) else None
        )
        return super().revert(model)
