"""Per-user preference tensors: one split of pairs, and how batches are drawn from it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from lore_pl.core.finite import non_finite_rows
from lore_pl.core.functional import check_shots, sample_shots, shard
from lore_pl.data.npy_rows import npy_layout, read_npy_rows
from lore_pl.errors import LoreDataError


@dataclass(frozen=True)
class DataRequest:
    """What a LightningModule asks its data module to serve (``PreferenceDataModule.connect``).

    Args:
        population: whose pairs to train on: the ``seen`` users' train pairs (phase 1) or the
            ``unseen`` users' few-shot pool (phase 2, always one full batch).
        shots: train on at most this many random pairs per user (``None``: all of them).
        shot_seed: seed of that subsample (drawn on the whole split, before any sharding).
        shard: under DDP give each rank its shard of every batch (``False``: every rank gets all).
        embed: an embedding job: the loader yields the feature cache's missing shards of text.
    """

    population: Literal["seen", "unseen"] = "seen"
    shots: int | None = None
    shot_seed: int = 0
    shard: bool = True
    embed: bool = False

    def __post_init__(self) -> None:
        if self.population not in ("seen", "unseen"):
            raise ValueError(f"population must be 'seen' or 'unseen', got {self.population!r}")
        check_shots(self.shots)


class ShardIndex(NamedTuple):
    """What ``IndexBatchSampler`` yields: this rank's rows of one step's batch, and the whole batch.

    ``rows`` and ``step`` index the split (a slice, or an index tensor); ``rows`` is part of ``step``.
    """

    rows: Tensor | slice
    step: Tensor | slice


@dataclass(eq=False)
class PreferenceSplit(Dataset):
    """A split of preference pairs, packed.

    ``features[i] = e(chosen_i) - e(rejected_i)`` (``[N, d]``), ``users[i]`` the row of pair i's
    user in ``user_ids`` (``[N]``, long), and optionally ``prompts[i]``, an id of pair i's prompt
    (``[N]``, long; the same prompt has the same id in every split of a data set), which is what a
    prompt-disjoint validation split is cut by. Where the data know their texts, ``responses[i]``
    holds the ids of pair i's chosen and rejected responses (``[N, 2]``, long; one id per distinct
    response text in every split) and ``lengths[i]`` their lengths (``[N, 2]``, float), which the
    skeptic's baselines (the longer response wins, the crowd's win-rate) are computed from.
    Indexing takes an index tensor (or slice) and returns the batch ``{"features", "users"}`` by
    plain tensor indexing: no per-sample Python work. ``source``, where set, is the ``.npy`` file the
    features are memory-mapped from: ``row_blocks`` (the checks here, evaluation) then reads it in
    blocks by plain reads, so a pass over a split larger than RAM holds one block.
    """

    features: Tensor
    users: Tensor
    user_ids: Sequence[str]
    name: str = "split"
    prompts: Tensor | None = None
    responses: Tensor | None = None
    lengths: Tensor | None = None
    source: Path | None = None

    def __post_init__(self) -> None:
        if self.features.ndim != 2:
            raise LoreDataError(f"{self.name}: features must be [N, d], got shape {tuple(self.features.shape)}")
        if self.users.shape != (self.features.shape[0],):
            raise LoreDataError(
                f"{self.name}: users must be [N] with N = {self.features.shape[0]}, got {tuple(self.users.shape)}"
            )
        self.users = self.users.long()
        self.user_ids = list(self.user_ids)
        if self.users.numel() and (int(self.users.min()) < 0 or int(self.users.max()) >= len(self.user_ids)):
            raise LoreDataError(f"{self.name}: user index out of range for {len(self.user_ids)} user ids")
        if self.prompts is not None:
            self.prompts = torch.as_tensor(self.prompts).long()
            if self.prompts.shape != self.users.shape:
                raise LoreDataError(
                    f"{self.name}: prompts must be [N] with N = {len(self)}, got {tuple(self.prompts.shape)}"
                )
        for field, dtype in (("responses", torch.long), ("lengths", torch.float32)):
            value = getattr(self, field)
            if value is None:
                continue
            value = torch.as_tensor(value).to(dtype)
            if value.shape != (len(self), 2):
                raise LoreDataError(
                    f"{self.name}: {field} must be [N, 2] with N = {len(self)}, got {tuple(value.shape)}"
                )
            setattr(self, field, value)
        self._check_finite()

    def _check_finite(self) -> None:
        """NaN or Inf in a feature row would turn the whole loss into NaN: name the first bad row."""
        if not self.features.is_floating_point() or self.features.numel() == 0:
            return
        # block by block: O(N) extra memory instead of an [N, d] mask (core/finite: a row sum first)
        bad_rows = torch.cat([non_finite_rows(block) + rows.start for rows, block in self.row_blocks()])
        if bad_rows.numel():
            row = int(bad_rows[0])
            bad = torch.nonzero(~torch.isfinite(self.features[row]))[:, 0]
            value = float(self.features[row, bad[0]])
            raise LoreDataError(
                f"split {self.name!r}: row {row} (user {self.user_ids[int(self.users[row])]!r}) has a non-finite "
                f"feature ({value} at dimension {int(bad[0])}); {bad_rows.numel()} row(s) of {len(self)} have NaN or "
                "Inf"
            )

    def duplicate_rows(self) -> Tensor:
        """``[M, 2]`` pairs (first row, later row) with the same user and bit-identical features.

        Rows are hashed exactly (the float bits as integers, times random odd weights, summed with
        int64 wrap-around), so identical rows always collide; collisions are then confirmed.
        """
        if len(self) < 2 or not self.features.is_floating_point():
            return torch.zeros(0, 2, dtype=torch.long)
        weights = torch.randint(1, 2**31, (self.dim,), generator=torch.Generator().manual_seed(0)) * 2 + 1
        hashes = torch.empty(len(self), dtype=torch.long)
        # two buffers reused for every block: fresh temporaries per block grew the heap by as much as the
        # features themselves (glibc keeps freed blocks of this size in the heap after numpy's larger ones)
        bits = torch.empty(min(len(self), 4096), self.dim, dtype=torch.float32)
        wide = torch.empty(bits.shape, dtype=torch.long)
        for rows, block in self.row_blocks(4096):
            count = rows.stop - rows.start
            bits[:count].copy_(block.detach())
            torch.mul(bits[:count].view(torch.int32), weights, out=wide[:count])
            torch.sum(wide[:count], dim=1, out=hashes[rows])
        # rows grouped by (user, hash) with two stable 1-d sorts: torch.unique(dim=0) would hold a tensor
        # object per row (about 1.6 kB each: 8 GB transient at 5M rows)
        users = self.users.cpu()
        order = torch.argsort(hashes, stable=True)
        order = order[torch.argsort(users[order], stable=True)]  # by user, then hash, then row
        by_user, by_hash = users[order], hashes[order]
        starts = torch.ones(len(order), dtype=torch.bool)
        starts[1:] = (by_user[1:] != by_user[:-1]) | (by_hash[1:] != by_hash[:-1])
        group_of = torch.cumsum(starts, 0) - 1
        shared = torch.bincount(group_of)[group_of] > 1
        rows, groups = order[shared], group_of[shared]  # each group's rows together, in row order
        duplicates, firsts = [], {}
        for row, group in zip(rows.tolist(), groups.tolist()):
            first = firsts.setdefault(group, row)
            if first != row and torch.equal(self.features[first], self.features[row]):
                duplicates.append((first, row))
        return torch.tensor(duplicates, dtype=torch.long).reshape(-1, 2)

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index: Tensor | slice | ShardIndex) -> dict[str, Tensor]:
        """The batch at ``index``. A ``ShardIndex`` also gives ``counts``: the per-user pair counts
        of the whole step's batch (all ranks), which the loss is normalized by."""
        if isinstance(index, ShardIndex):
            counts = torch.bincount(self.users[index.step], minlength=self.num_users)
            return {"features": self.features[index.rows], "users": self.users[index.rows], "counts": counts}
        return {"features": self.features[index], "users": self.users[index]}

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    def pairs_per_user(self) -> Tensor:
        return torch.bincount(self.users, minlength=self.num_users)

    def row_blocks(self, rows: int = 65536) -> Iterator[tuple[slice, Tensor]]:
        """(rows, features of those rows) in consecutive blocks of ``rows``: views of ``features``, or, for a
        split mapped from ``source``, blocks read from the file (no page of the mapping is touched)."""
        layout = npy_layout(self.source) if self.source is not None else None
        for start in range(0, len(self), rows):
            part = slice(start, min(start + rows, len(self)))
            if layout is None:
                yield part, self.features[part]
            else:
                yield part, torch.from_numpy(read_npy_rows(self.source, part.start, part.stop, layout))

    def subset(self, index: Tensor, name: str | None = None) -> PreferenceSplit:
        """The pairs at ``index``, same user table."""
        def pick(value: Tensor | None) -> Tensor | None:
            return None if value is None else value[index]

        return PreferenceSplit(self.features[index], self.users[index], self.user_ids, name or self.name,
                               pick(self.prompts), pick(self.responses), pick(self.lengths))

    def compacted(self, index: Tensor, name: str | None = None) -> PreferenceSplit:
        """The pairs at ``index`` (ascending), moved to the front of this split's own feature storage
        block by block: no second copy of the features (``subset`` makes one). This split's features are
        overwritten: use it only on features that nothing else holds."""
        index = torch.as_tensor(index).long()
        if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
            raise ValueError("compacted takes strictly ascending row indices")
        features = self.features
        for start in range(0, index.numel(), 65536):
            part = index[start:start + 65536]
            # row index[j] >= j: a block's source rows are never rows an earlier block overwrote
            features[start:start + part.numel()] = features[part]

        def pick(value: Tensor | None) -> Tensor | None:
            return None if value is None else value[index]

        return PreferenceSplit(features[:index.numel()], self.users[index], self.user_ids, name or self.name,
                               pick(self.prompts), pick(self.responses), pick(self.lengths))

    def draw_shots(self, shots: int | None, seed: int, name: str | None = None) -> PreferenceSplit:
        """The pairs a few-shot fit sees: at most ``shots`` random pairs per user (all where ``None``),
        drawn with ``seed`` from the whole split (before any sharding, so every DDP rank draws alike).

        The one place shots are drawn: the data module, ``FewShotModule`` and the sweeps call it.
        """
        if shots is None:
            return self
        return self.subset(sample_shots(self.users, shots, torch.Generator().manual_seed(seed)), name)

    def with_features(self, features: Tensor) -> PreferenceSplit:
        """The same pairs with other features (e.g. another dtype)."""
        return PreferenceSplit(features, self.users, self.user_ids, self.name, self.prompts, self.responses,
                               self.lengths)

    def loader(
        self, batch_size: int | None = None, shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> DataLoader:
        """A DataLoader of whole batches built by tensor indexing.

        ``batch_size=None`` gives the full split as one batch per epoch (the reference's
        full-batch optimisation). Otherwise batches of ``batch_size`` pairs, reshuffled each epoch
        when ``shuffle``. With ``world_size > 1`` each step's batch is split into disjoint,
        unpadded shards, and this loader yields rank ``rank``'s: the ranks together see exactly the
        one-process batches (``batch_size`` is the global batch size).
        """
        sampler = IndexBatchSampler(len(self), batch_size, shuffle, seed, rank, world_size)
        # batch_size=None: the loader does no collation; each sampled item is already a batch.
        return DataLoader(self, sampler=sampler, batch_size=None)


class IndexBatchSampler(DistributedSampler):
    """Yields ``ShardIndex``es (index tensors or slices), each turned into a batch by ``PreferenceSplit``.

    Every rank draws the same global order (same ``seed`` and epoch), splits it into step batches of
    ``batch_size`` and keeps its own contiguous shard of each: no padding, no duplicate, every
    rank has the same number of steps. It subclasses ``DistributedSampler`` only so that Lightning
    leaves it alone under DDP (``use_distributed_sampler`` wraps any other sampler in one that pads
    the last shard with duplicates); none of the parent's logic is used.
    """

    def __init__(
        self, size: int, batch_size: int | None, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if batch_size is not None and batch_size <= 0:
            raise ValueError(f"batch_size must be positive or None (full batch), got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        # No super().__init__: it would query torch.distributed and compute padded sizes.
        self.size = size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.num_replicas = world_size
        self.epoch = 0

    def __len__(self) -> int:
        if self.batch_size is None:
            return 1
        return -(-self.size // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[ShardIndex]:
        if self.batch_size is None:
            # contiguous shard of the whole split: a view, no copy
            yield ShardIndex(shard(self.size, self.rank, self.num_replicas), slice(None))
            return
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        self.epoch += 1  # reshuffles outside Lightning too (Lightning calls set_epoch each epoch)
        for step in order.split(self.batch_size):
            yield ShardIndex(step[shard(step.numel(), self.rank, self.num_replicas)], step)
