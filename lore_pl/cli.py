"""The command line: ``lightning`` / ``lore-pl`` / ``python -m lore_pl`` ``fit|validate|test|predict``, and
``lore-pl export hf`` (a basis as a Hugging Face checkpoint)."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from lore_pl.errors import LoreDataError

#: Lightning's start-up banners and tips, said at INFO; what it says of checkpoints (restored from ...) stays
BANNERS = ("GPU available", "TPU available", "HPU available", "IPU available", "💡 Tip", "`Trainer.fit` stopped",
           "Seed set to", "LOCAL_RANK", "You are using a CUDA device", "Initializing distributed",
           "distributed_backend=", "-----")
#: warnings about Lightning's and jsonargparse's own code, or about settings that are deliberate here
QUIET_WARNINGS = (
    r".*is smaller than the logging interval.*",  # one batch per epoch: full-batch training logs per epoch
    r".*does not have many workers.*",  # batches are built by tensor indexing, not by workers
    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*",  # inside Lightning, with torch >= 2.10
    r".*is deprecated and will be removed in v5.*",  # jsonargparse about arguments Lightning passes
    r".*`configure_optimizers` returned `None`.*",  # K=0 and FewShotModule take no optimizer steps
    r".*No seed found, seed set to.*",  # predict configs set no seed: scoring draws nothing at random
    r".*Couldn't infer the batch indices.*",  # the score writers read each row's index from the predictions
)


#: set by the first process of a ``--ckpt_path last`` fit: [checkpoint, logger version]
RESUME_ENV = "LORE_PL_RESUME"


class _NoBanners(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).lstrip().startswith(BANNERS)


def quiet() -> None:
    """The commands print progress and results, not library banners or deprecation notices."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.pytorch.accelerators.cuda", "lightning.fabric.utilities.seed"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoBanners) for f in logger.filters):
            logger.addFilter(_NoBanners())
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


#: What every job's trainer shares; a config's ``trainer`` fragment says only what differs
#: (``configs/trainer/*.yaml``) and the resolved whole is saved as the run's ``config.yaml``.
TRAINER_DEFAULTS = {
    "accelerator": "auto",
    "devices": 1,
    "log_every_n_steps": 10,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
    "enable_progress_bar": False,  # full-batch runs have one step per epoch: EpochSummary prints lines
    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
               "init_args": {"save_dir": "lightning_logs", "name": "lore", "default_hp_metric": False}},
}


def _init_args(entry) -> dict:
    init_args = getattr(entry, "init_args", None)
    return init_args if init_args is not None else {}


def _versioned_logger(trainer_config):
    """The trainer's first logger that keeps runs in ``save_dir/name/version_N`` (TensorBoard, CSV)."""
    logger = trainer_config.get("logger")
    for entry in logger if isinstance(logger, list) else [logger]:
        if "save_dir" in _init_args(entry) and "name" in _init_args(entry):
            return entry
    return None


def _version_number(directory: Path) -> int:
    match = re.fullmatch(r"version_(\d+)", directory.name)
    return int(match.group(1)) if match else -1


def _run_directory(entry) -> Path | None:
    """The directory of a logger's fixed version; None while the version is left to the logger."""
    args = _init_args(entry)
    version = args.get("version")
    if version is None:
        return None
    name = version if isinstance(version, str) else f"version_{version}"
    return Path(args["save_dir"]) / (args.get("name") or "") / name


def resolve_last_checkpoint(config) -> tuple[Path, object]:
    """Where ``--ckpt_path last`` resumes from: ``last.ckpt`` of a ModelCheckpoint's fixed
    ``dirpath``; else of the logger's fixed version; else of the newest ``version_N`` of the run's
    name that has one (the logger is then pointed at that version, so the run goes on in place).
    Returns (checkpoint, version or None); a clear error names what was looked for."""
    trainer_config = config.get("trainer", {})
    looked = []
    for callback in trainer_config.get("callbacks") or []:
        dirpath = _init_args(callback).get("dirpath")
        if str(getattr(callback, "class_path", "")).endswith("ModelCheckpoint") and dirpath:
            looked.append(Path(dirpath) / "last.ckpt")
            if looked[-1].is_file():
                return looked[-1], None
    logger = _versioned_logger(trainer_config)
    if logger is not None:
        fixed = _run_directory(logger)
        if fixed is not None:
            candidates = [fixed]
        else:
            root = Path(_init_args(logger)["save_dir"]) / (_init_args(logger).get("name") or "")
            candidates = sorted((d for d in root.glob("version_*") if _version_number(d) >= 0),
                                key=_version_number, reverse=True)
            looked.append(root / "version_*" / "checkpoints" / "last.ckpt")
        for directory in candidates:
            if (directory / "checkpoints" / "last.ckpt").is_file():
                version = _init_args(logger).get("version")
                return directory / "checkpoints" / "last.ckpt", version if fixed is not None else _version_number(
                    directory)
        if fixed is not None:
            looked.append(fixed / "checkpoints" / "last.ckpt")
    elif not trainer_config.get("logger"):
        root = Path(trainer_config.get("default_root_dir") or os.getcwd())
        looked.append(root / "checkpoints" / "last.ckpt")
        if looked[-1].is_file():
            return looked[-1], None
    raise LoreDataError(
        "--ckpt_path last: there is no checkpoint to resume from; looked for "
        + (", ".join(str(path) for path in looked) or "a ModelCheckpoint dirpath or a logger's run directory")
        + ". Give the checkpoint's path, or leave --ckpt_path out to start a new run"
    )


