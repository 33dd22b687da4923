"""DDP scaling of the default training step: episodes/s with 1 and more processes.

Each process count runs in a fresh ``Trainer.fit`` (Lightning's own DDP launcher: gloo on CPU,
nccl on CUDA), so the measured loop is the real one: batch transfer, the task's
``training_step``, backward with the gradient all-reduce, SGD and the poly schedule. Every process
trains on its own batch of 8 (global batch 8 x processes, as ``--trainer.devices N`` does). A
callback stamps the end of every step; each process's rate is measured between the end of the
warm-up and the last step; the process counts alternate over ``--rounds`` and medians are
reported. Data: synthetic episodes held in memory (default; the step alone), or the default
``shapes`` loader. Without ``--threads``, a CPU process gets cores / processes intra-op threads,
as Lightning gives it.

    python -m benchmarks.ddp --processes 1 2
    python -m benchmarks.ddp --device cuda --sync-batchnorm    # 1 and all GPUs
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, Dataset

from benchmarks.common import (
    add_device_arguments,
    default_datamodule,
    default_model,
    describe,
    markdown_table,
    synchronize,
    synthetic_batch,
)


class StepClock(Callback):
    """Wall-clock time at the end of every training step (device synchronised)."""

    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        synchronize(pl_module.device)
        self.ends.append(time.perf_counter())


class RepeatedBatch(Dataset):
    """One pre-collated batch, ``length`` times: the step without any loading."""

    def __init__(self, batch: dict[str, Any], length: int) -> None:
        self.batch, self.length = batch, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.batch


def worker(args: argparse.Namespace) -> None:
    """One ``fit`` with ``args.run_processes`` processes; every rank writes its rate."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.manual_seed(0)
    clock = StepClock()
    processes = args.run_processes
    trainer = Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu",
        devices=processes,
        strategy="ddp" if processes > 1 else "auto",
        sync_batchnorm=args.sync_batchnorm,
        max_steps=args.warmup + args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # the episodic datamodules shard themselves
        callbacks=[clock],
    )
    model = default_model()
    if args.data == "shapes":
        datamodule = default_datamodule(num_workers=args.workers, batch_size=args.batch_size)
        trainer.fit(model, datamodule=datamodule)
    else:
        batch = synthetic_batch(args.batch_size, 1, args.size, torch.device("cpu"))
        loader = DataLoader(RepeatedBatch(batch, args.warmup + args.steps), batch_size=None)
        trainer.fit(model, train_dataloaders=loader)
    seconds = clock.ends[-1] - clock.ends[args.warmup - 1]
    result = {
        "rate": args.batch_size * (len(clock.ends) - args.warmup) / seconds,
        "threads": torch.get_num_threads(),
        "describe": describe(torch.device(args.device), threads=False),
    }
    Path(f"{args.result}.rank{trainer.global_rank}").write_text(json.dumps(result))


def measure(argv: list[str], processes: int, threads: int | None, folder: Path) -> list[dict]:
    """``worker`` in fresh interpreters (Lightning starts ranks 1.. itself); every rank's result.
    ``OMP_NUM_THREADS`` fixes the threads of all ranks before torch starts."""
    result = folder / f"processes{processes}"
    env = os.environ | {"PYTHONWARNINGS": "ignore"}  # Lightning's advice, once per rank
    env |= {"OMP_NUM_THREADS": str(threads)} if threads else {}
    command = [sys.executable, "-m", "benchmarks.ddp", *argv]
    command += ["--run-processes", str(processes), "--result", str(result)]
    subprocess.run(command, check=True, env=env)
    return [
        json.loads(result.with_name(f"{result.name}.rank{r}").read_text()) for r in range(processes)
    ]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--processes",
        type=int,
        nargs="+",
        default=None,
        help="process counts, the first the reference (default: 1 2 on CPU, 1 and all GPUs)",
    )
    parser.add_argument("--data", choices=["synthetic", "shapes"], default="synthetic")
    parser.add_argument("--workers", type=int, default=2, help="loader workers (shapes)")
    parser.add_argument("--size", type=int, default=96, help="synthetic episodes' size")
    parser.add_argument("--batch-size", type=int, default=8, help="per process")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="alternations; medians reported")
    parser.add_argument("--sync-batchnorm", action="store_true")
    parser.add_argument("--run-processes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    if args.run_processes:
        worker(args)
        return
    cuda = args.device.startswith("cuda")
    counts = args.processes or (sorted({1, torch.cuda.device_count()}) if cuda else [1, 2])
    totals: dict[int, list[float]] = {processes: [] for processes in counts}
    threads: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="ddp-bench-") as folder:
        for _ in range(args.rounds):  # the counts alternate, so machine noise hits all alike
            for processes in counts:
                fixed = args.threads or (
                    None if cuda else max(1, (os.cpu_count() or 1) // processes)
                )
                ranks = measure(argv, processes, fixed, Path(folder))
                totals[processes].append(sum(rank["rate"] for rank in ranks))
                threads[processes] = ranks[0]["threads"]
    rows = []
    reference = statistics.median(totals[counts[0]]) / counts[0]
    for processes, values in totals.items():
        total = statistics.median(values)
        rows.append([
            processes, threads[processes], f"{total:.2f}", f"{total / processes:.2f}",
            f"{total / (processes * reference):.0%}", " ".join(f"{v:.1f}" for v in values),
        ])  # fmt: skip
    print(
        f"# default model, {args.data} episodes, batch {args.batch_size} per process, "
        f"{'nccl' if cuda else 'gloo'}, {args.steps} timed steps after {args.warmup}, median of "
        f"{args.rounds} rounds; "
        f"{ranks[0]['describe']}"
    )
    header = ["processes", "threads/process", "episodes/s total", "episodes/s per process",
              "per-process rate vs first row", "totals of the rounds"]  # fmt: skip
    print(markdown_table(header, rows))
    if len(counts) == 1:
        print("only one process count: no scaling measured (one GPU?)")


if __name__ == "__main__":
    main()
