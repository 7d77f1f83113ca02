"""The command line: ``lightning`` / ``lore-pl`` / ``python -m lore_pl`` ``fit|validate|test|predict``."""

from __future__ import annotations

import sys

from lightning import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


class LoreCLI(LightningCLI):
    """``LightningCLI`` whose Trainer writes its checkpoints atomically (``AtomicCheckpointIO``)."""

    def instantiate_trainer(self, **kwargs):
        from lore_pl.checkpoint_io import use_atomic_checkpoints

        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        return trainer


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The LightningCLI over any LightningModule and LightningDataModule named by ``class_path``:
    the preference modules (``lore_pl.BasisModule``, ``lore_pl.FewShotModule``), the embedding job
    (``predict`` with ``lore_pl.EmbeddingModule``) and scoring (``lore_pl.score.ScoringModule``).

    ``args`` replaces ``sys.argv[1:]`` (tests call the CLI in-process this way).
    """
    return LoreCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Console entry point (``lightning``, ``lore-pl``, ``python -m lore_pl``)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        build_cli(args)
    except SIGTERMException:
        # Lightning stops a fit on SIGTERM with a SystemExit of status 0, which tells a scheduler the
        # job finished; exit as a process killed by SIGTERM would (128 + 15).
        print("stopped by SIGTERM; resume with --ckpt_path last (or the path of last.ckpt)", file=sys.stderr, flush=True)
        sys.exit(143)


if __name__ == "__main__":
    main()
