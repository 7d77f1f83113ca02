"""Candidate responses to score: a file of their embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from lore_pl.data.preferences import IndexBatchSampler, ShardIndex


class _Rows(Dataset):
    def __init__(self, embeddings: torch.Tensor) -> None:
        self.embeddings = embeddings

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def __getitem__(self, index):
        if isinstance(index, ShardIndex):
            index = index.rows  # this rank's candidates
        rows = torch.arange(len(self))[index]
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
        self.path, self.key, self.batch_size = Path(path), key, batch_size
        self.embeddings: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.embeddings is not None:
            return
        if not self.path.is_file():
            raise FileNotFoundError(f"candidate file not found: {self.path}")
        if self.path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(self.path))
            if self.key not in tensors:
                raise ValueError(f"{self.path}: no tensor {self.key!r} (found {sorted(tensors)})")
            embeddings = tensors[self.key]
        elif self.path.suffix == ".npy":
            embeddings = torch.from_numpy(np.load(self.path))
        elif self.path.suffix == ".pt":
            embeddings = torch.load(self.path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(f"{self.path}: candidate embeddings must be .safetensors, .npy or .pt")
        if embeddings.ndim != 2 or not torch.isfinite(embeddings).all():
            raise ValueError(f"{self.path}: candidate embeddings must be a finite [n, d] matrix, "
                             f"got shape {tuple(embeddings.shape)}")
        self.embeddings = embeddings.float()

    def predict_dataloader(self) -> DataLoader:
        rows = _Rows(self.embeddings)
        return DataLoader(rows, sampler=IndexBatchSampler(len(rows), self.batch_size, False, 0), batch_size=None)
