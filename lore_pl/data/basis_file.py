"""A learned basis as a portable file (safetensors), and reading a basis from a file or a checkpoint.

Reading never runs code from the file: safetensors holds tensors and strings only, and checkpoints
are read with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain values.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from lore_pl.core.model import LoreModel
from lore_pl.data.atomic import write_atomic_path
from lore_pl.data.embedder import WEIGHTS_DIGEST_SCHEME
from lore_pl.data.files import read_checkpoint, read_tensor, read_tensors
from lore_pl.errors import LoreDataError

FORMAT = "lore-pl-basis/1"
#: ``checkpoint["lore_pl"]["kind"]`` of the two LightningModules' checkpoints
CHECKPOINT_KINDS = ("basis", "fewshot")


@dataclass
class BasisFile:
    """What phase 2 needs from phase 1: V, tau, and optionally V_ref, the users' weights (and their
    posterior covariance) and the population prior on a user's logits (mean and precision)."""

    basis: Tensor
    tau: float
    reference_head: Tensor | None = None
    user_ids: list[str] = field(default_factory=list)
    user_weights: Tensor | None = None
    embedder: str = ""  # identity of the embedder whose features the basis was trained on
    prior_mean: Tensor | None = None  # [K] the population's mean logits
    prior_precision: Tensor | None = None  # [K] the precision of the prior on a user's logits
    weight_covariance: Tensor | None = None  # [C, K, K] each user's posterior covariance of w
    embedder_weights: str = ""  # weights_digest of the embedder's model ("" unknown: a basis from before)

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    @classmethod
    def from_model(cls, model: LoreModel) -> BasisFile:
        """The kept (unpruned) columns of ``model``, its users' weights on them and its prior."""
        basis, weights = model.kept()
        keep = model.active_columns
        mean = model.population_logits()
        covariance = model.weight_covariance
        return cls(basis, model.temperature, model.reference_head, list(model.user_ids),
                   weights if model.num_users else None, model.embedder,
                   None if mean is None else mean[keep].detach(),
                   None if model.prior_precision is None else model.prior_precision[keep].detach(),
                   None if covariance is None else covariance[:, keep][:, :, keep].detach(),
                   embedder_weights=model.embedder_weights)

    def to_model(self, train_basis: bool = False, train_logits: bool = False) -> LoreModel:
        """A ``LoreModel`` with this basis and these users (logits ``log w``; frozen by default)."""
        weights = self.user_weights
        logits = None
        if self.rank >= 2:
            weights = weights if weights is not None else torch.empty(0, self.rank)
            logits = weights.float().clamp(min=1e-30).log()
        return LoreModel(self.basis, logits, tau=self.tau, reference_head=self.reference_head,
                         num_users=len(self.user_ids), user_ids=self.user_ids, embedder=self.embedder,
                         embedder_weights=self.embedder_weights,
                         prior_mean=self.prior_mean if self.rank >= 2 else None,
                         prior_precision=self.prior_precision if self.rank >= 2 else None,
                         weight_covariance=self.weight_covariance, train_basis=train_basis, train_logits=train_logits)


#: the basis file's name in a run directory (``callbacks.BasisExport`` writes it)
RUN_BASIS_FILE = "basis.safetensors"


def resolve_basis_path(path: str | os.PathLike) -> Path:
    """``path`` itself, or for a run directory the basis file it holds."""
    path = Path(path)
    if path.is_dir():
        if not (path / RUN_BASIS_FILE).is_file():
            raise LoreDataError(f"{path}: a run directory needs {RUN_BASIS_FILE} (written at the end of a "
                                "BasisModule fit); there is none. Pass the basis file itself otherwise")
        return path / RUN_BASIS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no such run directory or basis file: {path}")
    return path