def refuse_overwrite(config) -> None:
    """A fixed logger version whose directory already holds a run is not written over silently."""
    logger = _versioned_logger(config.get("trainer", {}))
    directory = None if logger is None else _run_directory(logger)
    if directory is not None and directory.is_dir() and any(directory.iterdir()):
        raise LoreDataError(
            f"{directory} already holds a run (its config, checkpoints, protocol or basis); a new fit would "
            "overwrite them. Resume it with --ckpt_path last, choose another version or run_name, "
            "or pass --overwrite to replace it"
        )


def config_error(error: ValueError) -> LoreDataError:
    """jsonargparse reports a constructor's ValueError inside a union's error dump (and with the whole
    namespace); keep the constructor's own words."""
    message = str(error)
    if "Does not validate against any of the Union subtypes" in message:
        reasons = [line.strip()[2:] for line in message.splitlines() if line.strip().startswith("- ")]
        reasons = [reason for reason in reasons if not reason.startswith("Expected a <class 'NoneType'>")]
        if reasons:
            message = "; ".join(reasons)
    return LoreDataError(message)


class LoreCLI(LightningCLI):
    """``LightningCLI`` that names the run, tells the data module what the model trains on, and
    writes checkpoints atomically (``AtomicCheckpointIO``)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="the run's name: its files go to <logger save_dir>/<run_name>/version_N "
                                 "(sets the logger's name; default: the logger's own)")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="let a fit write into a fixed logger version that already holds a run")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        name, logger = config.get("run_name"), config.get("trainer", {}).get("logger")
        loggers = logger if isinstance(logger, list) else [logger]
        for entry in loggers:
            if name and getattr(entry, "init_args", None) is not None and "name" in entry.init_args:
                entry.init_args.name = name
        if self.subcommand == "predict" and config.get("overwrite") and "overwrite" in _init_args(config.get("model")):
            _init_args(config.model).overwrite = True  # the score CSV's (lore_pl.modules.scoring)
        if self.subcommand != "fit":
            return
        if config.get("ckpt_path") == "last":
            # DDP's other processes rerun this command: they take the first process's answer
            resumed = os.environ.get(RESUME_ENV) if os.environ.get("LOCAL_RANK", "0") != "0" else None
            if resumed:
                checkpoint, version = json.loads(resumed)
            else:
                checkpoint, version = resolve_last_checkpoint(config)
                os.environ[RESUME_ENV] = json.dumps([str(checkpoint), version])
                print(f"resuming from {checkpoint}", file=sys.stderr, flush=True)
            config.ckpt_path = str(checkpoint)
            # resuming in place: the checkpoint directory is not empty by design
            warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
            if version is not None:
                _init_args(_versioned_logger(config["trainer"])).version = version
        elif not config.get("ckpt_path") and not config.get("overwrite") and os.environ.get("LOCAL_RANK", "0") == "0":
            refuse_overwrite(config)  # (the other DDP processes start after the first has written there)

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # A checkpoint to start from is read here first (Lightning reads its hyperparameters next), so
        # that a truncated, empty or hostile file is refused by name; torch's refusal is a page of advice.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and path not in ("last", "best", "hpc", "registry") and Path(path).is_file():
            from lore_pl.data.files import read_checkpoint

            read_checkpoint(path)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as error:
            raise config_error(error) from None

        # the data module is told what to serve before anything runs (prepare_data included)
        request, connect = getattr(self.model, "data_request", None), getattr(self.datamodule, "connect", None)
        if request is not None and callable(connect):
            connect(request)

    def instantiate_trainer(self, **kwargs):
        from lore_pl.modules.checkpoint_io import use_atomic_checkpoints

        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        return trainer


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The LightningCLI over any LightningModule and LightningDataModule named by ``class_path``:
    the preference modules (``lore_pl.BasisModule``, ``lore_pl.FewShotModule``), the embedding job
    (``predict`` with ``lore_pl.EmbeddingModule``) and scoring (``lore_pl.ScoringModule``).

    ``args`` replaces ``sys.argv[1:]`` (tests call the CLI in-process this way).
    """
    quiet()
    return LoreCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=TRAINER_DEFAULTS,
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point (``lightning``, ``lore-pl``, ``python -m lore_pl``); ``lore-pl export ...``
    goes to the export command (``lore_pl.experiments.export_hf``), everything else to the LightningCLI."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["export"]:
        from lore_pl.experiments.export_hf import main as export_main

        export_main(argv[1:])
        return

    try:
        build_cli(args)
    except LoreDataError as error:
        # bad input or settings: the message names the culprit; a traceback would only bury it
        if os.environ.get("LORE_PL_TRACEBACK"):
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
    except SIGTERMException:
        # Lightning stops a fit on SIGTERM with a SystemExit of status 0, which tells a scheduler the
        # job finished; exit as a process killed by SIGTERM would (128 + 15).
        print(
            "stopped by SIGTERM; resume with --ckpt_path last (or the path of last.ckpt)", file=sys.stderr, flush=True
        )
        sys.exit(143)


if __name__ == "__main__":
    main()
