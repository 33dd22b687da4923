"""Training does not depend on the number of processes: one global batch per optimizer step, one
episode stream sharded over ranks, BatchNorm synchronised, the loss a mean over episodes.

The reference is always one plain process; multi-process runs are real gloo DDP, started as a user
starts them (Lightning's launcher, ``torchrun``, or SLURM's task variables, with two "nodes" on
localhost)."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fixtures_data import write_pascal_tree
from test_ddp import TIMEOUT, csv_logger, ddp, run_task
from test_segment import tiny_args
from torch import nn
from wandb_records import OfflineRun

from datamodules import PascalFewShot
from datamodules.episode import EpisodeDataset
from datamodules.sampler import EpisodeSampler, step_batches
from datamodules.transforms import train_transform
from tasks.callbacks.sync_batchnorm import to_cpu_sync
from tasks.segment import main

POOLS = {c: [f"{c}-{i}" for i in range(6)] for c in range(5)}


def test_step_batches_split_the_global_batch() -> None:
    assert step_batches(8, 8, 1) == (8, 1)
    assert step_batches(8, 4, 1) == (4, 2)
    assert step_batches(8, 4, 2) == (4, 1)
    assert step_batches(8, 3, 1) == (2, 4)  # 3 does not divide 8: the next batch that does
    assert step_batches(8, 1, 8) == (1, 1)
    with pytest.raises(ValueError, match=r"data\.global_batch_size=6 cannot be split over 4 "):
        step_batches(6, 4, 4)


@pytest.mark.parametrize(("world_size", "batch_size"), [(1, 8), (1, 3), (2, 4), (2, 2), (4, 1)])
def test_each_step_trains_on_the_one_process_episodes(world_size: int, batch_size: int) -> None:
    """The union over ranks of optimizer step ``s`` is step ``s`` of one process with the whole
    global batch, augmentation seeds included; the epoch is cut to whole steps."""
    global_batch = 8
    reference = list(EpisodeSampler(POOLS, 30, 1, (7,), train=True, step_episodes=global_batch))
    assert len(reference) == 24 and len({e.seed for e in reference}) == 24
    micro, accumulate = step_batches(global_batch, batch_size, world_size)
    ranks = []
    for rank in range(world_size):
        sampler = EpisodeSampler(POOLS, 30, 1, (7,), rank, world_size, True, micro * accumulate)
        ranks.append(list(sampler))
        assert len(ranks[-1]) == len(sampler) == 24 // world_size
    per_rank = micro * accumulate
    for step in range(3):
        union = [e for r in ranks for e in r[step * per_rank : (step + 1) * per_rank]]
        assert union == reference[step * global_batch : (step + 1) * global_batch]


def test_training_augmentation_follows_the_episode_not_the_process(tmp_path: Path) -> None:
    data = PascalFewShot(root=str(write_pascal_tree(tmp_path / "VOC2012")), image_size=32,
                         cache_dir=str(tmp_path / "cache"), val_fraction=0.2)  # fmt: skip
    data.setup("fit")
    first, second = data.sampler("train").episodes()[:2]
    dataset = EpisodeDataset(data.source("train"), train_transform(32))
    items = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        items.append(dataset[first])
    for key in ("query_image", "query_mask", "support_images", "support_masks"):
        assert torch.equal(items[0][key], items[1][key]), key
    other = dataset[replace(first, seed=second.seed)]
    assert not torch.equal(other["query_image"], items[0]["query_image"])


def _sync_batchnorm_rank(rank: int, init: str, batch: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    norm = to_cpu_sync(nn.Sequential(nn.BatchNorm2d(3, momentum=0.3))).train()
    share = batch[rank * 3 : (rank + 1) * 3].clone().requires_grad_(True)
    output = norm(share)
    (output * torch.arange(output.numel()).view_as(output).sin()).sum().backward()
    torch.save(
        {"output": output.detach(), "grad": share.grad, "state": norm.state_dict(),
         "weight_grad": norm[0].weight.grad, "bias_grad": norm[0].bias.grad},
        f"{out}/rank{rank}.pt",
    )  # fmt: skip
    dist.destroy_process_group()


@pytest.mark.slow
def test_sync_batchnorm_on_cpu_equals_batchnorm_of_the_global_batch(tmp_path: Path) -> None:
    """Two gloo processes with 3 images each: outputs, input gradients, running statistics and
    (summed over ranks, as DDP's mean over ranks of the per-rank losses' sum) parameter gradients
    of a BatchNorm over all 6 images."""
    batch = torch.randn(6, 3, 5, 4) * 3 + 2
    mp.spawn(_sync_batchnorm_rank, (f"file://{tmp_path / 'init'}", batch, str(tmp_path)), 2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    norm = nn.BatchNorm2d(3, momentum=0.3).train()
    whole = batch.clone().requires_grad_(True)
    output = norm(whole)
    weights = torch.cat([torch.arange(output[:3].numel()).view_as(output[:3]).sin()] * 2)
    (output * weights).sum().backward()
    assert torch.allclose(torch.cat([r["output"] for r in ranks]), output, atol=1e-5)
    assert torch.allclose(torch.cat([r["grad"] for r in ranks]), whole.grad, atol=1e-5)
    for key in ("weight", "bias"):
        summed = ranks[0][f"{key}_grad"] + ranks[1][f"{key}_grad"]
        assert torch.allclose(summed, getattr(norm, key).grad, atol=1e-4), key
    for key, value in norm.state_dict().items():
        for rank in ranks:
            assert torch.allclose(rank["state"][f"0.{key}"], value, atol=1e-5), key


def test_accumulated_batches_make_one_step_and_the_schedule_counts_steps(tmp_path: Path) -> None:
    """Global batch 8 in batches of 4 on one process: 16 episodes are 2 optimizer steps, and the
    poly schedule reaches 0 at the second (counting the 4 batches it would be at half)."""
    args = tiny_args(tmp_path, "--data.global_batch_size", "8", "--data.train_episodes", "16",
                     "--trainer.max_epochs", "1", "--trainer.limit_val_batches", "1")  # fmt: skip
    main(["fit", *args])
    checkpoint = torch.load(last_checkpoint(tmp_path / "runs"), weights_only=False)
    assert checkpoint["global_step"] == 2
    assert [g["lr"] for g in checkpoint["optimizer_states"][0]["param_groups"]] == [0.0, 0.0]


def test_explicit_accumulation_that_contradicts_the_global_batch_is_named(tmp_path: Path) -> None:
    args = tiny_args(
        tmp_path, "--data.global_batch_size", "8", "--trainer.accumulate_grad_batches", "3"
    )
    with pytest.raises(
        ValueError, match=r"accumulate_grad_batches=3 conflicts with data\.global_batch_size=8"
    ):
        main(["fit", *args])
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


def free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def step_losses(save_dir: Path) -> dict[int, float]:
    (metrics,) = save_dir.rglob("metrics.csv")
    rows = csv.DictReader(metrics.open())
    return {int(row["step"]): float(row["train/loss"]) for row in rows if row["train/loss"]}


def last_checkpoint(runs: Path) -> Path:
    (checkpoint,) = runs.rglob("last.ckpt")
    return checkpoint


def last_weights(runs: Path) -> dict[str, torch.Tensor]:
    return torch.load(last_checkpoint(runs), weights_only=False)["state_dict"]


def two_nodes(tmp_path: Path, launcher: str, *args: str) -> None:
    """A README multi-node line with two "nodes" of one process each on localhost: ``torchrun``
    (one launcher per node rank), or ``srun`` (not installed here: each node's task gets the
    variables srun sets, ``SLURM_PROCID`` and the others, and runs the command after ``srun``)."""
    port = free_port()
    command = ["-m", "tasks.segment", *args, "--trainer.num_nodes", "2", "--trainer.devices", "1",
               "--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"]  # fmt: skip
    nodes = []
    for node in (0, 1):
        env = os.environ | {"PYTHONUNBUFFERED": "1"}
        if launcher == "torchrun":
            launch = ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                      "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port",
                      port]  # fmt: skip
        else:
            launch = []
            env |= {"SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1",
                    "SLURM_PROCID": str(node), "SLURM_NODEID": str(node), "SLURM_LOCALID": "0",
                    "SLURM_NODELIST": "127.0.0.1", "SLURM_JOB_ID": "15",
                    "SLURM_JOB_NAME": "fewshot", "MASTER_PORT": port}  # fmt: skip
        nodes.append(
            subprocess.Popen([sys.executable, *launch, *command], cwd=tmp_path, env=env,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        )  # fmt: skip
    for process in nodes:
        output, _ = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 0, output[-5000:]


def wandb_training(save_dir: Path) -> tuple[dict[int, float], dict[str, torch.Tensor], Path]:
    """Step losses as the run's only W&B run recorded them, last weights, the W&B run folder."""
    (run,) = save_dir.rglob("offline-run-*")  # one W&B run, written by rank zero
    history = OfflineRun(run).history()
    losses = {r["trainer/global_step"]: r["train/loss"] for r in history if "train/loss" in r}
    return losses, last_weights(save_dir), run


