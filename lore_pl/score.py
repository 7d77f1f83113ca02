"""``lightning predict``: every user's reward for every candidate response of a file."""

from __future__ import annotations

import torch
from lightning import LightningModule
from torch import Tensor

from lore_pl.scoring import PersonalRewardModel


class ScoringModule(LightningModule):
    """Scores candidate embeddings for named users with a learned basis (no training).

    Args:
        basis_path: a ``BasisModule`` or ``FewShotModule`` checkpoint, or an exported ``.safetensors``.
        users: the users to score for (``null``: every user the basis file knows).
    """

    def __init__(self, basis_path: str, users: list[str] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: PersonalRewardModel | None = None

    def setup(self, stage: str) -> None:
        if self.model is not None:
            return
        model = PersonalRewardModel.load(self.hparams.basis_path)
        users = self.hparams.users or model.user_ids
        if not users:
            raise ValueError(f"{self.hparams.basis_path} names no users to score for")
        heads = torch.stack([model.head(user) for user in users], dim=1)  # unknown ids raise KeyError here
        self.model, self.user_ids = model, list(users)
        self.register_buffer("heads", heads)  # [d, users]: V w_u for every user, on the device

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        embeddings = batch["embeddings"]
        if embeddings.shape[1] != self.heads.shape[0]:
            raise ValueError(f"candidate embeddings have d={embeddings.shape[1]}, the basis has d={self.heads.shape[0]}")
        return {"index": batch["index"], "scores": embeddings.float() @ self.heads}
