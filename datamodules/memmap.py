"""Preference splits larger than memory: features in memory-mapped ``.npy`` files, trained in mini-batches."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from datamodules.base import ROLES, PreferenceData, PreferenceDataModule
from lore_pl.data.atomic import write_json_atomic, write_npy_atomic
from lore_pl.data.files import read_json, read_npy
from lore_pl.data.preferences import PreferenceSplit

USERS_FILE = "users.json"


def write_memmap_dataset(directory: str | os.PathLike, data: PreferenceData) -> Path:
    """Write ``data`` in the layout ``MemmapPreferenceDataModule`` reads: per role
    ``<role>.features.npy`` (float32 ``[N, d]``), ``<role>.users.npy`` (int64 ``[N]``) and, where the
    split has them, ``<role>.prompts.npy`` (int64 ``[N]``), the user tables in ``users.json``, and
    ``reference_head.npy`` when there is one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    users = {}
    for role, split in data.splits.items():
        write_npy_atomic(directory / f"{role}.features.npy", split.features.float().numpy())
        write_npy_atomic(directory / f"{role}.users.npy", split.users.long().numpy())
        if split.prompts is not None:
            write_npy_atomic(directory / f"{role}.prompts.npy", split.prompts.long().numpy())
        users[role] = list(split.user_ids)
    if data.reference_head is not None:
        write_npy_atomic(directory / "reference_head.npy", data.reference_head.float().numpy())
    write_json_atomic(directory / USERS_FILE, users)
    return directory


class MemmapPreferenceDataModule(PreferenceDataModule):
    """Splits whose features stay on disk: ``<role>.features.npy`` files are memory-mapped, so a
    data set larger than RAM trains in mini-batches with bounded memory (the page cache holds what
    the kernel can keep; the process itself holds one batch). Write the layout with
    ``write_memmap_dataset``, or produce it chunk by chunk with ``numpy.lib.format.open_memmap``.

    Args:
        directory: the folder of ``.npy`` files and ``users.json``.
        batch_size: pairs per training batch (a full batch would read the whole file into memory).
        eval_batch_size: pairs per evaluation batch.
        shuffle: reshuffle the training pairs each epoch.
        val_fraction: fraction of the training prompts held out for validation (0: none; needs the
            ``<role>.prompts.npy`` files; the hold-out is copied into memory). Validation roles
            written as files (``seen_val``, ``unseen_val``) are read as they are.
        val_seed: seed of that hold-out.
    """

    def __init__(self, directory: str, batch_size: int | None = 65536, eval_batch_size: int | None = 65536,
                 shuffle: bool = True, val_fraction: float | None = None, val_seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, shuffle=shuffle,
                         val_fraction=val_fraction, val_seed=val_seed)
        self.directory = Path(directory)

    def load(self) -> PreferenceData:
        users_file = self.directory / USERS_FILE
        if not users_file.is_file():
            raise FileNotFoundError(f"{users_file} not found: write the layout with write_memmap_dataset")
        user_tables = read_json(users_file, "memmap user table")
        splits = {}
        for role in ROLES:
            path = self.directory / f"{role}.features.npy"
            if role not in user_tables or not path.is_file():
                continue
            # copy-on-write mapping: a writable array for torch, pages read on demand, file untouched
            features = torch.from_numpy(read_npy(path, "memmap features", mmap_mode="c"))
            if features.dtype != torch.float32 or features.ndim != 2:
                raise ValueError(f"{path}: features must be a float32 [N, d] array, got {features.dtype} "
                                 f"{tuple(features.shape)}")
            users = torch.from_numpy(read_npy(self.directory / f"{role}.users.npy", "memmap user ids"))
            prompts_path = self.directory / f"{role}.prompts.npy"
            prompts = None
            if prompts_path.is_file():
                prompts = torch.from_numpy(read_npy(prompts_path, "memmap prompt ids"))
            # source: evaluation streams the file in blocks instead of reading it through the mapping
            splits[role] = PreferenceSplit(features, users, user_tables[role], name=role, prompts=prompts,
                                           source=path)
        head_path = self.directory / "reference_head.npy"
        head = torch.from_numpy(read_npy(head_path, "reference head")) if head_path.is_file() else None
        return PreferenceData(splits, head)