def assert_same_training(
    run: tuple[dict[int, float], dict[str, torch.Tensor]],
    reference: tuple[dict[int, float], dict[str, torch.Tensor]],
    tolerance: float,
    floor: float,
) -> None:
    """The same logged losses (logged in float32: to 5e-5) and the same weights (BatchNorm
    statistics included), each tensor to ``tolerance`` of its largest value plus ``floor``
    (BatchNorm biases start at 0)."""
    (losses, weights), (reference_losses, reference_weights) = run, reference
    assert losses.keys() == reference_losses.keys(), (losses, reference_losses)
    for step, loss in reference_losses.items():
        assert abs(losses[step] - loss) <= 5e-5 * abs(loss), (step, losses, reference_losses)
    assert weights.keys() == reference_weights.keys()
    for key, value in reference_weights.items():
        error = (weights[key].double() - value.double()).abs().max().item()
        assert error <= tolerance * value.double().abs().max().item() + floor, (key, error)


@pytest.mark.slow
def test_one_two_processes_and_two_nodes_train_the_same_weights(tmp_path: Path) -> None:
    """The default experiment (fine-tuned ResNet-18 with BatchNorm, prototype head, dropout off),
    3 optimizer steps of global batch 8: one process with batch 8 and two processes with batch 4
    each log the same losses and end with the same weights, to float32 rounding (measured up to
    5e-5 of a tensor's scale; 0.3 without synchronised BatchNorm). In float64 two one-process
    "nodes", launched by torchrun or as SLURM tasks, agree with one process to 1e-10, so the
    float32 difference is rounding amplified by training. Each multi-node fit is one W&B run;
    testing the torchrun checkpoint on two nodes works too and is a second run."""
    recipe = tiny_args(tmp_path, "--data.global_batch_size", "8", "--data.batch_size", "8",
                       "--data.train_episodes", "24", "--trainer.max_epochs", "1",
                       "--trainer.log_every_n_steps", "1", "--model.head.init_args.dropout", "0",
                       "--model.head.init_args.decoder_dropout", "0")  # fmt: skip
    runs = {}
    for precision, devices in (("32-true", 1), ("32-true", 2), ("64-true", 1)):
        save_dir = tmp_path / f"fit-{precision}-{devices}"
        run_task("segment", tmp_path, "fit", *recipe, *ddp(devices), *csv_logger(save_dir),
                 "--trainer.precision", precision)  # fmt: skip
        runs[precision, devices] = step_losses(save_dir), last_weights(save_dir)
    fit_runs = {}
    for launcher in ("torchrun", "srun"):
        save_dir = tmp_path / f"runs-{launcher}"
        two_nodes(tmp_path, launcher, "fit", *recipe, "--trainer.precision", "64-true",
                  "--trainer.logger.init_args.save_dir", str(save_dir))  # fmt: skip
        losses, weights, fit_runs[launcher] = wandb_training(save_dir)
        runs[launcher] = losses, weights

    reference = runs["32-true", 1]
    assert sorted(reference[0]) == [0, 1, 2] and reference[0][0] != reference[0][2]
    assert_same_training(runs["32-true", 2], reference, 5e-4, 1e-6)
    for launcher in ("torchrun", "srun"):
        assert_same_training(runs[launcher], runs["64-true", 1], 1e-10, 1e-14)

    save_dir = tmp_path / "runs-torchrun"
    checkpoint = next(save_dir.rglob("last.ckpt"))
    two_nodes(tmp_path, "torchrun", "test", *recipe, "--trainer.logger.init_args.save_dir",
              str(save_dir), "--ckpt_path", str(checkpoint))  # fmt: skip
    wandb_runs = sorted(save_dir.rglob("offline-run-*"))
    assert len(wandb_runs) == 2, wandb_runs  # the fit's and the test's
    (test_run,) = [run for run in wandb_runs if run != fit_runs["torchrun"]]
    assert any("test/miou" in row for row in OfflineRun(test_run).history())


