"""What the tasks share: optimizers, per-step learning-rate schedules, class names, the
writability check of prediction outputs and the check that a checkpoint fits the model."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from backbones.weights import state_mismatches

Optimizer = Literal["sgd", "adamw"]
Schedule = Literal["cosine", "poly"]


def build_optimizer(
    name: Optimizer,
    params: Iterable[Tensor] | Iterable[dict[str, Any]],
    lr: float,
    momentum: float,
    weight_decay: float,
) -> torch.optim.Optimizer:
    """SGD with momentum or AdamW (``momentum`` unused)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def schedule_factor(
    schedule: Schedule, total_steps: int, poly_power: float
) -> Callable[[int], float]:
    """The learning-rate multiplier at each step: cosine to 0 (Loshchilov & Hutter, 2017) or poly
    ``(1 - step / total) ** power`` (DeepLab, PSPNet, PFENet, ASGNet)."""
    total = max(1, total_steps)
    if schedule == "cosine":
        return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    return lambda step: max(0.0, 1 - step / total) ** poly_power


def optimization(
    module: LightningModule,
    params: Iterable[Tensor] | Iterable[dict[str, Any]],
    schedule: Schedule,
) -> dict[str, Any]:
    """``configure_optimizers``'s answer from the module's ``optimizer``, ``lr``, ``momentum``,
    ``weight_decay`` and ``poly_power`` hyper-parameters, the schedule stepped every batch."""
    hp = module.hparams
    optimizer = build_optimizer(hp.optimizer, params, hp.lr, hp.momentum, hp.weight_decay)
    factor = schedule_factor(
        schedule, int(module.trainer.estimated_stepping_batches), hp.poly_power
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def class_names(module: LightningModule, num_classes: int) -> list[str]:
    """The datamodule's class names when the module is attached to one, else the indices."""
    trainer = module._trainer
    names = getattr(getattr(trainer, "datamodule", None), "class_names", None) if trainer else None
    return list(names) if names else [str(i) for i in range(num_classes)]


@contextlib.contextmanager
def writable_output(path: Path, option: str, what: str = "predictions") -> Iterator[None]:
    """Turn an ``OSError`` while preparing ``path`` into an error naming it and the option to
    change, raised before any prediction or test is run."""
    try:
        yield
    except OSError as error:
        raise PermissionError(
            f"cannot write {what} to {str(path)!r} ({error}); pass a writable path as {option}"
        ) from error


def writable_folder(path: Path, option: str, what: str) -> None:
    """Create ``path`` and check a file can be written there, before any work starts."""
    with writable_output(path, option, what):
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.touch()
        probe.unlink()


def check_checkpoint_fits(module: LightningModule, checkpoint: Mapping[str, Any]) -> None:
    """Raise one error naming the file when a checkpoint's weights are not ``module``'s (another
    task's checkpoint, another backbone or class count), before Lightning's strict load fails
    with a multi-line listing that names neither. For ``on_load_checkpoint``."""
    trainer = module._trainer
    path = getattr(trainer, "ckpt_path", None) if trainer is not None else None
    source = f"checkpoint {str(path)!r}" if path else "the checkpoint"
    name = type(module).__name__
    state = checkpoint.get("state_dict")
    if not isinstance(state, Mapping):
        raise ValueError(f"{source} holds no state_dict; expected a Lightning checkpoint of {name}")
    problems = state_mismatches(module.state_dict(), state, module.strict_loading, limit=6)
    if problems:
        raise ValueError(
            f"{source} does not fit {name} ({'; '.join(problems)}); expected a checkpoint of "
            f"{name} with the same model settings (a checkpoint of the other task? its encoder "
            "loads as --model.backbone.init_args.weights)"
        )
