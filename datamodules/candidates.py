"""Candidate responses to score: a file of their embeddings."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lore_pl.core.finite import all_finite
from lore_pl.data.files import read_tensor
from lore_pl.data.preferences import IndexBatchSampler, ShardIndex
from lore_pl.errors import LoreDataError


class _Rows(Dataset):
    def __init__(self, embeddings: torch.Tensor) -> None:
        self.embeddings = embeddings

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def __getitem__(self, index: ShardIndex) -> dict[str, torch.Tensor]:
        rows = torch.arange(len(self))[index.rows]  # IndexBatchSampler yields ShardIndexes only
        return {"embeddings": self.embeddings[rows], "index": rows}


class CandidateFileDataModule(LightningDataModule):
    """Embeddings of candidate responses ``[n, d]`` from ``.safetensors`` (tensor ``key``), ``.npy`` or ``.pt``.

    Args:
        path: the file of candidate embeddings (from the same embedder as the basis).
        key: the tensor's name in a ``.safetensors`` file.
        batch_size: candidates per prediction batch.
    """

    def __init__(self, path: str, key: str = "embeddings", batch_size: int = 4096) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.path, self.key, self.batch_size = Path(path), key, batch_size
        self.embeddings: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.embeddings is not None:
            return
        embeddings = read_tensor(self.path, "candidate embeddings file", key=self.key)
        if embeddings.ndim != 2 or embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
            raise LoreDataError(f"{self.path}: candidate embeddings must be a non-empty [n, d] matrix, "
                                f"got shape {tuple(embeddings.shape)}")
        if not embeddings.is_floating_point():
            raise LoreDataError(f"{self.path}: candidate embeddings must be floating point, got {embeddings.dtype}")
        bad = [] if all_finite(embeddings) else (~torch.isfinite(embeddings)).nonzero()  # the mask only on failure
        if len(bad):
            row, column = (int(i) for i in bad[0])
            raise LoreDataError(f"{self.path}: {len(bad)} non-finite value(s) in the candidate embeddings, the first "
                                f"at candidate {row}, dimension {column} ({float(embeddings[row, column])})")
        self.embeddings = embeddings.float()

    def predict_dataloader(self) -> DataLoader:
        rows = _Rows(self.embeddings)
        return DataLoader(rows, sampler=IndexBatchSampler(len(rows), self.batch_size, False, 0), batch_size=None)
