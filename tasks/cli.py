"""The LightningCLI shared by the tasks: defaults from ``configs/<task>/default.yaml``, configs
saved with each run (:class:`tasks.tracking.SaveConfigToRun`), and the trainer settings the
episodic datamodules rely on."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins import TorchCheckpointIO

from tasks.checkpointing import AtomicCheckpointIO, SaveLastOnInterrupt
from tasks.tracking import SaveConfigToRun

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class TaskCLI(LightningCLI):
    """Links the dataset's class count into the model, adds the task's own callbacks
    (configured under their key, e.g. ``--prediction_writer.output_dir``) and makes checkpoints
    safe to kill (:mod:`tasks.checkpointing`)."""

    task_callbacks: ClassVar[dict[str, type[Callback]]] = {}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        for key, callback in self.task_callbacks.items():
            parser.add_lightning_class_args(callback, key)

    def instantiate_trainer(self, **kwargs: object) -> Trainer:
        """Atomic checkpoint writes unless the config chose its own checkpoint IO."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_instantiate_classes(self) -> None:
        """``--ckpt_path last`` with W&B: resume the newest run's ``last.ckpt`` and its W&B run.

        Lightning looks for ``last`` in the checkpoint folder of the *new* run, which with W&B is
        named after a fresh run id, so it would find nothing and start over.
        """
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.get("trainer", {}).get("logger")
        if config.get("ckpt_path") != "last" or not is_wandb_logger(logger):
            return
        args = logger.init_args
        runs = Path(args.save_dir or args.dir or ".") / (args.project or "lightning_logs")
        found = sorted(runs.glob("*/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise FileNotFoundError(
                f"--ckpt_path last: no last.ckpt under {runs}/<run id>/checkpoints; "
                "pass the checkpoint file itself"
            )
        config.ckpt_path = str(found[-1])
        args.id = found[-1].parent.parent.name


def run_cli(
    model_class: type[LightningModule],
    datamodule_class: type[LightningDataModule],
    task: str,
    args: list[str] | None = None,
    callbacks: dict[str, type[Callback]] | None = None,
) -> TaskCLI:
    """Run ``python -m tasks.<task>``; with no subcommand options it trains the default
    experiment of ``configs/<task>/default.yaml``."""
    cli_class = type(f"{task.title()}CLI", (TaskCLI,), {"task_callbacks": callbacks or {}})
    with finished_wandb_run():
        return cli_class(
            model_class,
            datamodule_class,
            subclass_mode_data=True,
            save_config_callback=SaveConfigToRun,
            # The datamodules shard episodes themselves; Lightning's sampler would pad them.
            trainer_defaults={
                "use_distributed_sampler": False,
                "callbacks": [SaveLastOnInterrupt()],
            },
            parser_kwargs={
                subcommand: {"default_config_files": [str(CONFIGS / task / "default.yaml")]}
                for subcommand in LightningCLI.subcommands()
            },
            args=args,
        )


def is_wandb_logger(logger: object) -> bool:
    """Whether a logger's config (``class_path`` + ``init_args``) names a WandbLogger class."""
    class_path = getattr(logger, "class_path", None)
    if not isinstance(class_path, str):
        return False
    module, _, name = class_path.rpartition(".")
    return issubclass(getattr(importlib.import_module(module), name), WandbLogger)


@contextlib.contextmanager
def finished_wandb_run() -> Iterator[None]:
    """Close the W&B run when the command ends, marked failed on an exception.

    Lightning's WandbLogger leaves the run open; a process exit closes it, but a second command in
    the same process (tests, notebooks) would otherwise log into the first one's run.
    """
    import wandb

    try:
        yield
    except BaseException:
        if wandb.run is not None:
            wandb.finish(exit_code=1)
        raise
    if wandb.run is not None:
        wandb.finish()
