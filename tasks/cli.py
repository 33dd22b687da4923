"""The LightningCLI shared by the tasks: defaults from ``configs/<task>/default.yaml``, configs
saved with each run (:class:`tasks.callbacks.tracking.SaveConfigToRun`), and the trainer
settings the episodic datamodules rely on."""

from __future__ import annotations

import contextlib
import copy
import inspect
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Literal, NoReturn

import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from datamodules.files import writable_folder
from tasks.callbacks.checkpointing import SaveLastOnInterrupt
from tasks.callbacks.data_settings import (
    DataMismatch,
    RecordDataSettings,
    check_data_settings,
    stored_settings,
)
from tasks.callbacks.sync_batchnorm import AnyDeviceSyncBatchNorm
from tasks.callbacks.tracking import SaveConfigToRun, finish_wandb
from tasks.config_files import command_line_keys, config_file_problem, config_files, flatten
from tasks.errors import (
    condense_union_report,
    input_errors_in_one_line,
    sigterm_exit_code,
    unwrap_union_error,
)
from tasks.runs import (
    NAMED_CHECKPOINTS,
    best_checkpoint,
    configured_data_settings,
    describe_settings,
    imported,
    is_wandb_logger,
    last_checkpoint_places,
    same_experiment,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


#: the model options whose class a config or the command line switches
#: (:meth:`TaskCLI.own_class_defaults`)
SWITCHED_OPTIONS = ("head", "backbone")

#: ``--untrained``: ``validate``/``test``/``predict`` with no trained weights is an error
#: (``error``) or runs (``allow``).
Untrained = Literal["error", "allow"]

#: The subcommands that evaluate a model, for which its weights must come from somewhere.
EVALUATING = ("validate", "test", "predict")


class TaskArgumentParser(LightningArgumentParser):
    """Command-line errors without jsonargparse's union report around the real one."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        super().error(condense_union_report(message), ex)


class TaskCLI(LightningCLI):
    """Links the dataset's class count into the model, adds the task's own callbacks
    (configured under their key, e.g. ``--prediction_writer.output_dir``), resolves
    ``--ckpt_path last`` and ``best`` among this task's runs, names a bad ``--ckpt_path`` file
    and compares the data with the checkpoint's (``--data_mismatch``)."""

    task_callbacks: ClassVar[dict[str, type[Callback]]] = {}
    #: ``configs/<task>/default.yaml``: the defaults and the shipped callbacks
    default_config: ClassVar[Path]
    #: the ``--ckpt_path`` file (memory-mapped), read once by :meth:`parse_arguments` for the
    #: checks made until the classes are built
    _checkpoint: dict[str, Any] | None = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        for key, callback in self.task_callbacks.items():
            parser.add_lightning_class_args(callback, key)
        parser.add_argument(
            "--data_mismatch",
            type=DataMismatch,
            default="error",
            help="With --ckpt_path: a data setting that defines the experiment (dataset, fold, "
            "class split; on fit also shots and protocol) differing from the checkpoint's is an "
            "error; 'allow' runs anyway (tasks.callbacks.data_settings).",
        )
        parser.add_argument(
            "--untrained",
            type=Untrained,
            default="error",
            help="validate, test or predict with neither --ckpt_path nor "
            "--model.official_checkpoint would evaluate untrained weights: an error; 'allow' "
            "runs anyway.",
        )
        parser.add_argument(
            "--shipped_callbacks",
            type=bool,
            default=True,
            help="The task's callbacks (checkpoints, learning-rate monitor, progress bar, "
            "validation images) stay beside the trainer.callbacks a config or the command line "
            "gives, unless one of the same class replaces them; false: exactly the configured "
            "callbacks.",
        )

    def instantiate_trainer(self, **kwargs: object) -> Trainer:
        """``trainer.sync_batchnorm`` (on by default) synchronises BatchNorm on every device
        (:mod:`tasks.callbacks.sync_batchnorm`), not only on GPUs; the default config's
        callbacks that need what ``--trainer.logger false`` or ``--trainer.enable_progress_bar
        false`` turn off are left out (:func:`without_unusable_callbacks`)."""
        settings = self.config_init.get(str(self.subcommand), self.config_init)
        config = settings["trainer"]
        if settings.get("shipped_callbacks", True):
            config["callbacks"] = with_shipped_callbacks(
                config.get("callbacks"), self.default_config
            )
        config["callbacks"] = without_unusable_callbacks(config)
        if config.get("sync_batchnorm"):
            plugins = config.get("plugins") or []
            plugins = plugins if isinstance(plugins, list) else [plugins]
            kwargs["plugins"] = [*plugins, AnyDeviceSyncBatchNorm()]
        return super().instantiate_trainer(**kwargs)

    def instantiate_classes(self) -> None:
        """An error raised while jsonargparse instantiates a ``class_path`` object (the backbone,
        the datamodule) arrives inside its multi-line union report: raise the error itself."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            cause = unwrap_union_error(error)
            if cause is error:
                raise
        else:
            return
        raise cause

    def parse_arguments(self, parser: LightningArgumentParser, args: object) -> None:
        """Refuse a ``--config`` file with a key written twice (YAML keeps the second value
        silently), then check ``--ckpt_path`` before LightningCLI reads its hyper-parameters
        into the config (the checkpoint's model description overrides the config's): an
        unreadable file, or one of another task, is named here rather than failing inside the
        config merge, and each ``--model.*`` flag that merge will replace is warned about. The
        file is read here once (memory-mapped) for every check of this command line."""
        argv = sys.argv[1:] if args is None else args
        self._argv = [str(arg) for arg in argv] if isinstance(argv, list | tuple) else []
        if isinstance(argv, list | tuple):
            for path in config_files([str(arg) for arg in argv]):
                problem = config_file_problem(Path(path))
                if problem:
                    parser.error(problem)
        probe = [arg for arg in self._argv if not arg.startswith("--print_config")]
        if isinstance(args, dict | Namespace):
            super().parse_arguments(parser, args)
        else:  # a first parse finds the chosen classes (printing the config would exit)
            self.config = parser.parse_args(probe)
            if self.own_class_defaults(parser) or len(probe) != len(self._argv):
                super().parse_arguments(parser, args)
        self.resolve_last()
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and Path(path).is_dir():
            parser.error(f"--ckpt_path {path!r} is a folder; expected a checkpoint file in it")
        if not path or not Path(path).is_file():
            return
        if Path(path).suffix.lower() in (".yaml", ".yml"):
            parser.error(
                f"--ckpt_path {path!r} is a YAML file; a config goes to --config, --ckpt_path "
                "takes a checkpoint written by this project's fit"
            )
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            hparams = dict(checkpoint.get("hyper_parameters", {}))
        except Exception as error:
            raise ValueError(
                f"--ckpt_path {path!r} could not be read ({type(error).__name__}: {error}); "
                "expected a checkpoint written by this project's fit"
            ) from error
        if "pytorch-lightning_version" not in checkpoint:
            parser.error(
                f"--ckpt_path {path!r} is not a Lightning checkpoint (a plain state dict?); "
                "expected one written by this project's fit (an encoder's weights load as "
                "--model.backbone.init_args.weights, a released model as "
                "--model.official_checkpoint)"
            )
        options = set(inspect.signature(self.model_class).parameters)
        foreign = sorted(k for k in hparams if not k.startswith("_") and k not in options)
        if foreign:
            parser.error(
                f"--ckpt_path {path!r}: its hyper-parameters {foreign} are not options of "
                f"{self.model_class.__name__}; expected a checkpoint of the same task (another "
                "task's encoder loads as --model.backbone.init_args.weights)"
            )
        for option, described in hparams.items():
            kind = described.get("class_path") if isinstance(described, dict) else None
            if not isinstance(kind, str):
                continue
            try:
                imported(kind)
            except (ImportError, AttributeError, ValueError) as error:
                parser.error(
                    f"--ckpt_path {path!r} describes its {option} as {kind!r}, which does not "
                    f"import here ({error}); expected a checkpoint of classes this installation "
                    "has (a module of your own on PYTHONPATH)"
                )
        self._checkpoint = checkpoint
        self.warn_replaced_model_flags(parser, hparams)

    def own_class_defaults(self, parser: LightningArgumentParser) -> bool:
        """Make a switched head's or encoder's defaults its own: jsonargparse keeps the options
        two classes share when a config or the command line switches ``--model.head`` or
        ``--model.backbone``, so the default's values would silently replace the new class's
        defaults (a head with ``reduce_dim: int = 128`` was built with the prototype head's 256;
        a timm encoder with the default ResNet's ``output_stride: 8``). Each chosen class
        becomes the default and the arguments are parsed again (``True``): only values given
        explicitly carry over."""
        subcommand = self.config.get("subcommand")
        prefix = f"{subcommand}." if subcommand else ""
        parameters = inspect.signature(self.model_class).parameters
        switched = {}
        for option in SWITCHED_OPTIONS:
            chosen = self.config.get(f"{prefix}model.{option}")
            parameter = parameters.get(option)
            if parameter is None or not isinstance(chosen, Namespace) or "class_path" not in chosen:
                continue
            default = parameter.default  # a class, or a lazy instance of one
            default_class = default if isinstance(default, type) else type(default)
            if not issubclass(default_class, imported(chosen["class_path"])):
                switched[f"{prefix}model.{option}"] = {"class_path": chosen["class_path"]}
        if switched:
            parser.set_defaults(switched)
        return bool(switched)

    def warn_replaced_model_flags(
        self, parser: LightningArgumentParser, hparams: dict[str, Any]
    ) -> None:
        """LightningCLI replaces the model options with the ``--ckpt_path`` checkpoint's
        hyper-parameters (its model description) after this parse: warn for each ``--model.*``
        flag of the command line whose value that merge replaces, as it would otherwise be
        dropped without a word. The merge is tried on a copy of the config, as LightningCLI
        makes it (``hyper_parameters`` without ``_instantiator``; ``_class_path`` as the class)."""
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        hparams = {k: v for k, v in hparams.items() if k != "_instantiator"}
        given = command_line_keys(getattr(self, "_argv", []), "model")
        if model is None or not hparams or not given:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        merged = parser.parse_object({subcommand: {"model": hparams}}, copy.deepcopy(self.config))
        before = flatten(model.as_dict())
        after = flatten(merged[subcommand].model.as_dict())
        replaced = []
        for flag in sorted(given):
            keys = [k for k in before if (k == flag or k.startswith(f"{flag}."))]
            changed = [k for k in keys if before[k] != after.get(k)]
            if f"{flag}.class_path" in changed:  # another class: its init_args follow
                changed = [f"{flag}.class_path"]
            shown = [
                f"{k.removeprefix(flag).lstrip('.') + ': ' if k != flag else ''}given "
                f"{before[k]!r}, the checkpoint's {after.get(k)!r}"
                for k in changed
            ]
            if changed:
                replaced.append(f"--model.{flag} ({'; '.join(shown[:3])})")
        if replaced:
            rank_zero_warn(
                f"--ckpt_path {self.config[subcommand].ckpt_path!r} describes its model, which "
                f"replaces {', '.join(replaced)}; drop the flag, or load only the encoder with "
                "--model.backbone.init_args.weights"
            )

    def resolve_last(self) -> None:
        """``--ckpt_path last``: the newest ``last.ckpt`` of a run of *this* task and experiment
        among the logger's runs, with the W&B run it belongs to resumed; ``--ckpt_path best``:
        the best checkpoint that run's ``ModelCheckpoint`` recorded (its monitor, e.g.
        ``val/miou``).

        Lightning looks for ``last`` in the checkpoint folder of the *new* run (with W&B named
        after a fresh run id, with CSV or TensorBoard a new ``version_N``), finds nothing and
        starts over with a warning; ``best`` it knows only within the process that ran ``fit``;
        and the runs of every task and fold share one W&B project folder. Searched
        (:func:`last_checkpoint_places`): each ``ModelCheckpoint``'s own ``dirpath``, else
        ``<save_dir>/<project>/*/checkpoints`` (W&B), ``<save_dir>/<name>/*/checkpoints`` (CSV,
        TensorBoard), ``<default_root_dir>/checkpoints`` (no logger). A run is this task's when
        its hyper-parameters are options of the model class, this experiment's when its stored
        data settings (:mod:`tasks.callbacks.data_settings`: dataset, fold, and on ``fit`` the
        shots) are the configured ones. Nothing found is an error naming those folders.
        """
        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        name = config.get("ckpt_path")
        if name not in NAMED_CHECKPOINTS:
            return
        places = last_checkpoint_places(config.get("trainer", {}))
        found = sorted(
            {path for folder, pattern in places for path in Path(folder).glob(pattern)},
            key=lambda p: p.stat().st_mtime,
            reverse=True,
        )
        runs = {path: self.run_of_this_task(path) for path in found}
        mine = {path: stored_settings(run) for path, run in runs.items() if run is not None}
        wanted = configured_data_settings(config.get("data"), subcommand)
        same = [path for path, settings in mine.items() if same_experiment(settings, wanted)]
        where = ", ".join(str(Path(folder) / pattern) for folder, pattern in places)
        if not same:
            others = [f"{len(found) - len(mine)} of other tasks"] if len(found) > len(mine) else []
            if mine:
                runs = sorted({describe_settings(settings, wanted) for settings in mine.values()})
                others.append(f"{len(mine)} of other experiments: {'; '.join(runs)}")
            experiment = describe_settings(wanted, wanted)
            raise FileNotFoundError(
                f"--ckpt_path {name}: no last.ckpt of a {self.model_class.__name__} run"
                f"{f' of {experiment}' if experiment else ''} in {where}"
                + (f" ({', '.join(others)})" if others else "")
                + "; pass the checkpoint file itself"
            )
        last = same[0]
        config.ckpt_path = str(best_checkpoint(last, runs[last]) if name == "best" else last)
        rank_zero_info(f"--ckpt_path {name}: {config.ckpt_path}")
        logger = config.get("trainer", {}).get("logger")
        if is_wandb_logger(logger) and Path(logger.init_args.save_dir or ".") in last.parents:
            logger.init_args.id = last.parent.parent.name

    def run_of_this_task(self, path: Path) -> dict[str, Any] | None:
        """The checkpoint ``path`` (memory-mapped) if it is readable and its hyper-parameters
        are options of the model class (a run of this task, not of the other tasks sharing the
        project folder), else ``None``."""
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as error:  # a damaged file of an earlier run: named, not picked
            rank_zero_warn(f"skipped {path}: not readable as a checkpoint ({error})")
            return None
        hparams = checkpoint.get("hyper_parameters") or {}
        options = set(inspect.signature(self.model_class).parameters)
        if hparams and all(k.startswith("_") or k in options for k in hparams):
            return checkpoint
        return None

    def refuse_untrained(self) -> None:
        """``validate``, ``test`` and ``predict`` evaluate the weights of ``--ckpt_path`` or of
        a released model (``--model.official_checkpoint``); with neither, a forgotten option
        would score (and write results of) a randomly initialised model. An error before any
        work, unless ``--untrained allow``."""
        if self.subcommand not in EVALUATING:
            return
        config = self.config[self.subcommand]
        model = config.get("model")
        released = model.get("official_checkpoint") if isinstance(model, Namespace) else None
        if config.get("ckpt_path") or released or config.get("untrained") == "allow":
            return
        if "official_checkpoint" in inspect.signature(self.model_class).parameters:
            sources = ("neither --ckpt_path nor --model.official_checkpoint", ", a released model "
                       "as --model.official_checkpoint <file>")  # fmt: skip
        else:
            sources = ("no --ckpt_path", "")
        raise ValueError(
            f"{self.subcommand} with {sources[0]} would evaluate untrained weights; pass "
            f"--ckpt_path <checkpoint> (or last, best){sources[1]}, or --untrained allow to "
            "evaluate them anyway"
        )

    def before_instantiate_classes(self) -> None:
        """No evaluation of untrained weights (:meth:`refuse_untrained`).
        ``--model.official_checkpoint F`` replaces the configured encoder with the one the
        file holds, but jsonargparse builds ``model.backbone`` first: a paper config's ImageNet
        weights (``pretrained/resnet50_v2.pth``, ``IMAGENET1K_V1``, timm's ``pretrained: true``)
        would be read or downloaded, or fail as missing, for an encoder thrown away. They are
        not loaded."""
        self.refuse_untrained()
        config = self.config[self.subcommand] if self.subcommand else self.config
        model = config.get("model")
        if model is None or not model.get("official_checkpoint"):
            return
        backbone = model.get("backbone")
        init_args = getattr(backbone, "init_args", None)
        for option, unset in (("weights", None), ("pretrained", False)):
            if init_args is not None and init_args.get(option):
                rank_zero_info(
                    f"--model.official_checkpoint replaces the configured encoder: its weights "
                    f"({option}={init_args[option]!r}) are not loaded"
                )
                init_args[option] = unset

    def before_fit(self) -> None:
        """The folders ``fit`` writes to (runs, checkpoints) are checked writable before any
        step, not when the first checkpoint is saved an epoch later."""
        trainer = self.trainer
        folders = [(Path(trainer.default_root_dir), "--trainer.default_root_dir")]
        for logger in trainer.loggers:
            if getattr(logger, "save_dir", None):
                folders.append((Path(logger.save_dir), "--trainer.logger.init_args.save_dir"))
        for callback in trainer.checkpoint_callbacks:
            if getattr(callback, "dirpath", None):
                folders.append((Path(callback.dirpath), "the ModelCheckpoint's dirpath"))
        for folder, option in folders:
            writable_folder(folder, option, "runs")

    def after_instantiate_classes(self) -> None:
        """Compare the data with the ``--ckpt_path`` checkpoint's before any step
        (:func:`tasks.callbacks.data_settings.check_data_settings`); ``predict`` runs on any
        images."""
        if self.subcommand not in ("fit", "validate", "test"):
            return
        config = self.config_init[self.subcommand]
        checkpoint, self._checkpoint = self._checkpoint, None
        if checkpoint is None:
            return
        check_data_settings(
            checkpoint,
            self.datamodule,
            self.subcommand,
            str(config.get("ckpt_path")),
            config.get("data_mismatch"),
        )


def with_shipped_callbacks(configured: Any, default_config: Path) -> list[Callback]:
    """The configured callbacks, with the task's shipped ones (``trainer.callbacks`` of its
    default config) of every class the configuration does not name: a config's
    ``trainer.callbacks`` (a mapping or a list, e.g. an ``EarlyStopping``) replaces the default
    list, which would silently drop the checkpoints, so nothing could be resumed or tested. A
    configured callback of a shipped class (a ``ModelCheckpoint`` of one's own) replaces the
    shipped ones of that class."""
    callbacks = (
        list(configured or []) if isinstance(configured, list | tuple | None) else [configured]
    )
    kinds = {type(callback) for callback in callbacks}
    shipped = yaml.safe_load(default_config.read_text())["trainer"]["callbacks"]
    added = []
    for spec in shipped:
        kind = imported(spec["class_path"])
        if kind not in kinds:
            added.append(kind(**(spec.get("init_args") or {})))
    return [*added, *callbacks]


def without_unusable_callbacks(trainer_config: Any) -> list[Callback]:
    """The configured callbacks but a learning-rate monitor without a logger and a progress bar
    with the progress bar off (Lightning refuses both), each left out with a line saying so."""
    callbacks = trainer_config.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    unusable = []
    if trainer_config.get("logger") is False:
        unusable.append((LearningRateMonitor, "--trainer.logger false"))
    if trainer_config.get("enable_progress_bar") is False:
        unusable.append((ProgressBar, "--trainer.enable_progress_bar false"))
    kept = []
    for callback in callbacks:
        reason = next((flag for kind, flag in unusable if isinstance(callback, kind)), None)
        if reason is None:
            kept.append(callback)
        else:
            rank_zero_info(f"{type(callback).__name__} left out: {reason}")
    return kept


def run_cli(
    model_class: type[LightningModule],
    datamodule_class: type[LightningDataModule],
    task: str,
    args: list[str] | None = None,
    callbacks: dict[str, type[Callback]] | None = None,
) -> TaskCLI:
    """Run ``python -m tasks.<task>``; with no subcommand options it trains the default
    experiment of ``configs/<task>/default.yaml``. From the command line (``args`` ``None``)
    a bad input is one line (:func:`input_errors_in_one_line`); called with ``args``, errors
    are raised."""
    default_config = CONFIGS / task / "default.yaml"
    attributes = {"task_callbacks": callbacks or {}, "default_config": default_config}
    cli_class = type(f"{task.title()}CLI", (TaskCLI,), attributes)
    short = contextlib.nullcontext() if args is not None else input_errors_in_one_line()
    with short, finished_wandb_run(), sigterm_exit_code():
        return cli_class(
            model_class,
            datamodule_class,
            subclass_mode_data=True,
            save_config_callback=SaveConfigToRun,
            parser_class=TaskArgumentParser,
            trainer_defaults={
                # Trainable BatchNorm sees the global batch under DDP, as on one device.
                "sync_batchnorm": True,
                "callbacks": [SaveLastOnInterrupt(), RecordDataSettings()],
                # Atomic checkpoint writes, unless the config chooses its own plugins.
                "plugins": [{"class_path": "tasks.callbacks.checkpointing.AtomicCheckpointIO"}],
            },
            parser_kwargs={
                subcommand: {"default_config_files": [str(default_config)]}
                for subcommand in LightningCLI.subcommands()
            },
            args=args,
        )


@contextlib.contextmanager
def finished_wandb_run() -> Iterator[None]:
    """Close the W&B run when the command ends, marked failed on an exception (with the
    process's exit code for a ``SystemExit``: 143 after SIGTERM, 1 after Ctrl-C), with a warning
    rather than an error when W&B's service process is gone
    (:func:`tasks.callbacks.tracking.finish_wandb`).

    Lightning's WandbLogger leaves the run open; a process exit closes it, but a second command in
    the same process (tests, notebooks) would otherwise log into the first one's run.
    """
    try:
        yield
    except BaseException as error:
        code = error.code if isinstance(error, SystemExit) else 1
        finish_wandb(exit_code=code if isinstance(code, int) and code else 1)
        raise
    finish_wandb()
