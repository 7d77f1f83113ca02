"""``lightning predict``: every user's reward for every candidate response of a file."""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from lightning import LightningModule
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from lore_pl.data.atomic import write_atomic
from lore_pl.data.basis_file import load_basis


class ScoreWriter(BasePredictionWriter):
    """At the end of prediction, write ``candidate,<user id>,...`` rows: every user's reward of every
    candidate (row order of the candidate file). Written atomically.

    Args:
        output: the CSV file to write.
    """

    def __init__(self, output: str = "scores.csv") -> None:
        super().__init__(write_interval="epoch")
        self.output = Path(output)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        index = torch.cat([batch["index"] for batch in batches]).cpu()
        scores = torch.cat([batch["scores"] for batch in batches]).cpu()[torch.argsort(index)]
        rows = zip(torch.sort(index).values.tolist(), scores.tolist())

        def write_csv(stream) -> None:
            writer = csv.writer(stream)
            writer.writerow(["candidate", *pl_module.user_ids])
            writer.writerows([row, *(f"{value:.6g}" for value in values)] for row, values in rows)

        write_atomic(self.output, write_csv)
        print(f"wrote {scores.shape[0]} candidates x {scores.shape[1]} users: {self.output}", flush=True)


class ScoringModule(LightningModule):
    """Scores candidate embeddings for named users with a learned basis (no training).

    Args:
        basis_path: a ``BasisModule`` or ``FewShotModule`` checkpoint, or an exported ``.safetensors``.
        users: the users to score for (``null``: every user the basis file knows).
        output: the CSV file the scores go to (``candidate,<user id>,...``, written by ``ScoreWriter``).
    """

    def __init__(self, basis_path: str, users: list[str] | None = None, output: str = "scores.csv") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = None
        self.user_ids: list[str] = []

    def setup(self, stage: str) -> None:
        if self.model is not None:
            return
        model = load_basis(self.hparams.basis_path).to_model()
        users = self.hparams.users or model.user_ids
        if not users:
            raise ValueError(f"{self.hparams.basis_path} names no users to score for")
        unknown = [user for user in users if user not in model.user_ids]
        if unknown:
            raise KeyError(f"unknown user(s) {unknown[:5]}: not among the {model.num_users} users of "
                           f"{self.hparams.basis_path}")
        position = {user: row for row, user in enumerate(model.user_ids)}
        rows = torch.tensor([position[user] for user in users])
        self.model, self.user_ids = model, list(users)
        self.register_buffer("heads", model.heads()[:, rows].contiguous())  # [d, users]: V w_u, on the device

    def configure_callbacks(self):
        return [ScoreWriter(self.hparams.output)]

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        embeddings = batch["embeddings"]
        if embeddings.shape[1] != self.heads.shape[0]:
            raise ValueError(
                f"candidate embeddings have d={embeddings.shape[1]}, the basis has d={self.heads.shape[0]}"
            )
        return {"index": batch["index"], "scores": embeddings.float() @ self.heads}
