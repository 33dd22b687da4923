"""Earlier runs on disk, for ``--ckpt_path last`` and ``best``: where their checkpoints lie for a
trainer config, which experiment each belongs to, and the best checkpoint a run recorded."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from tasks.callbacks.data_settings import DEFINING, dataset_path


def last_checkpoint_places(trainer: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(folder, glob pattern)`` pairs where the ``last.ckpt`` of earlier runs lie for a trainer
    config: each ``ModelCheckpoint``'s ``dirpath`` where set, else the logger's runs."""
    places = []
    callbacks = trainer.get("callbacks") or []
    for callback in callbacks if isinstance(callbacks, list) else [callbacks]:
        dirpath = getattr(getattr(callback, "init_args", None), "dirpath", None)
        if dirpath and "ModelCheckpoint" in str(getattr(callback, "class_path", "")):
            places.append((str(dirpath), "last*.ckpt"))
    if places:
        return places
    root = trainer.get("default_root_dir") or "."
    logger = trainer.get("logger")
    logger = logger[0] if isinstance(logger, list) and logger else logger
    if logger is False or logger is None:
        return [(str(Path(root) / "checkpoints"), "last*.ckpt")]
    if logger is True:
        return [(str(Path(root) / "lightning_logs"), "*/checkpoints/last*.ckpt")]
    args = getattr(logger, "init_args", None)
    if is_wandb_logger(logger):
        folder = Path(args.save_dir or args.dir or ".") / (args.project or "lightning_logs")
    else:
        save_dir = getattr(args, "save_dir", None) or getattr(args, "root_dir", None) or root
        # CSV/TensorBoard: <save_dir>/<name>/version_N; name None or "" leaves the level out
        folder = Path(save_dir) / (getattr(args, "name", "lightning_logs") or "")
    return [(str(folder), "*/checkpoints/last*.ckpt")]


#: ``--ckpt_path`` values resolved among the earlier runs (:meth:`TaskCLI.resolve_last`).
NAMED_CHECKPOINTS = ("last", "best")

#: :data:`~tasks.callbacks.data_settings.DEFINING` settings that a ``--data`` config does not
#: hold as a checkpoint stores them (resolved when the datamodule is built: the class split, the
#: protocol preset of ``protocol: null``).
RESOLVED_WHEN_BUILT = ("novel_classes", "protocol")


def configured_data_settings(data: Any, subcommand: str | None) -> dict[str, Any]:
    """The settings a ``last``/``best`` run must share with ``subcommand``: those of
    :data:`~tasks.callbacks.data_settings.DEFINING` that a difference would refuse (dataset and
    fold; on ``fit`` also shots; ``predict`` runs on any images, so none) and that the ``--data``
    config (``class_path`` + ``init_args``, the dataset's class path from its ``dataset`` or the
    named datamodule's) gives; ``{}`` for data without folds (classification)."""
    init_args = getattr(data, "init_args", None)
    if init_args is None or init_args.get("fold") is None:
        return {}
    dataset = init_args.get("dataset")
    kind = dataset_path(str(data.class_path if dataset is None else dataset.class_path))
    settings = {**dict(init_args), "dataset": kind}
    return {
        name: settings[name]
        for name, (_, refused_on) in DEFINING.items()
        if subcommand in refused_on and name in settings and name not in RESOLVED_WHEN_BUILT
    }


def same_experiment(stored: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether the settings both record are equal (a checkpoint written before the settings
    were stored is compared on what it has)."""
    return all(stored[k] == v for k, v in wanted.items() if k in stored)


def describe_settings(settings: dict[str, Any], keys: dict[str, Any]) -> str:
    """``ShapesDataset fold 1 shots 2`` for the ``keys`` that ``settings`` records."""
    words = []
    for key in keys:
        if key in settings:
            value = settings[key]
            words.append(value.rpartition(".")[2] if key == "dataset" else f"{key} {value}")
    return " ".join(words)


def best_checkpoint(last: Path, checkpoint: dict[str, Any]) -> Path:
    """The best checkpoint that ``last`` (loaded as ``checkpoint``) records of its monitoring
    ``ModelCheckpoint`` (the first with a monitor, e.g. ``val/miou``), checked to exist."""
    states = [
        state
        for key, state in (checkpoint.get("callbacks") or {}).items()
        if str(key).startswith("ModelCheckpoint")
        and state.get("monitor")
        and state.get("best_model_path")
    ]
    if not states:
        raise FileNotFoundError(
            f"--ckpt_path best: the newest run's {last} records no best checkpoint (no "
            "ModelCheckpoint with a monitor, or no validation yet); pass the checkpoint file "
            "itself, or --ckpt_path last"
        )
    state = states[0]
    best = Path(state["best_model_path"])
    if not best.is_file():
        raise FileNotFoundError(
            f"--ckpt_path best: {last} records the best checkpoint {str(best)!r}, which does "
            "not exist (moved or deleted?); pass the checkpoint file itself"
        )
    score = state.get("best_model_score")
    monitor = state.get("monitor")
    if score is not None and monitor:
        rank_zero_info(f"--ckpt_path best: {monitor} {float(score):.4f} of run {last.parents[1]}")
    return best


def is_wandb_logger(logger: object) -> bool:
    """Whether a logger's config (``class_path`` + ``init_args``) names a WandbLogger class."""
    class_path = getattr(logger, "class_path", None)
    if not isinstance(class_path, str):
        return False
    return issubclass(imported(class_path), WandbLogger)


def imported(class_path: str) -> Any:
    """The object a config's dotted ``class_path`` names (``datamodules.ShapesFewShot``)."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)
