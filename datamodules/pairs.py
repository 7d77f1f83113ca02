"""Rows of (user, chosen item, rejected item, prompt group) -> the protocol's four splits."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from datamodules.base import PreferenceData
from lore_pl.data.preferences import PreferenceSplit


class ItemIndex:
    """Deduplicated items ``[messages, response]``; ``add`` returns an item's row in the cache."""

    def __init__(self) -> None:
        self.items: list[list[Any]] = []
        self._rows: dict[str, int] = {}

    def add(self, messages: list[dict[str, str]], response: str) -> int:
        item = [messages, response]
        key = json.dumps(item, sort_keys=True, ensure_ascii=False)
        if key not in self._rows:
            self._rows[key] = len(self.items)
            self.items.append(item)
        return self._rows[key]


class PairTable:
    """Column lists of pairs: ``user``, ``chosen``/``rejected`` (item rows), ``group`` (the prompt:
    pairs of one group never straddle train and test), ``source`` (the upstream split, or "")."""

    COLUMNS = ("user", "chosen", "rejected", "group", "source")

    def __init__(self) -> None:
        self.columns: dict[str, list[Any]] = {name: [] for name in self.COLUMNS}

    def append(self, user: str, chosen: int, rejected: int, group: str, source: str = "") -> None:
        for name, value in zip(self.COLUMNS, (user, chosen, rejected, group, source)):
            self.columns[name].append(value)

    def to_json(self) -> dict[str, list[Any]]:
        return self.columns


def shuffled(values: Iterable[str], seed: int) -> list[str]:
    """``values`` sorted, then permuted by ``seed`` (independent of the input order)."""
    ordered = sorted(set(values))
    return [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]


def split_fraction(values: Iterable[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Shuffle ``values`` by ``seed``; the first ``floor(fraction * n)`` and the rest (as the reference cuts)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    order = shuffled(values, seed)
    cut = int(fraction * len(order))
    return order[:cut], order[cut:]


def cap_per_user(rows: np.ndarray, users: np.ndarray, cap: int | None, seed: int) -> np.ndarray:
    """At most ``cap`` of each user's ``rows``, drawn at random with ``seed`` (all where fewer)."""
    if cap is None:
        return rows
    rng = np.random.default_rng(seed)
    order = rows[rng.permutation(rows.size)]
    kept, counts = [], {}
    for row in order:  # one pass over the rows when the splits are built, not in training
        user = users[row]
        if counts.get(user, 0) < cap:
            counts[user] = counts.get(user, 0) + 1
            kept.append(row)
    return np.sort(np.asarray(kept, dtype=np.int64))


def build_preference_data(table: dict[str, list[Any]], embeddings: Tensor, reference_head: Tensor | None,
                          role_rows: dict[str, np.ndarray], item_lengths: np.ndarray | None = None) -> PreferenceData:
    """Splits whose features are ``e(chosen) - e(rejected)``, gathered by tensor indexing.

    ``role_rows[role]`` are the table rows of that role. The seen roles share one user table, the
    unseen roles another (sorted user ids). Each pair's prompt (its ``group``) becomes an id shared
    by every split; each response's item row is its id (``PreferenceSplit.responses``), and
    ``item_lengths[item]`` (the response's length in characters, where given) its length
    (``PreferenceSplit.lengths``).
    """
    users = np.asarray(table["user"], dtype=object)
    _, prompt_ids = np.unique(np.asarray(table["group"], dtype=object).astype(str), return_inverse=True)
    chosen = torch.as_tensor(table["chosen"], dtype=torch.long)
    rejected = torch.as_tensor(table["rejected"], dtype=torch.long)
    lengths = None if item_lengths is None else torch.as_tensor(np.asarray(item_lengths), dtype=torch.float32)
    splits = {}
    for population in ("seen", "unseen"):
        roles = [r for r in role_rows if r.startswith(population) and len(role_rows[r])]
        user_ids = sorted({users[row] for role in roles for row in role_rows[role]})
        position = {user: i for i, user in enumerate(user_ids)}
        for role in roles:
            rows = torch.as_tensor(role_rows[role], dtype=torch.long)
            features = embeddings[chosen[rows]] - embeddings[rejected[rows]]
            user_rows = torch.as_tensor([position[users[row]] for row in role_rows[role]], dtype=torch.long)
            splits[role] = PreferenceSplit(features.float(), user_rows, user_ids, name=role,
                                           prompts=torch.as_tensor(prompt_ids[role_rows[role]], dtype=torch.long),
                                           responses=torch.stack([chosen[rows], rejected[rows]], dim=1),
                                           lengths=None if lengths is None else torch.stack(
                                               [lengths[chosen[rows]], lengths[rejected[rows]]], dim=1))
    if not splits:
        raise ValueError("no pairs are left after the split rules")
    return PreferenceData(splits, reference_head=reference_head)


def drop_users_without(role_rows: dict[str, np.ndarray], users: np.ndarray, first: str, second: str) -> None:
    """Keep in ``first`` and ``second`` only the users that have pairs in both (in place)."""
    both = set(users[role_rows[first]]) & set(users[role_rows[second]])
    for role in (first, second):
        rows = role_rows[role]
        role_rows[role] = rows[np.isin(users[rows], list(both))] if both else rows[:0]


def leak_free(role_rows: dict[str, np.ndarray], groups: np.ndarray) -> None:
    """Drop test pairs whose prompt is in any training pair (in place): test prompts stay unseen."""
    trained = set(
        groups[np.concatenate([role_rows.get("seen_train", []), role_rows.get("unseen_pool", [])]).astype(int)]
    )
    for role in ("seen_test", "unseen_test"):
        rows = role_rows[role]
        role_rows[role] = rows[~np.isin(groups[rows], list(trained))]
