"""A learned basis as a portable file (safetensors), and reading a basis from a file or a checkpoint.

Reading never runs code from the file: safetensors holds tensors and strings only, and checkpoints
are read with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain values.
A basis is checked as a whole when it is read, built (``PersonalRewardModel``) or written
(``check_basis``): one ``LoreDataError`` names the file and the field of the first problem.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from lore_pl.core.model import LoreModel
from lore_pl.data.atomic import write_atomic_path
from lore_pl.data.embedder import IDENTITY_PREFIX, WEIGHTS_DIGEST_SCHEME, EmbedderSpec
from lore_pl.data.files import read_checkpoint, read_tensor, read_tensors
from lore_pl.errors import LoreDataError, LoreDataWarning

FORMAT = "lore-pl-basis/1"
#: the basis formats this version reads (``format`` in the file's metadata)
KNOWN_FORMATS = (FORMAT,)
#: a basis file's tensors and metadata; anything else in a file is ignored with a warning
TENSOR_FIELDS = ("basis", "reference_head", "user_weights", "prior_mean", "prior_precision", "weight_covariance")
METADATA_FIELDS = ("format", "tau", "user_ids", "embedder", "embedder_weights")
#: tensor dtypes a file may hold: float32, or these, read once as float32 (with a warning)
CONVERTED_DTYPES = (torch.float16, torch.bfloat16, torch.float64)
FLOAT32 = torch.finfo(torch.float32)
#: the smallest tau: 1 / tau must be a float32 number (a denormal tau such as 1e-45 made every logit inf)
MIN_TAU = FLOAT32.tiny
#: the largest |logit| of a prior mean: softmax differences beyond ~104 already underflow float32, and
#: far larger logits overflow the prior's squared distances
MAX_LOGIT = 1e4
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
    """Write ``exported`` to ``path`` atomically (temporary file, then rename); a basis that
    ``check_basis`` refuses is not written (nothing at ``path`` changes)."""
    path = Path(path)
    exported = check_basis(exported, f"refusing to write {path}")
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
    (pruned columns dropped), checked as a whole (``check_basis``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"basis file not found: {path}")
    if path.suffix == ".ckpt":
        return basis_from_checkpoint(path)
    tensors, metadata = read_tensors(path, "safetensors basis file")
    return basis_from_tensors(tensors, metadata, path)


def basis_from_tensors(tensors: dict[str, Tensor], metadata: dict[str, str], path: object) -> BasisFile:
    """The basis a safetensors file's ``tensors`` and ``metadata`` hold; ``LoreDataError`` naming
    ``path`` and the field otherwise. Unknown fields are ignored with a ``LoreDataWarning``."""
    form = metadata.get("format")
    if form is None:
        raise LoreDataError(f"{path}: field 'format' is missing: not a lore-pl basis file (save_basis writes "
                            f"format {FORMAT!r})")
    if form not in KNOWN_FORMATS:
        raise LoreDataError(f"{path}: field 'format': {form!r:.80} is not a basis format this lore-pl reads "
                            f"({', '.join(KNOWN_FORMATS)})")
    for name, present in (("basis", "basis" in tensors), ("tau", "tau" in metadata)):
        if not present:
            raise LoreDataError(f"{path}: field {name!r} is missing: a basis file needs the tensor 'basis' and "
                                "the metadata 'tau'")
    unknown = sorted(set(tensors) - set(TENSOR_FIELDS)) + sorted(set(metadata) - set(METADATA_FIELDS))
    if unknown:
        warnings.warn(f"{path}: ignored field(s) a basis file does not have: {unknown[:10]}", LoreDataWarning,
                      stacklevel=3)
    read = {}
    for name in TENSOR_FIELDS:
        if name in tensors:
            read[name] = file_tensor(tensors[name], name, path)
    converted = [f"{name!r} ({str(tensors[name].dtype).removeprefix('torch.')})" for name in read
                 if tensors[name].dtype != torch.float32]
    if converted:
        warnings.warn(f"{path}: read {', '.join(converted)} as float32, the dtype of a basis file", LoreDataWarning,
                      stacklevel=3)
    exported = BasisFile(
        basis=read["basis"],
        tau=parse_tau(metadata["tau"], path),
        reference_head=read.get("reference_head"),
        user_ids=parse_user_ids(metadata.get("user_ids", "[]"), path),
        user_weights=read.get("user_weights"),
        embedder=metadata.get("embedder", ""),
        prior_mean=read.get("prior_mean"),
        prior_precision=read.get("prior_precision"),
        weight_covariance=read.get("weight_covariance"),
        embedder_weights=read_weights_digest(metadata, path),
    )
    stored = tensors.get("user_weights")  # float16/bfloat16 weights sum to 1 only to their own rounding
    rounding = torch.finfo(stored.dtype).eps if stored is not None else 0.0
    return check_basis(exported, str(path), weight_rounding=rounding)


def file_tensor(tensor: Tensor, name: str, path: object) -> Tensor:
    """A file's tensor as float32: float16, bfloat16 and float64 are converted, other dtypes refused."""
    if tensor.dtype == torch.float32:
        return tensor
    if tensor.dtype not in CONVERTED_DTYPES:
        raise LoreDataError(f"{path}: field {name!r}: dtype {str(tensor.dtype).removeprefix('torch.')}; a basis "
                            "file holds float32 tensors (float16, bfloat16 and float64 are read as float32)")
    return tensor.float()  # float64 beyond float32's range becomes inf, which check_basis refuses


