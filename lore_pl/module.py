"""What both phases share: evaluation steps, per-user accuracy metrics and their logging."""

from __future__ import annotations

from lightning import LightningModule
from torch import Tensor, nn

from lore_pl import functional as LF
from lore_pl.metrics import PerUserAccuracy

STAGES = ("train", "val", "test")


class PreferenceModule(LightningModule):
    """Base of ``BasisModule`` and ``FewShotModule``: ``forward(features, users)`` gives pair logits.

    One shared evaluation step for val and test; one ``PerUserAccuracy`` per stage, logged as
    ``<stage>/acc`` and ``<stage>/acc_std`` at each epoch's end.
    """

    population = "seen"  # which users the data module serves this module: "seen" or "unseen"

    def _record_hparams(self, **values) -> None:
        """Record values known only from the data (users, d): saved in checkpoints and logged."""
        self.hparams.update(values)
        # Lightning logs ``hparams_initial`` (a copy taken at save_hyperparameters); keep it in step
        # so the logged hyper-parameters show the real sizes, not the unset defaults.
        self._hparams_initial.update(values)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the user ids live in the data; keep them with the weights so a checkpoint can score by id
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        user_ids = getattr(datamodule, f"{self.population}_user_ids", None)
        if user_ids:
            checkpoint["user_ids"] = list(user_ids)

    def _build_metrics(self, num_users: int) -> None:
        # ModuleDict keys may not shadow nn.Module attributes (``train``), hence the suffix.
        self.metrics = nn.ModuleDict({f"{stage}_acc": PerUserAccuracy(num_users) for stage in STAGES})

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        logits = self(batch["features"], batch["users"])
        self.metrics[f"{stage}_acc"].update(logits, batch["users"])
        nll = LF.preference_loss(logits, batch["users"], self.hparams.num_users, "pair_mean")
        self.log(f"{stage}/nll", nll, batch_size=batch["users"].numel())
        return nll

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return {"logits": self(batch["features"], batch["users"]), "users": batch["users"]}

    def _log_accuracy(self, stage: str) -> None:
        result = self.metrics[f"{stage}_acc"].compute()
        self.log_dict({f"{stage}/acc": result["mean"].float(), f"{stage}/acc_std": result["std"].float()})
        self.metrics[f"{stage}_acc"].reset()

    def on_train_epoch_end(self) -> None:
        self._log_accuracy("train")

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")
