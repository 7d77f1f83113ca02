"""TensorBoard figures of the learned users' weights and of how much each basis column is used."""

from __future__ import annotations

import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from lore_pl.modules.basis import BasisModule


def weight_figures(weights: torch.Tensor):
    """(heatmap of users x columns, per-column histograms, column usage) for simplex weights ``[C, K]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = weights.detach().cpu().float()
    num_users, rank = weights.shape
    order = torch.argsort(weights.argmax(dim=1) * 2 - weights.max(dim=1).values, stable=True)  # group by top column

    heatmap, axis = plt.subplots(figsize=(max(4, rank * 0.6), 5))
    image = axis.imshow(weights[order].numpy(), aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    axis.set(xlabel="basis column k", ylabel=f"user (n={num_users}, grouped by top column)", title="users' weights")
    heatmap.colorbar(image, ax=axis)

    histograms, axes = plt.subplots(1, rank, figsize=(2.2 * rank, 2.4), sharey=True, squeeze=False)
    for k in range(rank):
        axes[0, k].hist(weights[:, k].numpy(), bins=20, range=(0, 1))
        axes[0, k].set_title(f"column {k}")
    histograms.suptitle("distribution of each column's weight over users")

    usage, axis = plt.subplots(figsize=(max(4, rank * 0.6), 3))
    top = torch.bincount(weights.argmax(dim=1), minlength=rank).float() / num_users
    positions = torch.arange(rank).float()
    axis.bar(positions - 0.2, weights.mean(dim=0).numpy(), width=0.4, label="mean weight")
    axis.bar(positions + 0.2, top.numpy(), width=0.4, label="share of users whose top column")
    axis.set(xlabel="basis column k", title="column usage")
    axis.legend()
    return heatmap, histograms, usage


class BasisFigures(Callback):
    """At the end of fit, add the seen users' weight heatmap, per-column histograms and column
    usage to TensorBoard (``basis/weights``, ``basis/weight_histograms``, ``basis/column_usage``)."""

    reads_final_model = True  # RestoreBestCheckpoint must run before this

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or not isinstance(pl_module, BasisModule) or pl_module.rank < 2:
            return
        loggers = [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]
        if not loggers:
            rank_zero_warn("BasisFigures needs a TensorBoardLogger; skipped")
            return
        import matplotlib.pyplot as plt

        _, weights = pl_module.model.kept()
        figures = weight_figures(weights)
        for logger in loggers:
            for tag, figure in zip(("basis/weights", "basis/weight_histograms", "basis/column_usage"), figures):
                logger.experiment.add_figure(tag, figure, global_step=trainer.global_step, close=False)
            logger.experiment.flush()
        for figure in figures:
            plt.close(figure)
