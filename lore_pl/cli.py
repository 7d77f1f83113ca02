"""The command line: ``lightning`` / ``lore-pl`` / ``python -m lore_pl`` ``fit|validate|test|predict``, and
``lore-pl export hf`` (a basis as a Hugging Face checkpoint)."""

from __future__ import annotations

import logging
import sys
import warnings

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

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
)


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


class LoreCLI(LightningCLI):
    """``LightningCLI`` that names the run, tells the data module what the model trains on, and
    writes checkpoints atomically (``AtomicCheckpointIO``)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", type=str | None, default=None,
                            help="the run's name: its files go to <logger save_dir>/<run_name>/version_N "
                                 "(sets the logger's name; default: the logger's own)")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        name, logger = config.get("run_name"), config.get("trainer", {}).get("logger")
        loggers = logger if isinstance(logger, list) else [logger]
        for entry in loggers:
            if name and getattr(entry, "init_args", None) is not None and "name" in entry.init_args:
                entry.init_args.name = name

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
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
    except SIGTERMException:
        # Lightning stops a fit on SIGTERM with a SystemExit of status 0, which tells a scheduler the
        # job finished; exit as a process killed by SIGTERM would (128 + 15).
        print(
            "stopped by SIGTERM; resume with --ckpt_path last (or the path of last.ckpt)", file=sys.stderr, flush=True
        )
        sys.exit(143)


if __name__ == "__main__":
    main()
