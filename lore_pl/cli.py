"""The command line: ``lightning`` / ``lore-pl`` / ``python -m lore_pl`` ``fit|validate|test|predict``,
``lore-pl export hf`` (a basis as a Hugging Face checkpoint) and ``lore-pl serve`` (the reward server)."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import sys
import unicodedata
import warnings
from argparse import ArgumentError
from contextlib import contextmanager
from pathlib import Path

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

from lore_pl.errors import LoreDataError, LoreDataWarning

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

#: the longest run name: it becomes a directory's name (file systems allow 255 bytes)
MAX_RUN_NAME = 100

#: what a fit writes into its run directory (the logger's ``version_N``), beside ``checkpoints/``; the
#: filenames a config gives ``ProtocolEvaluation`` or ``BasisExport`` count too. ``--overwrite`` removes
#: these and refuses a directory holding anything else.
RUN_FILES = ("config.yaml", "hparams.yaml", "protocol.json", "basis.safetensors", "skipped_rows.jsonl", "metrics.csv",
             "events.out.tfevents.*", ".*.tmp")  # TensorBoard's events; an atomic write cut short (.NAME.XXXX.tmp)
#: what a run writes into its checkpoint directory
CHECKPOINT_FILES = ("*.ckpt", ".*.tmp")
#: what a run that failed before its first epoch leaves behind (and what is removed then)
BOOKKEEPING_FILES = ("config.yaml", "hparams.yaml", "events.out.tfevents.*", ".*.tmp")


class RunFinished(Exception):
    """``--ckpt_path last`` names a run that already ran to its end: there is nothing to resume."""


def check_run_name(name, what: str = "--run_name") -> None:
    """A run name (or a logger's version given as a string) becomes one directory under the logger's
    ``save_dir``: one path component, no more."""
    if name is None:
        return
    problem = None
    if not isinstance(name, str) or not name.strip():
        problem = "is empty"
    elif len(name) > MAX_RUN_NAME or len(name.encode("utf-8", "surrogatepass")) > 255:
        problem = f"is {len(name)} characters long; at most {MAX_RUN_NAME}"
    elif name in (".", ".."):
        problem = "is a directory reference, not a name"
    elif "/" in name or "\\" in name:
        problem = "holds a path separator ('/' or '\\')"
    elif any(unicodedata.category(char) in ("Cc", "Cs") for char in name):
        problem = "holds a control character (NUL, a line break, ...)"
    if problem:
        shown = repr(name) if len(name) <= 60 else repr(name[:60]) + "..."
        raise LoreDataError(f"{what} {shown} {problem}: a run name is one directory name under the logger's "
                            f"save_dir (no '/' or '\\', not '.' or '..', no control characters, at most "
                            f"{MAX_RUN_NAME} characters)")


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
    if not getattr(warnings.formatwarning, "one_line", False):
        warnings.formatwarning = one_line_data_warnings(warnings.formatwarning)


def one_line_data_warnings(library_format):
    """A warning about the user's data or settings is one line, ``warning: ...``, not the library's
    ``file:line: Category: ...`` followed by the source line that raised it."""

    def formatwarning(message, category, filename, lineno, line=None):
        if issubclass(category, LoreDataWarning):
            return f"warning: {message}\n"
        return library_format(message, category, filename, lineno, line)

    formatwarning.one_line = True
    return formatwarning


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


def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _callback_filenames(config) -> tuple[str, ...]:
    """The run-directory files a config's ``ProtocolEvaluation`` / ``BasisExport`` write under names of its own."""
    return tuple(
        _init_args(callback)["filename"] for callback in config.get("trainer", {}).get("callbacks") or []
        if str(getattr(callback, "class_path", "")).endswith(("ProtocolEvaluation", "BasisExport"))
        and _init_args(callback).get("filename")
    )


def fixed_run_places(config) -> tuple[Path | None, Path | None]:
    """(run directory, checkpoint directory) a new fit writes to, where the config fixes them: the
    logger's fixed version (None when the logger starts a new ``version_N``); a ModelCheckpoint's
    ``dirpath``, else the fixed version's ``checkpoints/``, else without a logger ``default_root_dir``'s."""
    trainer_config = config.get("trainer", {})
    logger = _versioned_logger(trainer_config)
    run = None if logger is None else _run_directory(logger)
    for callback in trainer_config.get("callbacks") or []:
        dirpath = _init_args(callback).get("dirpath")
        if str(getattr(callback, "class_path", "")).endswith("ModelCheckpoint") and dirpath:
            return run, Path(dirpath)
    if run is not None:
        return run, run / "checkpoints"
    if logger is None and not trainer_config.get("logger"):
        return None, Path(trainer_config.get("default_root_dir") or os.getcwd()) / "checkpoints"
    return None, None


def earlier_run(config) -> tuple[list[Path], list[Path]]:
    """(files an earlier run wrote, other files) where a new fit of ``config`` would write: the
    logger's fixed version directory (``RUN_FILES``, its ``checkpoints/``) and the checkpoint
    directory (``CHECKPOINT_FILES``; other files in a ``dirpath`` of the user's own are left alone)."""
    run, checkpoints = fixed_run_places(config)
    owned, foreign = [], []
    if run is not None and run.is_dir():
        named = set(_callback_filenames(config))  # names, taken literally: a '*' in one is not a pattern
        for entry in sorted(run.iterdir()):
            if entry != checkpoints:
                ours = _matches(entry.name, RUN_FILES) or entry.name in named
                (owned if entry.is_file() and ours else foreign).append(entry)
    if checkpoints is not None and checkpoints.is_dir():
        own = run is not None and checkpoints.parent == run
        for entry in sorted(checkpoints.iterdir()):
            if entry.is_file() and _matches(entry.name, CHECKPOINT_FILES):
                # in a checkpoint folder that is not the run's own (a dirpath of the user's, ./checkpoints),
                # a checkpoint may be any run's: --overwrite removes none of them
                (owned if own else foreign).append(entry)
            elif own:  # the run's own checkpoints/ holds nothing else
                foreign.append(entry)
    return owned, foreign


def inputs_among(files: list[Path], config) -> list[str]:
    """The ``--config`` files and the settings of ``config``'s model and data that name one of ``files`` (or a
    folder holding one):
    the new run reads them, so the old run's files must stay (e.g. a few-shot fit of the run's own basis)."""
    targets = {path.resolve() for path in files}
    found = [f"--config {value}" for value in config.get("config") or []
             if Path(str(value)).expanduser().resolve() in targets]  # the config file this fit reads
    for part in ("model", "data"):
        for key, value in _init_args(config.get(part)).items():
            if not isinstance(value, str) or not value or "\0" in value:
                continue
            named = Path(value).expanduser().resolve()
            if named in targets or any(named in target.parents for target in targets):
                found.append(f"{part}.init_args.{key}={value}")
    return found


def refuse_overwrite(config, overwrite: bool) -> list[Path]:
    """A fit whose fixed version directory or checkpoint directory already holds a run is refused
    (Lightning would write ``last-v1.ckpt`` beside the old ``last.ckpt``, and ``--ckpt_path last``
    would resume the old run); with ``overwrite``, the old run's files are returned for removal,
    unless the directory holds files no run writes: those are named, and nothing is removed."""
    owned, foreign = earlier_run(config)
    if not owned and not foreign:
        return []
    run, checkpoints = fixed_run_places(config)
    directory = run if run is not None and run.is_dir() else checkpoints
    if not overwrite:
        raise LoreDataError(
            f"{directory} already holds a run (its config, checkpoints, protocol or basis); a new fit would "
            "overwrite them. Resume it with --ckpt_path last, choose another version or run_name, "
            "or pass --overwrite to replace it"
        )
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise LoreDataError(
            f"--overwrite: {directory} holds {foreign[0]}{more}, which --overwrite does not remove (a file no run "
            "writes, or a checkpoint in a folder that is not the run's own); nothing was removed. Move it away, "
            "or choose another version, run_name or checkpoint dirpath"
        )
    read = inputs_among(owned, config)
    if read:
        raise LoreDataError(
            f"--overwrite: this fit reads {read[0]}, a file of the run it would remove from {directory}; nothing "
            "was removed. Choose another version or run_name for the new run"
        )
    return owned


def remove_earlier_run(files: list[Path]) -> None:
    """Remove an earlier run's files (``refuse_overwrite``) and its then empty ``checkpoints/``."""
    for path in files:
        path.unlink(missing_ok=True)
    for directory in {path.parent for path in files}:
        if directory.name == "checkpoints" and directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
    where = sorted({str(path.parent.parent if path.parent.name == "checkpoints" else path.parent) for path in files})
    print(f"--overwrite: removed the earlier run's {len(files)} file(s) from {', '.join(where)}", file=sys.stderr,
          flush=True)


def finished_run(checkpoint: Path, config) -> str | None:
    """Why the run whose last checkpoint is ``checkpoint`` needs no resuming (it ran to its end), or None:
    its end-of-fit files (protocol, basis) were written after that checkpoint, or the checkpoint ends
    the last epoch (or step) the trainer is set to run."""
    from lore_pl.data.files import read_checkpoint

    run = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    for name in ("protocol.json", "basis.safetensors") + _callback_filenames(config):
        path = run / name
        if path.is_file() and path.stat().st_mtime_ns >= checkpoint.stat().st_mtime_ns:
            return f"{name} was written after its last checkpoint"
    state = read_checkpoint(checkpoint)
    progress = state.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).get("current", {})
    epochs = progress.get("processed", int(state.get("epoch", -1)) + 1)
    trainer_config = config.get("trainer", {})
    max_epochs, max_steps = trainer_config.get("max_epochs"), trainer_config.get("max_steps")
    if max_epochs is not None and 0 <= max_epochs <= epochs:
        return f"its last checkpoint ends epoch {epochs} of max_epochs={max_epochs}"
    if max_steps is not None and 0 <= max_steps <= int(state.get("global_step", 0)):
        return f"its last checkpoint ends step {state.get('global_step')} of max_steps={max_steps}"
    return None


