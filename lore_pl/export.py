"""A learned basis as a portable file (safetensors), and loading a basis from a file or checkpoint."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from safetensors.torch import load_file, save_file

from lore_pl.atomic import write_atomic_path
from torch import Tensor


@dataclass
class BasisFile:
    """What phase 2 needs from phase 1: V, tau, and optionally V_ref and the seen users' weights."""

    basis: Tensor
    tau: float
    reference_head: Tensor | None = None
    user_ids: list[str] = field(default_factory=list)
    user_weights: Tensor | None = None
    embedder: str = ""  # identity of the embedder whose features the basis was trained on

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]


def save_basis(path: str | os.PathLike, exported: BasisFile) -> Path:
    """Write ``exported`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    tensors = {"basis": exported.basis.detach().float().cpu().contiguous()}
    if exported.reference_head is not None:
        tensors["reference_head"] = exported.reference_head.detach().float().cpu().contiguous()
    if exported.user_weights is not None:
        tensors["user_weights"] = exported.user_weights.detach().float().cpu().contiguous()
    metadata = {
        "format": "lore-pl-basis/1",
        "tau": repr(float(exported.tau)),
        "user_ids": json.dumps(list(exported.user_ids)),
        "embedder": exported.embedder,
    }
    return write_atomic_path(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_basis(path: str | os.PathLike) -> BasisFile:
    """Read a basis from a ``.safetensors`` export or a ``BasisModule`` checkpoint (pruned columns dropped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"basis file not found: {path}")
    if path.suffix == ".ckpt":
        return _basis_from_checkpoint(path)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"{path}: not a readable safetensors basis file ({error})") from error
    if "basis" not in tensors or "tau" not in metadata:
        raise ValueError(f"{path}: a basis file needs the tensor 'basis' and the metadata 'tau'")
    user_ids: Sequence[str] = json.loads(metadata.get("user_ids", "[]"))
    return BasisFile(
        basis=tensors["basis"],
        tau=float(metadata["tau"]),
        reference_head=tensors.get("reference_head"),
        user_ids=list(user_ids),
        user_weights=tensors.get("user_weights"),
        embedder=metadata.get("embedder", ""),
    )


def _basis_from_checkpoint(path: Path) -> BasisFile:
    """A ``BasisModule`` checkpoint (seen users, pruned basis) or a ``FewShotModule`` one (its users)."""
    import torch

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    user_ids = list(checkpoint.get("user_ids", []))
    if "iterations_done" in checkpoint.get("state_dict", {}):
        from lore_pl.basis import BasisModule

        module = BasisModule.load_from_checkpoint(path, map_location="cpu")
        module.prune_()
        basis, weights = module.kept_basis()
        return BasisFile(basis, float(module.hparams.tau), module.reference_head, user_ids, weights,
                         checkpoint.get("embedder", ""))
    from lore_pl.fewshot import FewShotModule

    module = FewShotModule.load_from_checkpoint(path, map_location="cpu")
    if module.hparams.num_users is None:
        raise ValueError(f"{path}: this FewShotModule checkpoint holds no fitted users")
    return BasisFile(module.basis, float(module.hparams.tau), None, user_ids, module.user_weights().detach(),
                     checkpoint.get("embedder", ""))


def check_embedder(basis_embedder: str, data_embedder: str, basis_path: object) -> None:
    """A basis only scores features from the embedder it was trained on: refuse other data's.

    Either identity may be unknown (empty), e.g. an in-memory basis; then nothing is checked.
    """
    if basis_embedder and data_embedder and basis_embedder != data_embedder:
        from lore_pl.errors import LoreDataError

        raise LoreDataError(
            f"the basis {basis_path} was trained on features of {basis_embedder!r}, but the data are "
            f"embedded by {data_embedder!r}: embed the data with the basis's embedder"
        )
