"""Runs under DDP (2 CPU processes) and records which episodes each rank saw.

Usage: python ddp_episodes.py <pascal root> <cache dir> <output dir>. Started as a subprocess by
``test_datamodules_ddp.py``; Lightning's launcher re-runs it for rank 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from lightning import LightningModule, Trainer, seed_everything

from datamodules import PascalFewShot


class Recorder(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: dict[str, list[str]] = {"train": [], "val": [], "test": []}

    def on_train_epoch_start(self) -> None:
        self.seen["train"] += [repr(e) for e in self.trainer.train_dataloader.sampler]

    def training_step(self, batch: dict, index: int) -> torch.Tensor:
        return self.weight * batch["query_image"].float().mean()

    def _record(self, stage: str, batch: dict) -> None:
        pairs = zip(batch["query_id"], batch["class_id"].tolist(), strict=True)
        self.seen[stage] += [f"{query}/{cls}" for query, cls in pairs]

    def validation_step(self, batch: dict, index: int) -> None:
        self._record("val", batch)

    def test_step(self, batch: dict, index: int) -> None:
        self._record("test", batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main(root: str, cache: str, out: str) -> None:
    seed_everything(5)
    dm = PascalFewShot(
        root=root, cache_dir=cache, image_size=32, batch_size=2, num_workers=0,
        train_episodes=10, val_episodes=7, test_episodes=9, val_fraction=0.2,
    )  # fmt: skip
    model = Recorder()
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm)
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(model.seen))


if __name__ == "__main__":
    main(*sys.argv[1:4])
