"""Faults during ``fit``: SIGKILL mid-epoch, Ctrl-C, and a kill while a checkpoint is written;
each run then resumes with ``--ckpt_path last`` into the same W&B run. Resume and test compare
the data settings with the checkpoint's (:mod:`tasks.callbacks.data_settings`)."""

from __future__ import annotations

import io
import logging
import logging.handlers
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from test_segment import tiny_args
from wandb_records import OfflineRun

from backbones import ResNet
from tasks.callbacks.checkpointing import AtomicCheckpointIO, atomic_file, save_interruptible
from tasks.classify import ImageClassification
from tasks.segment import main as segment_main

TIMEOUT = 300
CHECKPOINTS = """
trainer:
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {save_top_k: 0, save_last: true, every_n_train_steps: 5}
"""


def fit_command(tmp_path: Path, *extra: str) -> list[str]:
    """2 epochs of 10 steps, ``last.ckpt`` every 5 steps."""
    config = tmp_path / "checkpoint_every_5_steps.yaml"
    config.write_text(CHECKPOINTS)
    return [sys.executable, "-m", "tasks.segment", "fit", *tiny_args(tmp_path),
            "--config", str(config), "--data.train_episodes", "40",
            "--trainer.max_epochs", "2", *extra]  # fmt: skip


ENV = os.environ | {"PYTHONUNBUFFERED": "1"}


