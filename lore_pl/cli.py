"""The command line: ``lightning`` / ``lore-pl`` / ``python -m lore_pl`` ``fit|validate|test|predict``."""

from __future__ import annotations

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
    build_cli(args)


if __name__ == "__main__":
    main()
