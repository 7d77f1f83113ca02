"""Checkpoints written atomically: a temporary file in the checkpoint's own directory, then a rename.

Lightning's ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file lies in
the system temp directory; the final ``shutil.move`` is an atomic rename only when that directory is
on the same file system as the checkpoint. Across file systems it copies into the destination, and a
process killed during that copy leaves a truncated ``last.ckpt`` that cannot be resumed from. Here
the temporary file is a sibling of the checkpoint (same file system), flushed to disk, then
``os.replace``d: a reader (or a resumed run) sees the old checkpoint or the new one, never a part.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lore_pl.data.atomic import write_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves are atomic (remote paths: Lightning's own save)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        # flushed to disk before the rename: a reader (or a resumed run) sees the old or the new file
        write_atomic(path, lambda stream: torch.save(checkpoint, stream), binary=True, fsync=True)


def use_atomic_checkpoints(trainer) -> None:
    """Give ``trainer`` atomic local checkpoints unless it was given its own checkpoint plugin."""
    strategy = trainer.strategy
    if getattr(strategy, "_checkpoint_io", None) is None or type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
