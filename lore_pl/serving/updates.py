"""A user update as a journal record, and its replay: both go through ``PersonalRewardModel``'s one
solver (``personalize`` / ``observe``) or ``forget``, on the embeddings the server computed once."""

from __future__ import annotations

import warnings

import torch

from lore_pl.errors import LoreDataError, LoreDataWarning
from lore_pl.inference import PersonalRewardModel
from lore_pl.serving.journal import decode_tensor, encode_tensor

#: the keyword arguments of ``personalize`` a request may set, with their types
PERSONALIZE_OPTIONS = {"steps": int, "lr": float, "init": str, "prior_strength": float, "seed": int}
#: how far replayed weights may stray from the acknowledged ones before a warning says so
REPLAY_TOLERANCE = 1e-5


def apply_update(model: PersonalRewardModel, record: dict) -> torch.Tensor | None:
    """Apply one update (a record without ``seq``, or read back from the journal) to ``model``; returns
    the user's weights ``[K]`` (None after ``forget``)."""
    user, where = record["user"], record.get("where", "the update")
    if record["op"] == "forget":
        model.forget(user)
        return None
    if record["op"] == "personalize":
        chosen = decode_tensor(record["chosen"], f"{where}: chosen")
        rejected = decode_tensor(record["rejected"], f"{where}: rejected")
        return model.personalize(user, chosen, rejected, **record.get("options", {}))
    pair = decode_tensor(record["pair"], f"{where}: pair")
    return model.observe(user, pair, int(record["choice"]))


def replay(model: PersonalRewardModel, records) -> int:
    """Apply journal records to ``model`` in order; a record whose replayed weights differ from those it
    acknowledged is said (a ``LoreDataWarning``), one that cannot apply is refused by its number."""
    count = 0
    for record in records:
        try:
            weights = apply_update(model, record)
        except (KeyError, ValueError, LoreDataError) as error:
            raise LoreDataError(f"{record['where']} ({record['op']} {record['user']!r}) does not replay: "
                                f"{error}") from None
        if weights is not None and "weights" in record:
            acknowledged = torch.tensor(record["weights"], dtype=weights.dtype)
            if acknowledged.shape != weights.shape or not torch.allclose(weights, acknowledged, atol=REPLAY_TOLERANCE):
                warnings.warn(f"{record['where']}: replayed weights of {record['user']!r} differ from the acknowledged "
                              f"ones by more than {REPLAY_TOLERANCE:g}", LoreDataWarning, stacklevel=2)
        count += 1
    return count


def personalize_record(user: str, chosen: torch.Tensor, rejected: torch.Tensor, options: dict) -> dict:
    return {"op": "personalize", "user": user, "chosen": encode_tensor(chosen), "rejected": encode_tensor(rejected),
            "options": options}


def observe_record(user: str, pair: torch.Tensor, choice: int) -> dict:
    return {"op": "observe", "user": user, "pair": encode_tensor(pair), "choice": int(choice)}


def forget_record(user: str) -> dict:
    return {"op": "forget", "user": user}