def new_run_directory(trainer) -> list[Path]:
    """The directories this run's logger is about to create (its ``version_N``, and the run name's
    folder and ``save_dir`` if they are new too), deepest first: empty when the version exists already
    or there is no versioned logger."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if not trainer.loggers or not isinstance(trainer.loggers[0], (TensorBoardLogger, CSVLogger)):
        return []
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("NODE_RANK", "0") != "0":
        return []  # the first process creates it, and cleans up
    created, directory = [], Path(trainer.loggers[0].log_dir).absolute()
    while not directory.exists():
        created.append(directory)
        directory = directory.parent
    return created


def remove_unused_run_directory(created: list[Path]) -> None:
    """After a run that failed before its first epoch: remove the version directory it created, if it
    holds only what the run wrote on its way in (its config, hparams, an events file, an empty
    ``checkpoints/``); anything else (a list of skipped rows, a checkpoint) keeps it."""
    if not created or not created[0].is_dir():
        return
    directory = created[0]
    entries = list(directory.iterdir())
    for entry in entries:
        empty_checkpoints = entry.name == "checkpoints" and entry.is_dir() and not any(entry.iterdir())
        if not empty_checkpoints and not (entry.is_file() and _matches(entry.name, BOOKKEEPING_FILES)):
            return
    for entry in entries:
        entry.rmdir() if entry.is_dir() else entry.unlink()
    directory.rmdir()
    for parent in created[1:]:
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


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
                            help="replace the run in a fixed logger version (or checkpoint dirpath): its files are "
                                 "removed just before the new run writes; other files there make it refuse")

    def init_parser(self, **kwargs):
        parser = super().init_parser(**kwargs)
        parser.exit_on_error = False  # main prints the error in one line; jsonargparse would print the usage first
        return parser

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._earlier_run: list[Path] = []
        name, logger = config.get("run_name"), config.get("trainer", {}).get("logger")
        check_run_name(name)
        loggers = logger if isinstance(logger, list) else [logger]
        for entry in loggers:
            if name and getattr(entry, "init_args", None) is not None and "name" in entry.init_args:
                entry.init_args.name = name
            version = _init_args(entry).get("version")
            if isinstance(version, str):  # a string version is the directory's name itself
                check_run_name(version, "the logger's version")
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
                finished = finished_run(checkpoint, config)
                if finished:
                    raise RunFinished(f"nothing to resume: the run of {checkpoint} is finished ({finished}); to "
                                      f"train it further, pass --ckpt_path {checkpoint} with a larger max_epochs")
                os.environ[RESUME_ENV] = json.dumps([str(checkpoint), version])
                print(f"resuming from {checkpoint}", file=sys.stderr, flush=True)
            config.ckpt_path = str(checkpoint)
            # resuming in place: the checkpoint directory is not empty by design
            warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty.*")
            if version is not None:
                _init_args(_versioned_logger(config["trainer"])).version = version
        elif not config.get("ckpt_path") and os.environ.get("LOCAL_RANK", "0") == "0":
            # (the other DDP processes start after the first has written there); the old run's files
            # go only once the new run is about to write, so that a bad setting found before loses nothing
            self._earlier_run = refuse_overwrite(config, bool(config.get("overwrite")))

    def _run_subcommand(self, subcommand: str) -> None:
        if getattr(self, "_earlier_run", None):
            remove_earlier_run(self._earlier_run)
        created = new_run_directory(self.trainer)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if self.trainer.current_epoch == 0 and self.trainer.global_step == 0:
                remove_unused_run_directory(created)  # a run that failed on its way in leaves no empty version_N
            raise

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # A checkpoint to start from is read here first (Lightning reads its hyperparameters next), so
        # that a truncated, empty or hostile file is refused by name; torch's refusal is a page of advice.
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and path not in ("last", "best", "hpc", "registry") and "://" not in path:
            if not Path(path).is_file():  # before the data are loaded and the model set up, not after
                raise LoreDataError(f"--ckpt_path {path}: no such checkpoint file")
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


#: what the user can mend: bad input or settings (``LoreDataError``), the command line (jsonargparse's
#: ``ArgumentError``), a file that is missing, a directory, unreadable or unwritable (``OSError``)
USER_ERRORS = (LoreDataError, ArgumentError, OSError)


#: lines of jsonargparse's union report that say nothing about what went wrong
UNION_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
               "Given value:", "Expected a <class 'NoneType'>", "tip:")


def argument_error_message(message: str) -> str:
    """jsonargparse's error in one line: the keys down to the value that failed and why, without the
    union's other alternatives and the given value's repr."""
    keys, reasons = [], []
    for line in message.splitlines():
        text = line.strip().removeprefix("- ").strip()
        key = re.fullmatch(r'Parser key "([^"]+)":?\s*(.*)', text)
        if key:
            keys.append(key.group(1))
            text = key.group(2)  # what is wrong, when it is said on the same line
        if text and not text.startswith(UNION_NOISE):
            reasons.append(text.rstrip(":") if text.startswith("Problem with given class_path") else text)
    reasons = [reason for reason in reasons if not reason.startswith("Problem with given class_path")] or reasons
    return ".".join(keys) + ": " + "; ".join(reasons) if keys else "; ".join(reasons)


def user_error_message(error: BaseException) -> str:
    """The message of a user error, naming the file an ``OSError`` is about."""
    if isinstance(error, ArgumentError):
        return argument_error_message(str(error))
    if isinstance(error, OSError) and error.strerror and (error.filename2 or error.filename):
        return f"{error.filename2 or error.filename}: {error.strerror}"
    return str(error)


@contextmanager
def user_errors_in_one_line():
    """A user error (``USER_ERRORS``) in the block: ``error: <message>`` on stderr and exit 2, for every
    command (``LORE_PL_TRACEBACK=1``: the traceback instead)."""
    try:
        yield
    except USER_ERRORS as error:
        # bad input or settings: the message names the culprit; a traceback would only bury it
        if os.environ.get("LORE_PL_TRACEBACK"):
            raise
        print(f"error: {user_error_message(error)}", file=sys.stderr, flush=True)
        sys.exit(2)


def main(args: list[str] | None = None) -> None:
    """Console entry point (``lightning``, ``lore-pl``, ``python -m lore_pl``); ``lore-pl export ...``
    goes to the export command (``lore_pl.experiments.export_hf``), everything else to the LightningCLI."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["export"]:
        from lore_pl.experiments.export_hf import main as export_main

        with user_errors_in_one_line():
            export_main(argv[1:])
        return
    if argv[:1] == ["serve"]:  # the reward server (lore_pl.serving); it needs no Lightning
        from lore_pl.serving.server import serve

        with user_errors_in_one_line():
            serve(argv[1:])
        return

    try:
        with user_errors_in_one_line():
            build_cli(args)
    except RunFinished as finished:
        print(finished, file=sys.stderr, flush=True)
    except SIGTERMException:
        # Lightning stops a fit on SIGTERM with a SystemExit of status 0, which tells a scheduler the
        # job finished; exit as a process killed by SIGTERM would (128 + 15).
        print(
            "stopped by SIGTERM; resume with --ckpt_path last (or the path of last.ckpt)", file=sys.stderr, flush=True
        )
        sys.exit(143)


if __name__ == "__main__":
    main()
