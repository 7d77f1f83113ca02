"""What both phases share: the model object, evaluation steps, per-user accuracy and checkpoints."""

from __future__ import annotations

import torch
from lightning import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from lore_pl.core import functional as LF
from lore_pl.core.model import LoreModel
from lore_pl.data.preferences import DataRequest
from lore_pl.errors import LoreDataError
from lore_pl.modules.metrics import PerUserAccuracy

STAGES = ("train", "val", "test")
CHECKPOINT_FORMAT = 2


class PreferenceModule(LightningModule):
    """Base of ``BasisModule`` and ``FewShotModule``: ``self.model`` is a ``LoreModel``, and
    ``forward(features, users)`` gives its pair logits.

    The model's sizes (users, d, K) come from the data in ``setup``, or from a checkpoint in
    ``on_load_checkpoint``; ``checkpoint["lore_pl"]`` tags the checkpoint's kind. One shared
    evaluation step for val and test; one ``PerUserAccuracy`` per stage, logged as ``<stage>/acc``
    and ``<stage>/acc_std`` at each epoch's end.
    """

    checkpoint_kind = ""  # "basis" or "fewshot": how a checkpoint says which module wrote it

    def __init__(self) -> None:
        super().__init__()
        self.model: LoreModel | None = None

    @property
    def data_request(self) -> DataRequest:
        """What this module trains on (the CLI and ``setup`` pass it to the data module's ``connect``)."""
        return DataRequest()

    def _connect(self, datamodule) -> None:
        """Tell the data module what to serve, unless it already serves exactly that."""
        connect = getattr(datamodule, "connect", None)
        if connect is not None:
            connect(self.data_request)

    def _install(self, model: LoreModel) -> None:
        self.model = model
        # ModuleDict keys may not shadow nn.Module attributes (``train``), hence the suffix.
        self.metrics = nn.ModuleDict({f"{stage}_acc": PerUserAccuracy(max(model.num_users, 1)) for stage in STAGES})

    @property
    def built(self) -> bool:
        return self.model is not None

    def forward(self, features: Tensor, users: Tensor) -> Tensor:
        """Bradley-Terry logits of the pairs ``features`` for the users ``users``."""
        return self.model(features, users)

    def user_weights(self) -> Tensor:
        """Each user's simplex weights ``[C, K]`` ([1] for K <= 1)."""
        return self.model.user_weights()

    # ------------------------------------------------------------------------------ checkpoints
    def checkpoint_metadata(self) -> dict:
        """Plain values saved as ``checkpoint["lore_pl"]`` beside the kind tag."""
        return {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lore_pl"] = {
            "kind": self.checkpoint_kind,
            "format": CHECKPOINT_FORMAT,
            **self.checkpoint_metadata(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("lore_pl")
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        where = f"checkpoint {path}" if path else "the checkpoint"
        if not isinstance(meta, dict) or meta.get("kind") != self.checkpoint_kind:
            kind = meta.get("kind") if isinstance(meta, dict) else None
            raise LoreDataError(
                f"{where} is not a {type(self).__name__} checkpoint (its kind tag is {kind!r}, "
                f"expected {self.checkpoint_kind!r})"
            )
        prefix = "model."
        state = {key[len(prefix) :]: value for key, value in checkpoint["state_dict"].items() if key.startswith(prefix)}
        saved = LoreModel.from_state_dict(state, train_basis=self._trains_basis(), train_logits=True)
        if self.built:
            # resuming a fit: the module was built from the data; a checkpoint of another shape would
            # fail deep in load_state_dict with a bare "size mismatch": say which file and why
            here, there = self.model, saved
            differ = [
                f"{name}: checkpoint {a}, data/model {b}"
                for name, a, b in (
                    ("feature_dim", there.dim, here.dim),
                    ("rank", there.rank, here.rank),
                    ("num_users", there.num_users, here.num_users),
                )
                if a != b
            ]
            if differ:
                raise LoreDataError(f"{where} does not match this run ({', '.join(differ)})")
            for name, tensor in state.items():  # optional parts the fit computed last (the covariance)
                if name in here._buffers and here._buffers[name] is None:
                    here._buffers[name] = torch.zeros_like(tensor)
            return
        self._install(saved)

    def _trains_basis(self) -> bool:
        return False

    # ------------------------------------------------------------------------------------ steps
    def configure_model(self) -> None:
        # Runs after setup, before the strategy wraps the model: DDP refuses a module with nothing
        # to train (K=0) with an obscure error; say what to do instead.
        trainer = self._trainer
        if (
            trainer is not None
            and trainer.state.fn == TrainerFn.FITTING
            and trainer.world_size > 1
            and not any(p.requires_grad for p in self.parameters())
        ):
            raise ValueError(
                f"{type(self).__name__} with rank K={self.hparams.get('rank')} has nothing to train, and DDP cannot "
                "wrap it: fit it on one device (--trainer.devices=1 --trainer.strategy=auto); its results do not "
                "depend on the number of processes"
            )

    def _loss(self, logits: Tensor, users: Tensor, weighting: LF.LossWeighting, counts: Tensor | None = None) -> Tensor:
        """The NLL of this rank's batch, scaled so that its mean over ranks is the one-process loss.

        A sharded batch carries ``counts``, the per-user counts of the whole step (all ranks); DDP
        averages the ranks' gradients and ``sync_dist`` their logged values, hence ``scale``.
        """
        return LF.preference_loss(logits, users, self.model.num_users, weighting, counts, self._loss_scale(counts))

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
        self.log_dict(
            {f"{stage}/acc": result["mean"].float(), f"{stage}/acc_std": result["std"].float()}, sync_dist=True
        )
        self.metrics[f"{stage}_acc"].reset()

    def on_train_epoch_end(self) -> None:
        if self.metrics["train_acc"].update_called:  # see _logs_step
            self._log_accuracy("train")

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy("val")

    def on_test_epoch_end(self) -> None:
        self._log_accuracy("test")
