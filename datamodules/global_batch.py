"""Training batches set per optimizer step over all devices (``global_batch_size``), the rule
the few-shot and the semantic datamodules share: each device's batch and the gradient
accumulation follow from it and the number of processes (:func:`datamodules.sampler.step_batches`),
so a recipe trains the same on 1, 2, 4 or 8 devices."""

from __future__ import annotations

from lightning import LightningDataModule

from .sampler import rank_and_world_size, step_batches


class GlobalBatchDataModule(LightningDataModule):
    """A datamodule with ``batch_size`` (at most, per device batch) and ``global_batch_size``
    (per optimizer step over all devices; ``None``: ``batch_size`` per device); subclasses call
    :meth:`set_accumulation` when ``fit`` sets up and draw training batches of
    :meth:`train_batches`."""

    batch_size: int
    global_batch_size: int | None

    def train_batches(self) -> tuple[int, int]:
        """``(items per device batch, batches accumulated per optimizer step)`` in training."""
        if self.global_batch_size is None:
            return self.batch_size, 1
        _, world_size = rank_and_world_size(self.trainer)
        return step_batches(self.global_batch_size, self.batch_size, world_size)

    def set_accumulation(self) -> None:
        """The trainer accumulates the batches that ``global_batch_size`` asks for; an explicit,
        different ``trainer.accumulate_grad_batches`` is an error naming both."""
        if self.trainer is None or self.global_batch_size is None:
            return
        accumulate = self.train_batches()[1]
        if self.trainer.accumulate_grad_batches not in (1, accumulate):
            raise ValueError(
                f"trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches} "
                f"conflicts with data.global_batch_size={self.global_batch_size}, which sets "
                "the accumulation itself: leave trainer.accumulate_grad_batches at 1"
            )
        self.trainer.accumulate_grad_batches = accumulate