@pytest.mark.slow
def test_pixel_mean_loss_is_the_global_batchs_on_any_split(tmp_path: Path) -> None:
    """Under ``loss_reduction: pixels`` (the paper presets'), one process with batch 8, one with
    two accumulated batches of 4 and two processes with 4 each train the same weights (float64,
    to 1e-10), and the two without accumulation log the same losses: the mean over the global
    batch's labelled pixels, not a mean of the devices' means. The episode mean trains other
    weights on the same episodes (their labelled pixel counts differ), so the agreement is not
    that of a reduction that makes no difference here."""
    recipe = tiny_args(tmp_path, "--data.global_batch_size", "8", "--data.train_episodes", "24",
                       "--trainer.max_epochs", "1", "--trainer.log_every_n_steps", "1",
                       "--model.freeze_backbone", "true", "--trainer.precision", "64-true",
                       "--model.head.init_args.dropout", "0",
                       "--model.head.init_args.decoder_dropout", "0")  # fmt: skip
    runs = {}
    splits = [("one", 1, 8, "pixels"), ("accumulated", 1, 4, "pixels"), ("two", 2, 4, "pixels"),
              ("episodes", 1, 8, "episodes")]  # fmt: skip
    for name, devices, batch, reduction in splits:
        save_dir = tmp_path / name
        args = [*recipe, "--data.batch_size", str(batch), "--data.loss_reduction", reduction,
                *csv_logger(save_dir)]  # fmt: skip
        if devices > 1:
            run_task("segment", tmp_path, "fit", *args, *ddp(devices))
        else:
            cli = main(["fit", *args])
            assert cli.trainer.accumulate_grad_batches == 8 // batch
        runs[name] = step_losses(save_dir), last_weights(save_dir)
    assert sorted(runs["one"][0]) == [0, 1, 2]
    assert_same_training(runs["two"], runs["one"], 1e-10, 1e-14)
    weights = runs["one"][1]
    for key, value in runs["accumulated"][1].items():
        error = (value - weights[key]).abs().max().item()
        assert error <= 1e-10 * weights[key].abs().max().item() + 1e-14, (key, error)
    episodes = runs["episodes"][1]
    differences = [(episodes[k] - v).abs().max().item() for k, v in weights.items()
                   if v.is_floating_point()]  # fmt: skip
    assert max(differences) > 1e-6, max(differences)
