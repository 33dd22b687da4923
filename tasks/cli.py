"""The LightningCLI shared by the tasks: defaults from ``configs/<task>/default.yaml``, configs
saved with each run (:class:`tasks.tracking.SaveConfigToRun`), and the trainer settings the
episodic datamodules rely on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from tasks.tracking import SaveConfigToRun

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


class TaskCLI(LightningCLI):
    """Links the dataset's class count into the model and adds the task's own callbacks
    (configured under their key, e.g. ``--prediction_writer.output_dir``)."""

    task_callbacks: ClassVar[dict[str, type[Callback]]] = {}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        for key, callback in self.task_callbacks.items():
            parser.add_lightning_class_args(callback, key)


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
            trainer_defaults={"use_distributed_sampler": False},
            parser_kwargs={
                subcommand: {"default_config_files": [str(CONFIGS / task / "default.yaml")]}
                for subcommand in LightningCLI.subcommands()
            },
            args=args,
        )


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
