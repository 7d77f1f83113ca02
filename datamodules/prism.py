"""PRISM: multi-turn conversations where each user picked one of several model replies per turn."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import Tensor

from datamodules.base import PreferenceData
from datamodules.embedded import HubPreferenceDataModule
from datamodules.pairs import ItemIndex, PairTable, build_preference_data, split_fraction
from datamodules.sources import find_files, read_all


def conversation_pairs(conversation: dict[str, Any]) -> list[tuple[list[dict[str, str]], str, str]]:
    """(prompt messages, chosen reply, one rejected reply) for every rejected reply of every turn.

    The prompt is the conversation so far: every earlier user turn and the reply the user chose,
    then this turn's user message. Each rejected reply is its own pair, a plain string like the
    chosen one (the reference embedded the list of rejected replies as one string, leaking the label).
    """
    turns: dict[int, list[dict[str, Any]]] = {}
    for message in conversation["conversation_history"]:
        turns.setdefault(int(message["turn"]), []).append(message)
    history: list[dict[str, str]] = []
    pairs = []
    for turn in sorted(turns):
        users = [m for m in turns[turn] if m["role"] == "user"]
        replies = [m for m in turns[turn] if m["role"] != "user"]  # every non-user turn is a model reply
        chosen = [m for m in replies if m.get("if_chosen")]
        if not users or len(chosen) != 1:
            break  # an unfinished turn ends the usable conversation
        history = history + [{"role": "user", "content": m["content"]} for m in users]
        for reply in replies:
            if not reply.get("if_chosen") and reply["content"] and reply["content"] != chosen[0]["content"]:
                pairs.append((list(history), chosen[0]["content"], reply["content"]))
        history = history + [{"role": "assistant", "content": chosen[0]["content"]}]
    return pairs


class PRISMDataModule(HubPreferenceDataModule):
    """``HannahRoseKirk/prism-alignment``: ``survey.jsonl`` (the participants) and
    ``conversations.jsonl`` (each conversation's ``conversation_history``: user turns and the model
    replies of each turn, one with ``if_chosen``). ``utterances.jsonl`` holds the same replies one
    per row and is not needed.

    The split: users in the survey with a conversation and more than ``min_dialogs`` dialogs;
    shuffled (``seed``) into ``seen_fraction`` seen and the rest unseen; each user's dialogs
    shuffled (``seed``) and split ``train_fraction`` / rest into train (the seen users' training
    pairs, the unseen users' few-shot pool) and test. A dialog's pairs never straddle the split.

    Args:
        source: the Hub data set id, or a local directory holding ``survey`` and ``conversations``
            ``.jsonl`` files in the upstream schema.
        revision: the Hub revision (a commit hash pins the data).
        seed: seed of the user split and the dialog split (123 in the paper).
        seen_fraction: fraction of users who train the basis (0.8 in the paper).
        min_dialogs: users need more than this many dialogs (5 in the paper).
        train_fraction: fraction of each user's dialogs used for training (0.5 in the paper).
        **kwargs: the loading arguments of ``EmbeddedPreferenceDataModule`` (batch sizes, shuffling,
            the validation hold-out, the cache and the embedder).
    """

    allow_patterns = ["survey.jsonl", "conversations.jsonl"]

    def __init__(
        self,
        source: str = "HannahRoseKirk/prism-alignment",
        revision: str = "main",
        seed: int = 123,
        seen_fraction: float = 0.8,
        min_dialogs: int = 5,
        train_fraction: float = 0.5,
        **kwargs,
    ) -> None:
        super().__init__(source=source, revision=revision, seed=seed, **kwargs)
        self.seen_fraction, self.min_dialogs, self.train_fraction = seen_fraction, min_dialogs, train_fraction

    def read_source(self) -> tuple[list[Any], dict[str, Any]]:
        root = self.source_root[0]
        participants = {str(row["user_id"]) for row in read_all(find_files(root, "survey"))}
        items, table = ItemIndex(), PairTable()
        for conversation in read_all(find_files(root, "conversations")):
            user = str(conversation["user_id"])
            if user not in participants:
                continue
            for messages, chosen, rejected in conversation_pairs(conversation):
                table.append(
                    user,
                    items.add(messages, chosen),
                    items.add(messages, rejected),
                    str(conversation["conversation_id"]),
                )
        return items.items, table.to_json()

    def plan_splits(self, table: dict[str, Any]) -> None:
        self.report_fixed_split(table, self.split_rows(table), "user_prompts: each user's dialogs")

    def build(self, table: dict[str, Any], embeddings: Tensor, reference_head: Tensor | None) -> PreferenceData:
        return build_preference_data(table, embeddings, reference_head, self.split_rows(table),
                                     self.response_lengths())

    def split_rows(self, table: dict[str, Any]) -> dict[str, np.ndarray]:
        """The table rows of each role (the paper's split, from the table alone)."""
        users = np.asarray(table["user"], dtype=object)
        dialogs = np.asarray(table["group"], dtype=object)
        dialogs_of: dict[str, set[str]] = {}
        for user, dialog in zip(users, dialogs):
            dialogs_of.setdefault(user, set()).add(dialog)
        # the reference's order: split every user 80/20 first, then keep those with enough dialogs
        seen_all, unseen_all = split_fraction(list(dialogs_of), self.seen_fraction, self.seed)
        eligible = [u for u in dialogs_of if len(dialogs_of[u]) > self.min_dialogs]
        seen = [u for u in seen_all if u in set(eligible)]
        unseen = [u for u in unseen_all if u in set(eligible)]
        train_dialogs = []
        for user in eligible:
            train, _ = split_fraction(dialogs_of[user], self.train_fraction, self.seed)
            train_dialogs += train
        is_train = np.isin(dialogs, train_dialogs)
        is_seen, is_unseen = np.isin(users, seen), np.isin(users, unseen)
        role_rows = {
            "seen_train": np.flatnonzero(is_seen & is_train),
            "seen_test": np.flatnonzero(is_seen & ~is_train),
            "unseen_pool": np.flatnonzero(is_unseen & is_train),
            "unseen_test": np.flatnonzero(is_unseen & ~is_train),
        }
        return role_rows
