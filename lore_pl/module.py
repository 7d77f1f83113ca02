"""What both phases share: evaluation steps, per-user accuracy metrics and their logging."""

from __future__ import annotations

from lightning import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from lore_pl import functional as LF
from lore_pl.metrics import PerUserAccuracy
from lore_pl.preferences import PreferenceSplit

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
        embedder = getattr(datamodule, "embedder", "")
        if isinstance(embedder, str) and embedder:
            checkpoint["embedder"] = embedder  # checked when the basis is used on other data

    def _build_metrics(self, num_users: int) -> None:
        # ModuleDict keys may not shadow nn.Module attributes (``train``), hence the suffix.
        self.metrics = nn.ModuleDict({f"{stage}_acc": PerUserAccuracy(num_users) for stage in STAGES})

    def configure_model(self) -> None:
        # Runs after setup, before the strategy wraps the model: DDP refuses a module with nothing
        # to train (K=0, few-shot K<=1) with an obscure error; say what to do instead.
        trainer = self._trainer
        if (trainer is not None and trainer.state.fn == TrainerFn.FITTING and trainer.world_size > 1
                and not any(p.requires_grad for p in self.parameters())):
            raise ValueError(
                f"{type(self).__name__} with rank K={self.hparams.get('rank')} has nothing to train, and DDP cannot wrap "
                "it: fit it on one device (--trainer.devices=1 --trainer.strategy=auto); its results do not depend "
                "on the number of processes"
            )

    def training_pairs(self, split: PreferenceSplit) -> Tensor | None:
        """Rows of the training split to train on (``None``: all). The data module calls this on
        every rank with the whole split, before sharding it."""
        return None

    def _loss(self, logits: Tensor, users: Tensor, weighting: LF.LossWeighting, counts: Tensor | None = None) -> Tensor:
        """The NLL of this rank's batch, scaled so that its mean over ranks is the one-process loss.

        A sharded batch carries ``counts``, the per-user counts of the whole step (all ranks); DDP
        averages the ranks' gradients and ``sync_dist`` their logged values, hence ``scale``.
        """
        return LF.preference_loss(logits, users, self.hparams.num_users, weighting, counts, self._loss_scale(counts))

    def _loss_scale(self, counts: Tensor | None) -> float:
        """The world size for a sharded batch (it carries ``counts``), else 1: see ``_loss``."""
        return 1.0 if counts is None or self._trainer is None else float(self.trainer.world_size)

    def _logs_step(self, iteration: int, total: int) -> bool:
        """Whether training iteration ``iteration`` (0-based) of ``total`` logs its metrics.

        Every ``trainer.log_every_n_steps`` iterations, and the last (for ``callback_metrics``):
        Lightning's logger writes step metrics only at that interval anyway, and each ``self.log``
        costs 0.5-2 ms, more than a whole full-batch step on small data.
        """
        return (iteration + 1) % max(int(self.trainer.log_every_n_steps), 1) == 0 or iteration + 1 >= total

    def _train_accuracy_counts(self, logged: bool) -> bool:
        """Whether this batch counts in the train accuracy: every batch of a several-batch epoch; a
        one-batch epoch only when it logs (``on_train_epoch_end`` skips epochs with no update)."""
        return logged or self.trainer.num_training_batches != 1

    def _eval_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        logits = self(batch["features"], batch["users"])
        self.metrics[f"{stage}_acc"].update(logits, batch["users"])
        nll = self._loss(logits, batch["users"], "pair_mean", batch.get("counts"))
        # The epoch value is the batch_size-weighted mean of the steps, then the mean over ranks:
        # weighting by the whole step's size makes it the pair mean over the split.
        step_size = int(batch["counts"].sum()) if "counts" in batch else batch["users"].numel()
        self.log(f"{stage}/nll", nll, batch_size=step_size, sync_dist=True)
        return nll

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        return {"logits": self(batch["features"], batch["users"]), "users": batch["users"]}

    def _log_accuracy(self, stage: str) -> None:
        result = self.metrics[f"{stage}_acc"].compute()  # sums the per-user states over ranks
        # identical on every rank: sync_dist averages equal values (and silences Lightning's warning)
        self.log_dict({f"{stage}/acc": result["mean"].float(), f"{stage}/acc_std": result["std"].float()},
                      sync_dist=True)
        self.metrics[f"{stage}_acc"].reset()

    def on_train_epoch_end(self) -> None:
        if self.metrics["train_acc"].update_called:  # see _logs_step
            self._log_accuracy("train")

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")
