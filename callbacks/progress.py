"""A one-line progress report every few epochs (full-batch runs have one step per epoch, so a
progress bar redraws a thousand times)."""

from __future__ import annotations

import time

from lightning import Callback, LightningModule, Trainer


class EpochSummary(Callback):
    """Print ``epoch e/E`` and the latest logged metrics every ``every_n_epochs`` epochs.

    Args:
        every_n_epochs: print every this many epochs (and after the last one).
        keys: which logged metrics to print, when present.
    """

    def __init__(
        self, every_n_epochs: int = 100, keys: tuple[str, ...] = ("train/nll", "train/acc", "val/acc")
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.every_n_epochs = every_n_epochs
        self.keys = keys
        self._start = 0.0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if not trainer.is_global_zero or (epoch % self.every_n_epochs and epoch != trainer.max_epochs):
            return
        metrics = trainer.callback_metrics
        shown = "  ".join(f"{key} {float(metrics[key]):.4f}" for key in self.keys if key in metrics)
        elapsed = time.perf_counter() - self._start
        print(f"epoch {epoch}/{trainer.max_epochs}  {shown}  ({elapsed:.1f} s)", flush=True)