def start_and_wait_for_last(tmp_path: Path, command: list[str]) -> tuple[subprocess.Popen, Path]:
    """Start ``fit`` and return once its first ``last.ckpt`` exists."""
    log = (tmp_path / "first.log").open("w")
    # its own process group, which a test can signal as a terminal's Ctrl-C does
    first = subprocess.Popen(command, cwd=tmp_path, env=ENV, stdout=log, stderr=log,
                             start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + TIMEOUT
    last = None
    while last is None:
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no mid-epoch checkpoint appeared"
        time.sleep(0.2)
        last = next((tmp_path / "runs").rglob("last.ckpt"), None)
    return first, last


def resume_to_the_end(tmp_path: Path, command: list[str], last: Path) -> None:
    """``--ckpt_path last`` completes the 20 steps in the first run's W&B run."""
    resumed = subprocess.run([*command, "--ckpt_path", "last"], cwd=tmp_path, env=ENV,
                             capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    final = torch.load(last, weights_only=False, map_location="cpu")
    assert final["epoch"] == 1 and final["global_step"] == 20  # 2 epochs of 40 episodes / 4
    runs = sorted((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({run.name.rsplit("-", 1)[1] for run in runs}) == 1
    assert last.parent.parent.name == runs[0].name.rsplit("-", 1)[1]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_finishes_the_same_run(tmp_path: Path) -> None:
    command = fit_command(tmp_path)
    first, last = start_and_wait_for_last(tmp_path, command)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    killed = torch.load(last, weights_only=False, map_location="cpu")
    assert killed["epoch"] == 0 and killed["global_step"] == 5  # mid-epoch: 10 steps per epoch
    resume_to_the_end(tmp_path, command, last)


@pytest.mark.slow
def test_ctrl_c_saves_last_checkpoint_and_closes_the_wandb_run(tmp_path: Path) -> None:
    command = fit_command(tmp_path)
    first, last = start_and_wait_for_last(tmp_path, command)
    time.sleep(1.0)  # a few steps past the periodic checkpoint
    first.send_signal(signal.SIGINT)
    assert first.wait(timeout=60) != 0
    log = (tmp_path / "first.log").read_text()
    interrupted = torch.load(last, weights_only=False, map_location="cpu")
    assert f"Interrupted at global step {interrupted['global_step']}: saved" in log, log[-3000:]
    assert 5 <= interrupted["global_step"] < 20
    (run,) = (tmp_path / "runs" / "wandb").glob("offline-run-*")
    assert OfflineRun(run).exit_code not in (None, 0)  # closed, and marked failed
    resume_to_the_end(tmp_path, command, last)


@pytest.mark.slow
def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path: Path) -> None:
    """The second periodic save dies half-way; ``last.ckpt`` of step 5 stays whole."""
    callback = tmp_path / "kill_on_second_save.py"
    callback.write_text(KILL_ON_SECOND_SAVE)
    command = fit_command(tmp_path)
    path = os.pathsep.join(filter(None, [str(tmp_path), ENV.get("PYTHONPATH")]))
    killed = subprocess.run([*command, "--trainer.callbacks+=kill_on_second_save.KillOnSecondSave"],
                            cwd=tmp_path, env=ENV | {"PYTHONPATH": path},
                            capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    assert torch.load(last, weights_only=False, map_location="cpu")["global_step"] == 5
    assert list(last.parent.glob(".last.ckpt.*.part"))  # the interrupted write, never renamed
    resume_to_the_end(tmp_path, command, last)


KILL_ON_SECOND_SAVE = """
import os, signal
from lightning.pytorch import Callback

class KillWhenPickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)

class KillOnSecondSave(Callback):
    saves = 0

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.saves += 1
        if self.saves == 2:
            checkpoint["kill"] = KillWhenPickled()
"""


class InterruptedBestWrite(AtomicCheckpointIO):
    """Ctrl-C in the middle of the first best checkpoint's write."""

    interrupted = False

    def save_checkpoint(self, checkpoint: dict, path: str | Path, storage_options=None) -> None:
        if Path(path).name.startswith("best") and not InterruptedBestWrite.interrupted:
            InterruptedBestWrite.interrupted = True
            with atomic_file(Path(path)) as file:
                file.write(b"PK half a checkpoint")
                raise KeyboardInterrupt
        super().save_checkpoint(checkpoint, path, storage_options)


def test_ctrl_c_while_the_best_is_written_leaves_no_phantom_best(tmp_path: Path) -> None:
    """The ``last.ckpt`` saved on the interrupt does not name the unwritten best file: the
    resumed run writes its own best, and ``--ckpt_path best`` finds it."""
    data = [*tiny_args(tmp_path), "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "1"]  # fmt: skip
    with pytest.raises((SystemExit, KeyboardInterrupt)):
        segment_main(["fit", *data, "--trainer.max_epochs", "1",
                      "--trainer.plugins", "test_resume.InterruptedBestWrite"])  # fmt: skip
    last = next((tmp_path / "runs").rglob("last.ckpt"))
    assert not list(last.parent.glob("best*.ckpt"))
    states = torch.load(last, weights_only=True, map_location="cpu")["callbacks"]
    assert all(not s.get("best_model_path") for k, s in states.items() if "ModelCheckpoint" in k)
    segment_main(["fit", *data, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    (best,) = last.parent.glob("best*.ckpt")
    cli = segment_main(["test", *tiny_args(tmp_path), *ONE_STEP, "--ckpt_path", "best"])
    assert Path(cli.trainer.ckpt_path).resolve() == best.resolve()


def test_atomic_file_leaves_the_target_untouched_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="disk gone"), atomic_file(target) as file:
        file.write(b"half of the new")
        raise RuntimeError("disk gone")
    assert target.read_bytes() == b"previous" and list(tmp_path.iterdir()) == [target]
    with atomic_file(target) as file:
        file.write(b"new")
    assert target.read_bytes() == b"new" and list(tmp_path.iterdir()) == [target]


class InterruptedFile(io.BytesIO):
    """A file whose third write is interrupted by Ctrl-C."""

    writes = 0

    def write(self, data: bytes) -> int:
        self.writes += 1
        if self.writes == 3:
            raise KeyboardInterrupt
        return super().write(data)


def test_ctrl_c_during_a_checkpoint_write_is_an_interrupt() -> None:
    """torch's zip writer turns an interrupt mid-write into a RuntimeError whose context is the
    KeyboardInterrupt (pinned here); the checkpoint IO raises the interrupt itself."""
    checkpoint = {"weights": torch.zeros(100_000), "bias": torch.ones(1000)}
    with pytest.raises(RuntimeError) as error:
        torch.save(checkpoint, InterruptedFile())
    assert isinstance(error.value.__context__, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        save_interruptible(checkpoint, InterruptedFile())


# --- data settings compared with the checkpoint's -------------------------------------------

ONE_STEP = ("--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
            "--trainer.limit_test_batches", "1", "--trainer.num_sanity_val_steps", "0")  # fmt: skip


@pytest.fixture(scope="module")
def fold0_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A one-step fold-0, 1-shot ``fit`` of the tiny shapes set: its folder and its
    ``last.ckpt``."""
    tmp = tmp_path_factory.mktemp("fold0")
    segment_main(["fit", *tiny_args(tmp), *ONE_STEP])
    return tmp, next((tmp / "runs").rglob("last.ckpt"))


@pytest.mark.parametrize(
    ("subcommand", "changed", "message"),
    [
        ("test", ("--data.fold", "1"), r"trained with fold 0 but this test has fold 1 "
         r"\(--data\.fold\): the model would be scored on classes it may have trained on"),
        ("validate", ("--data.fold", "2"), r"with fold 0 but this validate has fold 2"),
        ("fit", ("--data.shots", "2"), r"trained with shots 1 but this fit has shots 2 "
         r"\(--data\.shots\): resuming would go on training another experiment"),
        ("fit", ("--data.protocol", "hsnet"), r"protocol 'clean' but this fit has protocol "
         r"'hsnet'"),
        ("test", ("pascal",), r"trained with dataset 'datamodules\.pascal\.PascalDataset' but "
         r"this test has dataset 'datamodules\.shapes\.ShapesDataset' \(--data\.dataset \(or "
         r"--data\)\)"),
    ],
    ids=["test-other-fold", "validate-other-fold", "resume-other-shots",
         "resume-other-protocol", "test-other-dataset"],
)  # fmt: skip
def test_a_data_setting_that_leaks_is_refused_before_any_step(
    fold0_checkpoint: tuple[Path, Path], subcommand: str, changed: tuple[str, ...], message: str
) -> None:
    tmp, last = fold0_checkpoint
    if changed == ("pascal",):  # a checkpoint of PASCAL-5i fold 0 given to the shapes set
        checkpoint = torch.load(last, weights_only=True)
        checkpoint["data_settings"]["dataset"] = "datamodules.pascal.PascalFewShot"
        last = tmp / "pascal.ckpt"
        torch.save(checkpoint, last)
        changed = ()
    before = last.stat().st_mtime_ns
    data = tiny_args(tmp)
    with pytest.raises(ValueError) as info:
        segment_main([subcommand, *data, *changed, *ONE_STEP, "--ckpt_path", str(last)])
    text = str(info.value)
    assert re.search(message, text), text
    assert text.startswith(f"--ckpt_path {str(last)!r}") and "--data_mismatch allow" in text
    assert "training_step" not in {frame.name for frame in info.traceback}
    assert last.stat().st_mtime_ns == before  # nothing resumed, nothing written


def test_harmless_differences_and_forced_mismatches_run(
    fold0_checkpoint: tuple[Path, Path],
) -> None:
    """More test episodes, another seed, another batch size: allowed, listed in one line; test
    shots differ from training's (HSNet tests 1-shot models with 5 shots): allowed; another fold
    with ``--data_mismatch allow``: runs."""
    tmp, last = fold0_checkpoint
    common = [*tiny_args(tmp), *ONE_STEP, "--ckpt_path", str(last)]
    records = logging.handlers.BufferingHandler(1000)
    logging.getLogger("lightning.pytorch").addHandler(records)
    try:
        segment_main(["test", *common, "--data.test_episodes", "12", "--data.seed", "5",
                      "--data.shots", "2"])  # fmt: skip
    finally:
        logging.getLogger("lightning.pytorch").removeHandler(records)
    lines = [record.getMessage() for record in records.buffer]
    (line,) = [x for x in lines if "differing from checkpoint" in x]
    assert "shots: 1 -> 2" in line and "test_episodes: 8 -> 12" in line and "seed" in line
    segment_main(["test", *common, "--data.fold", "1", "--data_mismatch", "allow"])


# --- --ckpt_path last -------------------------------------------------------------------------


def test_last_is_the_newest_run_of_this_task(fold0_checkpoint: tuple[Path, Path]) -> None:
    """A classify run written later into the same W&B project folder (the README's
    pretrain-then-few-shot flow) is not picked by ``segment test --ckpt_path last``."""
    tmp, last = fold0_checkpoint
    other = last.parents[2] / "classifyrun" / "checkpoints" / "last.ckpt"
    other.parent.mkdir(parents=True)
    trainer = Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, accelerator="cpu", devices=1)  # fmt: skip
    trainer.strategy.connect(ImageClassification(ResNet("resnet18"), num_classes=3))
    trainer.save_checkpoint(other)
    assert other.stat().st_mtime > last.stat().st_mtime
    cli = segment_main(["test", *tiny_args(tmp), *ONE_STEP, "--ckpt_path", "last"])
    assert cli.trainer.ckpt_path == str(last)


@pytest.mark.parametrize(
    "logger",
    [("--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
      "--trainer.logger.init_args.save_dir", "csv"),
     ("--trainer.logger", "false", "--trainer.callbacks",
      "[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {save_last: true}}]")],
    ids=["csv-logger", "no-logger"],
)  # fmt: skip
def test_last_resumes_with_any_logger(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logger: tuple[str, ...]
) -> None:
    """With a CSVLogger (a new ``version_N`` per run) or no logger, ``--ckpt_path last``
    resumes the previous run's ``last.ckpt`` instead of starting over."""
    monkeypatch.chdir(tmp_path)
    args = [*tiny_args(tmp_path), *ONE_STEP, *logger]
    segment_main(["fit", *args])
    (first,) = tmp_path.rglob("last.ckpt")
    cli = segment_main(["fit", *args, "--trainer.max_steps", "2", "--ckpt_path", "last"])
    assert cli.trainer.ckpt_path == str(first.relative_to(tmp_path))
    assert cli.trainer.global_step == 2


def test_last_with_nothing_to_resume_names_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        segment_main(["fit", *tiny_args(tmp_path), "--ckpt_path", "last"])
    runs = re.escape(str(tmp_path / "runs" / "fewshot-dilated" / "*" / "checkpoints"))
    assert re.fullmatch(
        rf"--ckpt_path last: no last\.ckpt of a FewShotSegmentation run of ShapesDataset fold 0 "
        rf"shots 1 in {runs}/last\*\.ckpt; pass the checkpoint file itself",
        str(info.value),
    ), str(info.value)


ONE_VALIDATED_EPOCH = ("--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                       "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
                       "--trainer.limit_test_batches", "1")  # fmt: skip


def test_last_and_best_are_of_this_experiment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs of fold 0, then fold 1, in one project folder: ``--ckpt_path last`` and ``best``
    with fold 0 pick fold 0's run although fold 1's is newer; ``best`` is the file the run's
    monitoring ModelCheckpoint recorded; a fold without a run is named with the folds found."""
    monkeypatch.chdir(tmp_path)
    segment_main(["fit", *tiny_args(tmp_path), *ONE_VALIDATED_EPOCH])
    (fold0,) = tmp_path.rglob("best-epoch=000.ckpt")
    segment_main(["fit", *tiny_args(tmp_path), *ONE_VALIDATED_EPOCH, "--data.fold", "1"])
    assert len(list(tmp_path.rglob("last.ckpt"))) == 2
    cli = segment_main(["test", *tiny_args(tmp_path), *ONE_VALIDATED_EPOCH, "--ckpt_path", "last"])
    assert Path(cli.trainer.ckpt_path).parent == fold0.parent
    cli = segment_main(["test", *tiny_args(tmp_path), *ONE_VALIDATED_EPOCH, "--ckpt_path", "best"])
    assert Path(cli.trainer.ckpt_path).resolve() == fold0.resolve()
    with pytest.raises(FileNotFoundError) as info:
        segment_main(["test", *tiny_args(tmp_path), "--data.fold", "2", "--ckpt_path", "best"])
    assert re.fullmatch(
        r"--ckpt_path best: no last\.ckpt of a FewShotSegmentation run of ShapesDataset fold 2 in "
        r".*checkpoints/last\*\.ckpt \(2 of other experiments: ShapesDataset fold 0; "
        r"ShapesDataset fold 1\); pass the checkpoint file itself",
        str(info.value),
    ), str(info.value)


def test_best_of_a_run_that_never_validated_is_named(fold0_checkpoint: tuple[Path, Path]) -> None:
    tmp, last = fold0_checkpoint
    with pytest.raises(FileNotFoundError) as info:
        segment_main(["test", *tiny_args(tmp), *ONE_STEP, "--ckpt_path", "best"])
    assert str(info.value) == (
        f"--ckpt_path best: the newest run's {last} records no best checkpoint (no "
        "ModelCheckpoint with a monitor, or no validation yet); pass the checkpoint file "
        "itself, or --ckpt_path last"
    )


def test_flags_the_checkpoint_replaces_are_named(fold0_checkpoint: tuple[Path, Path]) -> None:
    """``test --ckpt_path`` rebuilds the model the checkpoint describes: a ``--model.*`` flag
    with another value is replaced, with a warning naming it; one with the checkpoint's own
    value is not reported."""
    tmp, last = fold0_checkpoint
    with pytest.warns(UserWarning, match="describes its model") as caught:
        segment_main(["test", *tiny_args(tmp), *ONE_STEP, "--ckpt_path", str(last),
                      "--model.head", "tasks.heads.PFENetHead",
                      "--model.backbone.init_args.arch", "resnet34",
                      "--model.backbone.init_args.output_stride", "8"])  # fmt: skip
    (warning,) = [str(w.message) for w in caught if "describes its model" in str(w.message)]
    assert (
        "--model.backbone.init_args.arch (given 'resnet34', the checkpoint's 'resnet18')" in warning
    )
    assert ("--model.head (class_path: given 'tasks.heads.PFENetHead', the checkpoint's "
            "'tasks.heads.PrototypeHead')") in warning  # fmt: skip
    assert "output_stride" not in warning  # the checkpoint's own value
