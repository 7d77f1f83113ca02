"""The base of every data set: four splits of per-user preference tensors, served as batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from lightning import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from lore_pl.data.preferences import DataRequest, PreferenceSplit
from lore_pl.errors import LoreDataError, LoreDataWarning

#: The protocol's four roles: seen users' train pairs and test pairs (unseen prompts), unseen
#: users' few-shot pool and test pairs; and the validation roles ``seen_val`` and ``unseen_val``:
#: the pairs on held-out prompts (``val_fraction``), disjoint from every training and test prompt,
#: on which early stopping, checkpoint choice and every automatic choice are made.
ROLES = ("seen_train", "seen_val", "seen_test", "unseen_pool", "unseen_val", "unseen_test")
#: the share of training prompts held out for validation when the data know their prompts
DEFAULT_VAL_FRACTION = 0.1
#: (training role, the validation role cut from its prompts)
VALIDATION_ROLES = (("seen_train", "seen_val"), ("unseen_pool", "unseen_val"))

#: Roles where every user of the split's user table needs pairs: a seen user without train pairs
#: keeps its random initial weights, an unseen user without a pool gets no few-shot fit.
NEEDS_EVERY_USER = {"seen_train": "train pairs", "unseen_pool": "few-shot pool pairs"}

FEATURE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class PreferenceData:
    """What a data set produces: the four splits (absent roles allowed) and optionally ``V_ref``."""

    splits: dict[str, PreferenceSplit]
    reference_head: Tensor | None = None


class PreferenceDataModule(LightningDataModule):
    """Serves per-user preference tensors for the four protocol roles.

    Subclasses implement ``load()``; the data are loaded lazily and once, so ``num_users``, ``dim``
    and ``reference_head`` can be read before ``setup`` (LightningCLI links read them early). What
    to serve is said by ``connect(DataRequest)`` (the CLI and the LightningModules' ``setup`` call
    it with the module's ``data_request``): the ``seen`` population trains on ``seen_train``, is
    validated on ``seen_val`` and tested on ``seen_test``; the ``unseen`` one trains on
    ``unseen_pool`` (always one full batch, optionally subsampled to ``shots`` per user), is
    validated on ``unseen_val`` and tested on ``unseen_test``. Validation never reads test pairs:
    without validation pairs (``val_fraction`` 0) there is no validation.

    The validation pairs are cut by prompt: ``val_fraction`` of the prompts of the training roles
    (``seen_train`` and ``unseen_pool``) are drawn at random (``val_seed``), and every pair on them,
    of any user, moves to ``seen_val`` / ``unseen_val``. So no validation prompt is a training
    prompt of anyone (the shared basis never saw its responses), nor a test prompt.

    Args:
        batch_size: pairs per training batch; ``null`` trains on the whole split as one batch.
        eval_batch_size: pairs per evaluation batch; ``null`` evaluates the whole split at once.
        shuffle: reshuffle the training pairs each epoch (only with a ``batch_size``).
        val_fraction: fraction of the training prompts held out, with every pair on them, as the
            validation roles (0: no validation; ``null``: 0.1 where the splits know their prompts).
        val_seed: seed of that hold-out.
        feature_dtype: how the features are kept in memory: ``float32``, ``bfloat16`` (half the
            memory and, on the CPU kernel, half the bytes read per step; all arithmetic stays float32)
            or ``float64`` (for exact comparisons; a float64 model then computes in float64).
    """

    #: what the test (and validation) pairs hold out, in words for reports ("unseen prompts")
    held_out: str = "prompts"

    def __init__(
        self,
        batch_size: int | None = None,
        eval_batch_size: int | None = None,
        shuffle: bool = True,
        val_fraction: float | None = None,
        val_seed: int = 0,
        feature_dtype: Literal["float32", "bfloat16", "float64"] = "float32",
    ) -> None:
        super().__init__()
        if val_fraction is not None and not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a number of pairs >= 1 (or null for the whole split), got {value!r}")
        if feature_dtype not in FEATURE_DTYPES:
            raise ValueError(f"feature_dtype must be one of {sorted(FEATURE_DTYPES)}, got {feature_dtype!r}")
        self.feature_dtype = feature_dtype
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.shuffle = shuffle
        self.val_fraction = val_fraction
        self.val_seed = val_seed
        self._data: PreferenceData | None = None
        self.request = DataRequest()

    def connect(self, request: DataRequest) -> None:
        """Say what to serve: whose pairs the training loader yields, and which of them."""
        if not isinstance(request, DataRequest):
            raise TypeError(f"connect takes a DataRequest, got {type(request).__name__}")
        self.request = request

    # ----------------------------------------------------------------------- for subclasses
    def load(self) -> PreferenceData:
        """Build the splits. Called once."""
        raise NotImplementedError

    def oracle_logits(self, role: str, split: PreferenceSplit) -> Tensor | None:
        """Logits of the true preference model for ``split`` (a subset of ``role``), where known."""
        return None

    # --------------------------------------------------------------------------- the data
    @property
    def data(self) -> PreferenceData:
        if self._data is None:
            data = self.load()
            self._check(data)  # on the data as loaded, before any narrowing
            self._data = self._store(self._hold_out_validation(data))
        return self._data

    def _store(self, data: PreferenceData) -> PreferenceData:
        dtype = FEATURE_DTYPES[self.feature_dtype]
        if all(split.features.dtype == dtype for split in data.splits.values()):
            return data
        splits = {role: split.with_features(split.features.to(dtype)) for role, split in data.splits.items()}
        return PreferenceData(splits, data.reference_head)

    def _hold_out_validation(self, data: PreferenceData) -> PreferenceData:
        training = [role for role, _ in VALIDATION_ROLES if role in data.splits]
        missing = [role for role in training if data.splits[role].prompts is None]
        fraction = self.val_fraction
        if fraction is None:
            fraction = DEFAULT_VAL_FRACTION if training and not missing else 0.0
        if fraction <= 0 or any(role in data.splits for _, role in VALIDATION_ROLES):
            return data  # no hold-out asked for, or the data came with their validation splits
        if missing:
            raise LoreDataError(f"{type(self).__name__}: val_fraction holds out prompts, but split {missing[0]!r} does "
                                "not say which prompt each pair is on (PreferenceSplit.prompts)")
        prompts = torch.unique(torch.cat([data.splits[role].prompts for role in training]))
        count = min(max(1, int(round(fraction * prompts.numel()))), prompts.numel() - 1)  # never silently none
        order = prompts[torch.randperm(prompts.numel(), generator=torch.Generator().manual_seed(self.val_seed))]
        held = self._keep_every_user_trainable(data, training, order[:max(count, 0)], order)
        if held.numel() == 0:
            raise LoreDataError(
                f"{type(self).__name__}: val_fraction={fraction} holds out no validation prompt: of the "
                f"{prompts.numel()} training prompts, none can be held out without taking some user's last training "
                "prompt; set val_fraction: 0 for no validation (or give users more prompts)")
        if held.numel() < count:
            rank_zero_warn(f"{type(self).__name__}: {count - held.numel()} of the {count} validation prompts drawn "
                           "stay training prompts (each was some user's last training prompt); "
                           f"{held.numel()} are held out", category=LoreDataWarning)
        splits = dict(data.splits)
        for role, val_role in VALIDATION_ROLES:
            if role in splits:
                on_held = torch.isin(splits[role].prompts, held)
                splits[val_role] = splits[role].subset(torch.nonzero(on_held)[:, 0], val_role)
                splits[role] = splits[role].subset(torch.nonzero(~on_held)[:, 0], role)
        narrowed = PreferenceData(splits, data.reference_head)
        self._check_users_keep_pairs(narrowed, f"after holding out {held.numel()} of {prompts.numel()} prompts "
                                               f"(val_fraction={fraction}); lower val_fraction")
        return narrowed

    @staticmethod
    def _keep_every_user_trainable(data: PreferenceData, roles: list[str], held: Tensor, order: Tensor) -> Tensor:
        """``held`` minus, for each user whose every training prompt it holds, that user's first
        prompt in ``order`` (it stays a training prompt, for everyone): no user loses all their pairs."""
        rank = torch.empty(int(order.max()) + 1, dtype=torch.long)
        rank[order] = torch.arange(order.numel())
        released = []
        for role in roles:
            split = data.splits[role]
            kept = ~torch.isin(split.prompts, held)
            lacking = torch.nonzero(torch.bincount(split.users[kept], minlength=split.num_users) == 0)[:, 0]
            for user in lacking.tolist():
                mine = split.prompts[split.users == user]
                if mine.numel():
                    released.append(mine[torch.argmin(rank[mine])])
        if not released:
            return held
        return held[~torch.isin(held, torch.stack(released))]

    @property
    def embedder(self) -> str:
        """Identity of what made the features (a model and its settings); saved with a learned basis."""
        return type(self).__name__

    @property
    def embedder_weights(self) -> str:
        """``weights_digest`` of the model that made the features ("" unknown, or not a model's); saved with
        a learned basis, so that an export can tell the very model apart from one with another body."""
        return ""

    def setup(self, stage: str | None = None) -> None:
        self.data  # noqa: B018 - loads once

    @staticmethod
    def _check(data: PreferenceData) -> None:
        unknown = set(data.splits) - set(ROLES)
        if unknown:
            raise LoreDataError(f"unknown split roles {sorted(unknown)}; expected some of {ROLES}")
        dims = {role: split.dim for role, split in data.splits.items()}
        if len(set(dims.values())) > 1:
            raise LoreDataError(f"the splits' feature dimensions differ: {dims}")
        for population in ("seen", "unseen"):
            tables = {role: data.splits[role].user_ids for role in ROLES if role.startswith(population)
                      and role in data.splits}
            if len({tuple(table) for table in tables.values()}) > 1:
                raise LoreDataError(f"splits {sorted(tables)} must index the same user table")
        if data.reference_head is not None and dims and data.reference_head.shape != (next(iter(dims.values())),):
            raise LoreDataError(
                f"reference head V_ref has shape {tuple(data.reference_head.shape)}, but the features have d={dims}"
            )
        if data.reference_head is not None and not bool(torch.isfinite(data.reference_head).all()):
            raise LoreDataError("reference head V_ref has NaN or Inf entries")
        PreferenceDataModule._check_users_keep_pairs(data, "drop them from the data (or give them pairs)")
        found = {role: split.duplicate_rows() for role, split in data.splits.items()}
        found = {role: rows for role, rows in found.items() if len(rows)}
        if found:
            role, rows = next(iter(found.items()))
            split, (first, later) = data.splits[role], rows[0].tolist()
            counts = ", ".join(f"{len(rows)} in {name!r}" for name, rows in found.items())
            # a warning, not an error: a judgment given twice is real data; it just counts twice. One for
            # the whole data set, however many splits hold them.
            rank_zero_warn(
                f"repeated judgments: {counts} (same user, identical features; e.g. rows {first} and {later} of "
                f"{role!r}, user {split.user_ids[int(split.users[first])]!r}); each counts as a separate pair in "
                "the loss and the accuracy",
                category=LoreDataWarning,
            )

    @staticmethod
    def _check_users_keep_pairs(data: PreferenceData, advice: str) -> None:
        for role, what in NEEDS_EVERY_USER.items():
            if role in data.splits:
                split = data.splits[role]
                empty = [split.user_ids[i] for i in torch.nonzero(split.pairs_per_user() == 0)[:, 0].tolist()]
                if empty:
                    shown = ", ".join(repr(user) for user in empty[:5]) + (", ..." if len(empty) > 5 else "")
                    raise LoreDataError(
                        f"split {role!r}: {len(empty)} of its {split.num_users} users have no {what}: {shown}; "
                        f"{advice}")

    def has_split(self, role: str) -> bool:
        return role in self.data.splits

    def split(self, role: str) -> PreferenceSplit:
        if role not in ROLES:
            raise LoreDataError(f"unknown split role {role!r}; expected one of {ROLES}")
        if role not in self.data.splits:
            raise LoreDataError(f"{type(self).__name__} has no {role!r} split")
        return self.data.splits[role]

    def _users_of(self, population: str) -> list[str]:
        for role in ROLES:
            if role.startswith(population) and role in self.data.splits:
                return self.data.splits[role].user_ids
        return []

    @property
    def seen_user_ids(self) -> list[str]:
        return self._users_of("seen")

    @property
    def unseen_user_ids(self) -> list[str]:
        return self._users_of("unseen")

    @property
    def num_users(self) -> int:
        """Number of seen users (rows of W)."""
        return len(self.seen_user_ids)

    @property
    def num_unseen_users(self) -> int:
        return len(self.unseen_user_ids)

    @property
    def dim(self) -> int:
        """Feature dimension d."""
        return next(iter(self.data.splits.values())).dim

    @property
    def reference_head(self) -> Tensor | None:
        """``V_ref`` ``[d]``: the reward model's own scalar head, or None where the data has none."""
        return self.data.reference_head

    # ------------------------------------------------------------------------ dataloaders
    def _shard(self) -> tuple[int, int]:
        """(rank, world size): under DDP every loader yields only this rank's disjoint shard of
        each batch (no padding), so each pair counts once per step and in the summed metrics."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _loader(
        self, split: PreferenceSplit, batch_size: int | None, shuffle: bool = False, shard: bool = True
    ) -> DataLoader:
        rank, world_size = self._shard() if shard else (0, 1)
        return split.loader(batch_size, shuffle=shuffle, rank=rank, world_size=world_size)

    def _eval_loader(self, stage: str) -> DataLoader | list:
        role = f"{self.request.population}_{'val' if stage == 'val' else 'test'}"
        if stage == "val" and not self.has_split(role):
            return []  # no validation pairs: no validation (never the test pairs)
        return self._loader(self.split(role), self.eval_batch_size)

    def train_dataloader(self) -> DataLoader:
        request = self.request
        if request.population == "seen":
            split, batch_size, shuffle = self.split("seen_train"), self.batch_size, self.shuffle
        else:
            split, batch_size, shuffle = self.split("unseen_pool"), None, False  # few-shot: the whole pool at once
        # drawn from the whole split on every rank alike, before sharding, so DDP trains on exactly the
        # pairs one process would
        split = split.draw_shots(request.shots, request.shot_seed)
        return self._loader(split, batch_size, shuffle, shard=request.shard)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict")
