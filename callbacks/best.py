"""Continue with the best checkpoint of a fit instead of its last weights."""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer

from lore_pl.errors import LoreDataError


def restore_best_checkpoint(trainer: Trainer, pl_module: LightningModule) -> str:
    """Load the trainer's best checkpoint (its ``ModelCheckpoint`` monitors a metric) through
    Lightning's ``load_from_checkpoint`` and put its model into ``pl_module``; once per fit.

    Returns the checkpoint's path. The best step is usually not the last, where pruning happens,
    so the restored basis is pruned again.
    """
    checkpoint = trainer.checkpoint_callback
    if checkpoint is None or checkpoint.monitor is None or not checkpoint.best_model_path:
        raise LoreDataError("use_best_checkpoint needs a ModelCheckpoint that monitors a metric and saved a best model")
    path = checkpoint.best_model_path
    if getattr(pl_module, "best_checkpoint_path", None) == path:
        return path
    best = type(pl_module).load_from_checkpoint(path, map_location=pl_module.device, weights_only=True)
    pl_module.model.load_state_dict(best.model.state_dict())
    if hasattr(pl_module, "prune_"):
        pl_module.prune_()
    pl_module.best_checkpoint_path = path
    return path


class RestoreBestCheckpoint(Callback):
    """At the end of fit, replace the module's model by the best checkpoint's, for the callbacks
    after it (``ProtocolEvaluation``, ``BasisExport``, ``BasisFigures``: it must come before them in
    the list). Needs a ``ModelCheckpoint`` with a ``monitor`` (e.g. ``val/acc`` on held-out prompts)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        mine = trainer.callbacks.index(self)
        readers = [c for c in trainer.callbacks[:mine] if hasattr(c, "reads_final_model")]
        if readers:
            raise LoreDataError(f"RestoreBestCheckpoint must come before {type(readers[0]).__name__} in the callbacks "
                             "(they read the final model at the end of fit, in list order)")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.interrupted:
            restore_best_checkpoint(trainer, pl_module)