def save_basis(path: str | os.PathLike, exported: BasisFile) -> Path:
    """Write ``exported`` to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    tensors = {"basis": exported.basis.detach().float().cpu().contiguous()}
    if exported.reference_head is not None:
        tensors["reference_head"] = exported.reference_head.detach().float().cpu().contiguous()
    for name in ("user_weights", "prior_mean", "prior_precision", "weight_covariance"):
        value = getattr(exported, name)
        if value is not None:
            tensors[name] = value.detach().float().cpu().contiguous()
    metadata = {
        "format": FORMAT,
        "tau": repr(float(exported.tau)),
        "user_ids": json.dumps(list(exported.user_ids)),
        "embedder": exported.embedder,
    }
    if exported.embedder_weights:  # a basis without one reads as before
        metadata["embedder_weights"] = exported.embedder_weights
    return write_atomic_path(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_basis(path: str | os.PathLike) -> BasisFile:
    """Read a basis from a ``.safetensors`` export or a ``BasisModule``/``FewShotModule`` checkpoint
    (pruned columns dropped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"basis file not found: {path}")
    if path.suffix == ".ckpt":
        return basis_from_checkpoint(path)
    tensors, metadata = read_tensors(path, "safetensors basis file")
    if "basis" not in tensors or "tau" not in metadata:
        raise LoreDataError(f"{path}: a basis file needs the tensor 'basis' and the metadata 'tau'")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LoreDataError(f"{path}: the tensor {name!r} holds NaN or Inf; this basis cannot score anything")
    return BasisFile(
        basis=tensors["basis"],
        tau=float(metadata["tau"]),
        reference_head=tensors.get("reference_head"),
        user_ids=list(json.loads(metadata.get("user_ids", "[]"))),
        user_weights=tensors.get("user_weights"),
        embedder=metadata.get("embedder", ""),
        prior_mean=tensors.get("prior_mean"),
        prior_precision=tensors.get("prior_precision"),
        weight_covariance=tensors.get("weight_covariance"),
        embedder_weights=read_weights_digest(metadata, path),
    )


def read_weights_digest(metadata: dict[str, str], path: Path) -> str:
    """The basis's ``embedder_weights`` ("" where none was recorded); a malformed one is refused."""
    digest = metadata.get("embedder_weights", "")
    scheme, _, hexdigest = digest.partition(":")
    if digest and not (scheme == WEIGHTS_DIGEST_SCHEME and re.fullmatch(r"[0-9a-f]{64}", hexdigest)):
        raise LoreDataError(f"{path}: the metadata 'embedder_weights' must be '{WEIGHTS_DIGEST_SCHEME}:' and 64 hex "
                            f"digits, got {digest!r:.100}")
    return digest


def checkpoint_model(checkpoint: dict[str, Any], path: object) -> tuple[str, LoreModel, dict[str, Any]]:
    """(kind, the ``LoreModel`` of a lore-pl checkpoint, its ``lore_pl`` metadata)."""
    meta = checkpoint.get("lore_pl")
    if not isinstance(meta, dict) or meta.get("kind") not in CHECKPOINT_KINDS:
        raise LoreDataError(f"{path}: not a lore-pl checkpoint of a BasisModule or FewShotModule "
                            "(no 'lore_pl' kind tag)")
    prefix = "model."
    state = {
        key[len(prefix) :]: value for key, value in checkpoint.get("state_dict", {}).items() if key.startswith(prefix)
    }
    if "basis" not in state:
        raise LoreDataError(f"{path}: the checkpoint's state_dict holds no basis ('model.basis')")
    return meta["kind"], LoreModel.from_state_dict(state), meta


def basis_from_checkpoint(path: str | os.PathLike) -> BasisFile:
    """A ``BasisModule`` checkpoint (seen users, pruned basis) or a ``FewShotModule`` one (its users)."""
    kind, model, meta = checkpoint_model(read_checkpoint(path), path)
    if kind == "basis":
        model.prune_(float(meta.get("prune_threshold", 0.0)))  # a mid-fit checkpoint was not pruned yet
    elif model.num_users == 0:
        raise LoreDataError(f"{path}: this FewShotModule checkpoint holds no fitted users")
    return BasisFile.from_model(model)


def read_reference_head(path: str | os.PathLike) -> Tensor:
    """``V_ref`` ``[d]`` from a file: a basis file or checkpoint that has one, a ``.safetensors`` with a
    tensor ``reference_head``, or a ``.npy`` vector."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference head file not found: {path}")
    if path.suffix in (".npy", ".safetensors"):
        head = read_tensor(path, "reference head file", key="reference_head").float()
    else:
        head = load_basis(path).reference_head
        if head is None:
            raise LoreDataError(f"{path}: this basis has no reference head")
    if head.ndim != 1:
        raise LoreDataError(f"{path}: a reference head is a vector [d], got shape {tuple(head.shape)}")
    if not bool(torch.isfinite(head).all()):
        raise LoreDataError(f"{path}: the reference head holds NaN or Inf")
    return head


def check_embedder(basis_embedder: str, data_embedder: str, basis_path: object) -> None:
    """A basis only scores features from the embedder it was trained on: refuse other data's.

    Either identity may be unknown (empty), e.g. an in-memory basis; then nothing is checked.
    """
    if basis_embedder and data_embedder and basis_embedder != data_embedder:
        raise LoreDataError(
            f"the basis {basis_path} was trained on features of {basis_embedder!r}, but the data are "
            f"embedded by {data_embedder!r}: embed the data with the basis's embedder"
        )