def parse_tau(text: str, path: object) -> float:
    try:
        return float(text)
    except ValueError:
        raise LoreDataError(f"{path}: field 'tau': {text!r:.80} is not a number") from None


def parse_user_ids(text: str, path: object) -> list[str]:
    """The metadata ``user_ids``: a JSON list (its items are checked by ``check_basis``)."""
    try:
        user_ids = json.loads(text)
    except ValueError as error:
        raise LoreDataError(f"{path}: field 'user_ids': not valid JSON ({error})") from None
    if not isinstance(user_ids, list):
        raise LoreDataError(f"{path}: field 'user_ids' must be a JSON list of user id strings, got a "
                            f"{type(user_ids).__name__}: {text!r:.80}")
    return user_ids


def check_user_id(user: object, where: str) -> str:
    """``user`` if it is a user id (a string that is not empty or blank); a ``LoreDataError`` naming ``where``."""
    if not isinstance(user, str) or not user.strip():
        raise LoreDataError(f"{where} must be a non-empty string (a user id), got {user!r:.60}")
    return user


def check_basis(exported: BasisFile, source: str, weight_rounding: float = 0.0) -> BasisFile:
    """``exported`` with its tensors as float32, if every field is valid; else one ``LoreDataError``
    ``"{source}: field NAME: ..."`` for the first bad field.

    A basis is: ``tau`` a finite float32 number >= ``MIN_TAU``; ``basis`` a finite ``[d, K]`` matrix
    (d, K >= 1) whose columns' norms are float32 numbers; ``user_ids`` unique non-empty strings;
    ``user_weights`` ``[C, K]`` (C users; needed for K >= 2 with users), finite, >= 0, each row
    summing to 1 within float32 rounding (``weight_rounding``: the file's own, where it was coarser);
    ``reference_head`` a finite ``[d]``; ``prior_mean`` ``[K]`` of finite logits within +-``MAX_LOGIT``;
    ``prior_precision`` ``[K]`` finite, each 0 or a normal float32 number; ``weight_covariance`` ``[C, K, K]``, finite,
    symmetric, with a non-negative diagonal; ``embedder`` a string, and where it names a text
    embedder, one ``EmbedderSpec`` accepts (so a model package outside the allow-list is refused).
    """

    def fail(name: str, problem: str) -> LoreDataError:
        return LoreDataError(f"{source}: field {name!r}: {problem}")

    tensors = {}
    for name in TENSOR_FIELDS:
        value = getattr(exported, name)
        if value is None:
            continue
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise fail(name, f"must be a floating-point tensor, got {_kind(value)}")
        value = value.detach().float()
        if not bool(torch.isfinite(value).all()):
            raise fail(name, "holds NaN or Inf (the file's values, or float64 values beyond float32's range); "
                             "this basis cannot score anything")
        tensors[name] = value
    tau = _check_tau(exported.tau, fail)
    basis = tensors.get("basis")
    if basis is None:
        raise LoreDataError(f"{source}: field 'basis' is missing")
    if basis.ndim != 2 or basis.shape[0] < 1 or basis.shape[1] < 1:
        raise fail("basis", f"must be a [d, K] matrix with d, K >= 1, got shape {tuple(basis.shape)}")
    if float(basis.double().norm(dim=0).max()) > FLOAT32.max:
        raise fail("basis", "a column's norm exceeds float32's range: every reward would overflow")
    dim, rank = basis.shape
    user_ids = _check_user_ids(exported.user_ids, fail)
    count = len(user_ids)
    shapes = {"reference_head": (dim,), "user_weights": (count, rank), "prior_mean": (rank,),
              "prior_precision": (rank,), "weight_covariance": (count, rank, rank)}
    for name, shape in shapes.items():
        if name in tensors and tuple(tensors[name].shape) != shape:
            raise fail(name, f"has shape {tuple(tensors[name].shape)}, expected {shape} for {count} user id(s), "
                             f"d={dim} and K={rank}")
    weights = tensors.get("user_weights")
    if weights is None and rank >= 2 and count:
        raise LoreDataError(f"{source}: field 'user_weights' is missing: the basis has K={rank} columns and {count} "
                            "user id(s), each needs its weights")
    if weights is not None:
        _check_weights(weights, user_ids, weight_rounding, fail)
    if "reference_head" in tensors and float(tensors["reference_head"].double().norm()) > FLOAT32.max:
        raise fail("reference_head", "its norm exceeds float32's range")
    largest = float(tensors["prior_mean"].abs().max()) if "prior_mean" in tensors else 0.0
    if largest > MAX_LOGIT:
        raise fail("prior_mean", f"holds a logit beyond +-{MAX_LOGIT:g} (largest {largest:g})")
    precision = tensors.get("prior_precision")
    if precision is not None and bool(((precision < 0) | ((precision > 0) & (precision < FLOAT32.tiny))).any()):
        raise fail("prior_precision", f"each precision must be 0 (no prior) or at least {FLOAT32.tiny:.3g} (its "
                                      f"inverse, a variance, a float32 number), got {precision.min().item():.3g}")
    if "weight_covariance" in tensors:
        _check_covariance(tensors["weight_covariance"], user_ids, fail)
    _check_embedder_identity(exported.embedder, fail)
    return replace(exported, tau=tau, user_ids=user_ids, **tensors)


