"""``lore-pl-diagnose FILE``: do the people in a preference file differ? Measured before any embedding or fit.

Reads the file as ``PreferenceFileDataModule`` does (same columns, same checks), holds out
``test_fraction`` of each user's pairs at random, and prints (a) the agreement between users on the
same pair and (b) the personal signal on responses seen in training, with the verdict of
``lore_pl.core.diagnosis`` ((c), personalization on unseen responses, needs a fit: the protocol run
reports it). Holding out pairs, not prompts, is what lets a user's test responses recur in their
training pairs, so (b) can be measured whatever split the fit uses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from datamodules.preference_file import parse_rows
from datamodules.sources import read_records
from datamodules.splits import hold_out_count
from lore_pl.core.diagnosis import diagnose, format_diagnosis
from lore_pl.data.atomic import write_json_atomic
from lore_pl.data.outputs import OutputKind, claim_outputs, json_field_is
from lore_pl.errors import LoreDataError

#: what ``--json`` writes: replaced without asking only where an earlier diagnosis wrote it
DIAGNOSIS_JSON = OutputKind("lore-pl-diagnose", json_field_is("command", "lore-pl-diagnose"),
                            "a diagnosis JSON written by lore-pl-diagnose", "remove it first, or choose another path")


def held_out_pairs(users: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """``[N]`` bool: ``round(fraction * n_u)`` random pairs of each user u with two or more pairs."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(users.numel(), generator=generator)
    order = order[torch.argsort(users[order], stable=True)]  # each user's pairs together, in random order
    counts = torch.bincount(users)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(users)
    rank[order] = torch.arange(users.numel()) - start[users[order]]
    # the splits' rule: at least one held out and one kept (a user with no training pair tells nothing)
    wanted = torch.tensor([hold_out_count(fraction, int(count)) for count in counts.tolist()], dtype=torch.long)
    return rank < wanted[users]


def diagnose_file(path: Path, columns: dict[str, str], test_fraction: float = 0.5, seed: int = 0) -> dict:
    """The diagnosis ((a), (b) and the verdict) of the preference file at ``path``."""
    if not 0.0 < test_fraction < 1.0:
        raise LoreDataError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not path.is_file():
        raise LoreDataError(f"preference file {path} does not exist")
    _, table = parse_rows(path, read_records(path), columns)
    user_ids = sorted(set(table["user"]))
    row = {user: i for i, user in enumerate(user_ids)}
    users = torch.tensor([row[user] for user in table["user"]], dtype=torch.long)
    responses = torch.tensor([table["chosen"], table["rejected"]], dtype=torch.long).T
    test = held_out_pairs(users, test_fraction, seed)
    result = diagnose(responses, users, responses[~test], users[~test], responses[test], users[test], len(user_ids),
                      seed=seed)
    result.update(file=str(path), users=len(user_ids), pairs=int(users.numel()), test_pairs=int(test.sum()))
    return result


def main(args: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lore-pl-diagnose", description=__doc__.split("\n")[0])
    parser.add_argument("path", help="the preference file (.jsonl, .json, .parquet or .csv)")
    for field, default in (("user", "user_id"), ("prompt", "prompt"), ("chosen", "chosen"), ("rejected", "rejected")):
        parser.add_argument(f"--{field}_column", default=default)
    parser.add_argument("--test_fraction", type=float, default=0.5, help="share of each user's pairs held out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the diagnosis to this JSON file")
    options = parser.parse_args(args)
    columns = {"user_id": options.user_column, "prompt": options.prompt_column, "chosen": options.chosen_column,
               "rejected": options.rejected_column}
    from lore_pl.cli import user_errors_in_one_line

    with user_errors_in_one_line():
        outputs = [options.json] if options.json else []
        with claim_outputs(outputs, DIAGNOSIS_JSON, inputs=[options.path]):  # checked before the file is read
            result = diagnose_file(Path(options.path).expanduser(), columns, options.test_fraction, options.seed)
            print(f"{result['file']}: {result['users']} users, {result['pairs']} pairs, {result['test_pairs']} held "
                  f"out ({options.test_fraction:.0%} of each user's pairs, seed {options.seed})")
            print(format_diagnosis(result))
            if options.json:
                write_json_atomic(options.json, {"command": DIAGNOSIS_JSON.command, **result})
                print(f"written: {options.json}")


if __name__ == "__main__":
    main()
