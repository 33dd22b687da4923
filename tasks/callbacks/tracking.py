"""Weights & Biases tracking that needs no account, and config saving that survives re-runs."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info


def wandb_credentials_present() -> bool:
    """True when W&B can go online: ``WANDB_API_KEY`` or a netrc entry from ``wandb login``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class AutoWandbLogger(WandbLogger):
    """Lightning's WandbLogger, offline unless the user is logged in.

    ``offline=None`` (the default) means: online when ``WANDB_API_KEY`` is set or ``wandb login``
    was run, otherwise offline, with one line saying where the run is and how to sync it. An
    explicit ``offline`` or a ``WANDB_MODE`` in the environment always wins.
    """

    def __init__(self, *args: Any, offline: bool | None = None, **kwargs: Any) -> None:
        decide = offline is None and "WANDB_MODE" not in os.environ
        if decide:
            offline = not wandb_credentials_present()
        super().__init__(*args, offline=bool(offline), **kwargs)
        if decide and offline:
            save_dir = Path(self.save_dir or ".").resolve()
            rank_zero_info(
                f"W&B: no account configured, logging offline under {save_dir / 'wandb'}; "
                f"upload later with `wandb sync {save_dir / 'wandb'}/offline-run-*`"
            )


class SaveConfigToRun(SaveConfigCallback):
    """Save the resolved config with the run: as the W&B run's config and as its ``config.yaml``.

    Lightning's default writes ``config.yaml`` into the logger's ``save_dir`` and refuses to
    overwrite it, so with W&B (``save_dir`` shared by all runs) a second run in the same folder
    fails, and the config never reaches W&B: a known LightningCLI + W&B pitfall. Here the file goes
    into the W&B run's own folder as ``cli_config.yaml`` (uploaded with the run; W&B keeps its own
    ``config.yaml`` there), or for other loggers into their versioned ``log_dir``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs = {"config_filename": "cli_config.yaml", **kwargs, "save_to_log_dir": False}
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        folders = []
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update(self.config.as_dict(), allow_val_change=True)
                folders.append(Path(logger.experiment.dir))
            elif logger.log_dir is not None:
                folders.append(Path(logger.log_dir))
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / self.config_filename).write_text(self.parser.dump(self.config))