def _kind(value: object) -> str:
    return f"{value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__


def _check_tau(tau: object, fail) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise fail("tau", f"must be a number, got {type(tau).__name__}")
    tau = float(tau)
    if not math.isfinite(tau) or not MIN_TAU <= tau <= FLOAT32.max:
        raise fail("tau", f"must be a finite number in [{MIN_TAU:.3g}, {FLOAT32.max:.3g}] (1 / tau a float32 "
                          f"number), got {tau!r}")
    return tau


def _check_user_ids(user_ids: object, fail) -> list[str]:
    if not isinstance(user_ids, (list, tuple)):  # a string is not a list of one-letter users
        raise fail("user_ids", f"must be a list of user id strings, got {type(user_ids).__name__}: {user_ids!r:.60}")
    for position, user in enumerate(user_ids):
        if not isinstance(user, str) or not user.strip():
            raise fail("user_ids", f"item {position} must be a non-empty string, got {user!r:.60}")
    if len(set(user_ids)) != len(user_ids):
        seen: set[str] = set()
        twice = next(user for user in user_ids if user in seen or seen.add(user))
        raise fail("user_ids", f"names {twice!r} more than once; each user has one row of weights")
    return list(user_ids)


def _check_weights(weights: Tensor, user_ids: list[str], rounding: float, fail) -> None:
    if bool((weights < 0).any()):
        row = int((weights < 0).any(dim=1).nonzero()[0])
        raise fail("user_weights", f"row {row} (user {user_ids[row]!r}) holds a negative weight; weights are on "
                                   "the simplex")
    tolerance = max(1e-4, weights.shape[1] * max(rounding, FLOAT32.eps))
    error = (weights.double().sum(dim=1) - 1).abs()
    if weights.shape[0] and float(error.max()) > tolerance:
        row = int(error.argmax())
        total = float(weights[row].double().sum())
        raise fail("user_weights", f"row {row} (user {user_ids[row]!r}) sums to {total:.6g}, not 1 (within "
                                   f"{tolerance:.2g}); weights are not renormalised")


def _check_covariance(covariance: Tensor, user_ids: list[str], fail) -> None:
    if not covariance.shape[0]:
        return
    diagonal = torch.diagonal(covariance, dim1=1, dim2=2)
    if bool((diagonal < 0).any()):
        row = int((diagonal < 0).any(dim=1).nonzero()[0])
        raise fail("weight_covariance", f"user {user_ids[row]!r} has a negative variance")
    scale = covariance.abs().amax(dim=(1, 2), keepdim=True).clamp(min=FLOAT32.tiny)
    asymmetry = ((covariance - covariance.transpose(1, 2)).abs() / scale).amax(dim=(1, 2))
    if float(asymmetry.max()) > 1e-4:
        raise fail("weight_covariance", f"user {user_ids[int(asymmetry.argmax())]!r} has a covariance that is not "
                                        "symmetric")


def _check_embedder_identity(embedder: object, fail) -> None:
    if not isinstance(embedder, str):
        raise fail("embedder", f"must be a string, got {type(embedder).__name__}")
    if embedder.startswith(IDENTITY_PREFIX):
        try:
            EmbedderSpec.from_identity(embedder)
        except LoreDataError as error:
            raise fail("embedder", str(error)) from None


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
    extra = state.get("_extra_state", {})
    if not isinstance(extra, dict) or not isinstance(extra.get("user_ids", []), (list, tuple)):
        raise LoreDataError(f"{path}: field 'user_ids' (model._extra_state) must be a list of user id strings")
    try:
        model = LoreModel.from_state_dict(state)
    except LoreDataError as error:
        raise LoreDataError(f"{path}: {error}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as error:  # a state_dict of other shapes or types
        raise LoreDataError(f"{path}: the checkpoint's model does not load ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''})") from None
    return meta["kind"], model, meta


def basis_from_checkpoint(path: str | os.PathLike) -> BasisFile:
    """A ``BasisModule`` checkpoint (seen users, pruned basis) or a ``FewShotModule`` one (its users)."""
    kind, model, meta = checkpoint_model(read_checkpoint(path), path)
    if kind == "basis":
        model.prune_(float(meta.get("prune_threshold", 0.0)))  # a mid-fit checkpoint was not pruned yet
    elif model.num_users == 0:
        raise LoreDataError(f"{path}: this FewShotModule checkpoint holds no fitted users")
    return check_basis(BasisFile.from_model(model), str(path))


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
