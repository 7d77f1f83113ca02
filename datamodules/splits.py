"""How users' pairs are cut into the protocol's roles: by prompt, by response, or by each user's own prompts.

The plan is computed from the table of rows alone (users, prompts, response ids, optional groups),
before anything is embedded, so that a split that cannot work fails in seconds, not after the
embedding. Every mode cuts validation the way it cuts test, and every kept user has training pairs
and test pairs; the plan says how many users and pairs it drops, and why.

- ``prompt``: whole prompts are held out for test (``test_fraction`` of them) and validation
  (``val_fraction`` of the training prompts), for everyone: no test prompt is anyone's training prompt.
- ``user_prompts``: each user's own prompts are divided into train / validation / test: a user is
  tested on prompts they never trained on, which other users may have trained on.
- ``response``: responses are held out: a test pair has both its responses held out, a training pair
  neither; pairs mixing the two are dropped (and counted). ``test_fraction`` is then the test share
  of the kept pairs (responses are held out, in a random order, until it is reached). No test
  response appears in any training pair.
- ``auto``: the first of prompt, user_prompts, response that keeps most users (see ``choose_mode``).

An optional group column ties rows together: pairs of one group never straddle train, validation
and test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from datamodules.base import ROLES
from lore_pl.errors import LoreDataError

SPLIT_MODES = ("prompt", "user_prompts", "response")
SPLIT_CHOICES = SPLIT_MODES + ("auto",)
#: under this many distinct prompts, holding out whole prompts rests validation and test on one or two of them
MIN_PROMPTS_FOR_PROMPT_SPLIT = 10
#: ``auto`` takes the first mode (prompt, user_prompts, response) that keeps this share of the most users any keeps
AUTO_KEEP_SHARE = 0.8

TRAIN, VAL, TEST, DROP = 0, 1, 2, -1
SIDE_ROLES = {"seen": {TRAIN: "seen_train", VAL: "seen_val", TEST: "seen_test"},
              "unseen": {TRAIN: "unseen_pool", VAL: "unseen_val", TEST: "unseen_test"}}


@rank_zero_only
def say(text: str) -> None:
    """Print once (rank 0): the split plan is for the person who started the run."""
    print(text, flush=True)


@dataclass
class PairRows:
    """The columns a split is planned from, one entry per pair.

    ``users``: user ids (str); ``prompts``, ``chosen``, ``rejected``: integer ids of the prompt and
    of the two responses; ``groups``: integer ids of the optional group column (or None).
    """

    users: np.ndarray
    prompts: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    groups: np.ndarray | None = None

    @classmethod
    def from_table(cls, table: dict[str, Any], group_key: str | None = None) -> PairRows:
        """The rows of a ``PairTable`` (``group`` is the prompt); ``group_key`` names the group column's list."""
        _, prompts = np.unique(np.asarray(table["group"], dtype=object).astype(str), return_inverse=True)
        groups = None
        if group_key is not None:
            _, groups = np.unique(np.asarray(table[group_key], dtype=object).astype(str), return_inverse=True)
        return cls(np.asarray(table["user"], dtype=object).astype(str), prompts.reshape(-1),
                   np.asarray(table["chosen"], dtype=np.int64), np.asarray(table["rejected"], dtype=np.int64),
                   None if groups is None else groups.reshape(-1))

    def __len__(self) -> int:
        return len(self.users)

    @property
    def user_index(self) -> np.ndarray:
        """Each row's user as an integer (the rank of its id)."""
        return np.unique(self.users, return_inverse=True)[1].reshape(-1)

    def subset(self, rows: np.ndarray) -> PairRows:
        return PairRows(self.users[rows], self.prompts[rows], self.chosen[rows], self.rejected[rows],
                        None if self.groups is None else self.groups[rows])


@dataclass
class SplitPlan:
    """Which rows play which role, and what was dropped on the way (for the printed plan)."""

    mode: str
    role_rows: dict[str, np.ndarray]
    users: int  # users in the file
    dropped_users: dict[str, int] = field(default_factory=dict)  # reason -> users
    dropped_pairs: dict[str, int] = field(default_factory=dict)  # reason -> pairs
    notes: list[str] = field(default_factory=list)
    reason: str = ""  # why ``auto`` chose this mode

    @property
    def kept_users(self) -> int:
        return self.users - sum(self.dropped_users.values())

    def trainable(self) -> bool:
        """Some seen user has training and test pairs."""
        return len(self.role_rows.get("seen_train", ())) > 0 and len(self.role_rows.get("seen_test", ())) > 0

    def has_validation(self) -> bool:
        return len(self.role_rows.get("seen_val", ())) + len(self.role_rows.get("unseen_val", ())) > 0

    def usable(self, val_fraction: float) -> bool:
        """Trainable, with the validation pairs asked for."""
        return self.trainable() and (val_fraction <= 0 or self.has_validation())

    def describe(self, rows: PairRows, source: str, asked: str) -> str:
        """The plan as printed: a header, one line per role, then what was dropped."""
        chosen = self.mode if asked == self.mode else f"{asked} -> {self.mode}"
        lines = [f"split plan for {source} (split_by: {chosen}" + (f"; {self.reason}" if self.reason else "") + "):",
                 f"  {'role':<12} {'users':>7} {'pairs':>8} {'prompts':>8} {'responses':>10}"]
        for role in ROLES:
            picked = self.role_rows.get(role)
            if picked is None or not len(picked):
                continue
            responses = np.unique(np.concatenate([rows.chosen[picked], rows.rejected[picked]])).size
            lines.append(f"  {role:<12} {np.unique(rows.users[picked]).size:>7,} {len(picked):>8,} "
                         f"{np.unique(rows.prompts[picked]).size:>8,} {responses:>10,}")
        if self.dropped_users:
            why = ", ".join(f"{count:,} {reason}" for reason, count in self.dropped_users.items())
            lines.append(f"  dropped users: {sum(self.dropped_users.values()):,} of {self.users:,} ({why})")
        if self.dropped_pairs:
            why = ", ".join(f"{count:,} {reason}" for reason, count in self.dropped_pairs.items())
            lines.append(f"  dropped pairs: {sum(self.dropped_pairs.values()):,} ({why})")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class SplitSettings:
    """The numbers every mode reads (the fractions as the data module was given them, and the seeds)."""

    test_fraction: float
    val_fraction: float
    seed: int
    val_seed: int


# ------------------------------------------------------------------------------------- units
def linked_units(keys: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
    """An id per row such that rows sharing a key, or a group, share the id (connected components)."""
    _, key_ids = np.unique(keys, return_inverse=True, axis=0) if keys.ndim > 1 else np.unique(keys,
                                                                                            return_inverse=True)
    key_ids = key_ids.reshape(-1)
    if groups is None:
        return key_ids
    offset = int(key_ids.max()) + 1 if key_ids.size else 0
    parent = np.arange(offset + (int(groups.max()) + 1 if groups.size else 0))

    def root(node: int) -> int:
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for key, group in set(zip(key_ids.tolist(), (groups + offset).tolist())):
        a, b = root(key), root(group)
        if a != b:
            parent[max(a, b)] = min(a, b)
    roots = np.asarray([root(int(key)) for key in range(offset)], dtype=np.int64)
    _, units = np.unique(roots[key_ids], return_inverse=True)
    return units.reshape(-1)


def draw_order(candidates: np.ndarray, seed: int) -> np.ndarray:
    """``candidates`` (sorted unique ids) in a random order drawn by ``seed`` (the validation draw)."""
    return candidates[torch.randperm(candidates.size, generator=torch.Generator().manual_seed(seed)).numpy()]


def hold_out_count(fraction: float, available: int) -> int:
    """Units to hold out: ``round(fraction * available)``, at least one and at most all but one."""
    if fraction <= 0 or available < 2:
        return 0
    return min(max(1, int(round(fraction * available))), available - 1)


def held_responses(rows: PairRows, order: np.ndarray, fraction: float) -> np.ndarray:
    """The shortest prefix of ``order`` (responses in a random order) whose held-out pairs (both
    responses in it) make at least ``fraction`` of the kept pairs (held-out or with neither response
    in it); the share grows with the prefix, so a bisection finds it."""
    def share(count: int) -> float:
        chosen, rejected = np.isin(rows.chosen, order[:count]), np.isin(rows.rejected, order[:count])
        held, kept = int((chosen & rejected).sum()), int((~chosen & ~rejected).sum())
        return held / max(held + kept, 1)

    low, high = 1, max(order.size - 1, 1)
    while low < high:
        middle = (low + high) // 2
        if share(middle) >= fraction:
            high = middle
        else:
            low = middle + 1
    return order[:low]


def release_for_users(users: np.ndarray, units: np.ndarray, held: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``held`` minus, for each user (integer ``users``) all of whose ``units`` it holds, that user's first
    unit in ``order`` (which then stays a training unit for everyone): no user loses every training pair."""
    if not held.size:
        return held
    rank = np.empty(int(order.max()) + 1, dtype=np.int64)
    rank[order] = np.arange(order.size)
    has_training = np.zeros(int(users.max()) + 1, dtype=bool)
    has_training[users[~np.isin(units, held)]] = True
    lacking = ~has_training[users]
    if not lacking.any():
        return held
    first = np.full(has_training.size, order.size)
    np.minimum.at(first, users[lacking], rank[units[lacking]])
    released = order[first[first < order.size]]
    return held[~np.isin(held, released)]


# ------------------------------------------------------------------------------------ modes
def prompt_sides(rows: PairRows, settings: SplitSettings) -> np.ndarray:
    """Whole prompts (joined with their groups) to test; the rest train (validation comes later)."""
    units = linked_units(rows.prompts, rows.groups)
    count = units.max() + 1 if units.size else 0
    # the order of sorted prompt texts shuffled by seed + 1 (the split earlier versions made)
    order = np.random.default_rng(settings.seed + 1).permutation(count)
    test = order[: int(settings.test_fraction * count)]
    return np.where(np.isin(units, test), TEST, TRAIN)


def user_prompt_sides(rows: PairRows, settings: SplitSettings) -> np.ndarray:
    """Each user's own prompts (joined with their groups): ``test_fraction`` of them to test, at least
    one and leaving at least one (two where validation is asked for and the user has three or more)."""
    users = rows.user_index
    units = linked_units(np.stack([users, rows.prompts], 1), rows.groups)
    side_of_unit = np.full(units.max() + 1 if units.size else 0, TRAIN)
    assigned = np.zeros(side_of_unit.size, dtype=bool)
    owned = np.unique(np.stack([users, units], 1), axis=0)  # (user, unit), sorted by user
    starts = np.searchsorted(owned[:, 0], np.arange(int(users.max()) + 2 if users.size else 1))
    rng = np.random.default_rng(settings.seed + 1)
    for user in rng.permutation(starts.size - 1):
        mine = owned[starts[user]:starts[user + 1], 1]
        if mine.size < 2:
            continue  # one prompt cannot be divided: the user is dropped (no test pairs)
        reserve = 1 if settings.val_fraction > 0 and mine.size >= 3 else 0
        want = min(max(1, int(math.floor(settings.test_fraction * mine.size + 0.5))), mine.size - 1 - reserve)
        have = int((side_of_unit[mine[assigned[mine]]] == TEST).sum())
        for unit in rng.permutation(mine):
            if have >= want:
                break
            if not assigned[unit]:
                side_of_unit[unit], have = TEST, have + 1
        assigned[mine] = True
    return side_of_unit[units]


def response_sides(rows: PairRows, settings: SplitSettings) -> np.ndarray:
    """Held-out responses: a pair with both held out is a test pair, with neither a training pair;
    pairs mixing the two are dropped."""
    responses = np.unique(np.concatenate([rows.chosen, rows.rejected]))
    order = np.random.default_rng(settings.seed + 1).permutation(responses)
    return response_side(rows, held_responses(rows, order, settings.test_fraction), TEST)


def response_side(rows: PairRows, held: np.ndarray, side: int) -> np.ndarray:
    """``side`` where both responses are ``held``, TRAIN where neither, DROP where one is."""
    chosen, rejected = np.isin(rows.chosen, held), np.isin(rows.rejected, held)
    return np.where(chosen & rejected, side, np.where(~chosen & ~rejected, TRAIN, DROP))


MIXED_TEST = "mixing a test and a training response"
SIDES = {"prompt": prompt_sides, "user_prompts": user_prompt_sides, "response": response_sides}


def validation_sides(mode: str, rows: PairRows, side: np.ndarray, settings: SplitSettings) -> tuple[np.ndarray, dict]:
    """Cut validation from the training rows the way the mode cut test; returns the new sides and
    the dropped pairs (by reason). Prompt-like modes never take a user's last training unit."""
    train = np.flatnonzero(side == TRAIN)
    side = side.copy()
    if settings.val_fraction <= 0 or not train.size:
        return side, {}
    part = rows.subset(train)
    if mode == "response":
        responses = np.unique(np.concatenate([part.chosen, part.rejected]))
        held = held_responses(part, draw_order(responses, settings.val_seed), settings.val_fraction)
        side[train] = response_side(part, held, VAL)
        return side, {"mixing a validation and a training response": int((side[train] == DROP).sum())}
    users = part.user_index
    if mode == "prompt":
        units = linked_units(part.prompts, part.groups)
    else:
        units = linked_units(np.stack([users, part.prompts], 1), part.groups)
    candidates = np.unique(units)
    order = draw_order(candidates, settings.val_seed)
    held = release_for_users(users, units, order[:hold_out_count(settings.val_fraction, candidates.size)], order)
    side[train[np.isin(units, held)]] = VAL
    return side, {}


def keep_groups_whole(rows: PairRows, side: np.ndarray) -> tuple[np.ndarray, int]:
    """Rows of a group on several sides: the group keeps its most common side, its other rows are dropped."""
    if rows.groups is None:
        return side, 0
    side = side.copy()
    live = side != DROP
    counts = np.zeros((int(rows.groups.max()) + 1, 3), dtype=np.int64)
    np.add.at(counts, (rows.groups[live], side[live]), 1)
    keep = counts.argmax(axis=1)
    straddling = live & (side != keep[rows.groups])
    side[straddling] = DROP
    return side, int(straddling.sum())


# ------------------------------------------------------------------------------------- plans
def plan_split(rows: PairRows, mode: str, seen: set[str], settings: SplitSettings,
               too_few: set[str] = frozenset()) -> SplitPlan:
    """The roles' rows for ``mode``; ``too_few``: users dropped up front (below ``min_pairs_per_user``)."""
    dropped_users = {"below min_pairs_per_user": len(too_few)} if too_few else {}
    dropped_pairs: dict[str, int] = {}
    inactive = np.isin(rows.users, list(too_few))
    side = SIDES[mode](rows, settings)  # drawn on every row: the draw does not depend on who is dropped
    dropped = {MIXED_TEST: int(((side == DROP) & ~inactive).sum())}
    side = np.where(inactive, DROP, side)
    side, straddling = keep_groups_whole(rows, side)
    add_counts(dropped_pairs, dropped, {"of a group on several sides": straddling})
    counted = set(too_few)  # users already counted as dropped
    side = drop_users_lacking(rows.users, side, dropped_users, counted, (TRAIN, "with no training pairs"),
                              (TEST, "with no test pairs"))
    side, dropped = validation_sides(mode, rows, side, settings)
    side, straddling = keep_groups_whole(rows, side)
    add_counts(dropped_pairs, dropped, {"of a group on several sides": straddling})
    side = drop_users_lacking(rows.users, side, dropped_users, counted,
                              (TRAIN, "with no training pairs left after validation"))
    is_seen = np.isin(rows.users, list(seen))
    role_rows = {}
    for population, mask in (("seen", is_seen), ("unseen", ~is_seen)):
        for value, role in SIDE_ROLES[population].items():
            role_rows[role] = np.flatnonzero(mask & (side == value))
    return SplitPlan(mode, role_rows, int(np.unique(rows.users).size), dropped_users, dropped_pairs)


def add_counts(total: dict[str, int], *parts: dict[str, int]) -> None:
    for part in parts:
        for reason, count in part.items():
            if count:
                total[reason] = total.get(reason, 0) + count


def drop_users_lacking(users: np.ndarray, side: np.ndarray, dropped: dict[str, int], counted: set[str],
                       *needs: tuple[int, str]) -> np.ndarray:
    """DROP every row of the users without a row on each needed side, counted in ``dropped`` by the
    first need they miss (users in ``counted`` were counted already; the set grows)."""
    side = side.copy()
    every = np.unique(users)
    live = np.unique(users[side != DROP])
    gone = [user for user in np.setdiff1d(every, live).tolist() if user not in counted]
    if gone:
        dropped["with every pair dropped"] = dropped.get("with every pair dropped", 0) + len(gone)
        counted |= set(gone)
    for needed, reason in needs:
        lacking = [user for user in np.setdiff1d(live, np.unique(users[side == needed])).tolist()
                   if user not in counted]
        if lacking:
            dropped[reason] = dropped.get(reason, 0) + len(lacking)
            side[np.isin(users, lacking)] = DROP
            counted |= set(lacking)
    return side


# -------------------------------------------------------------------------------------- auto
def describe_shape(rows: PairRows) -> dict[str, int]:
    """Counts that decide which split can work: users, prompts, users with one prompt, prompts per user."""
    per_user = {}
    for user, _ in set(zip(rows.users.tolist(), rows.prompts.tolist())):
        per_user[user] = per_user.get(user, 0) + 1
    counts = np.asarray(list(per_user.values()))
    return {"users": len(per_user), "prompts": int(np.unique(rows.prompts).size),
            "one_prompt_users": int((counts == 1).sum()),
            "median_prompts": int(np.median(counts)) if len(counts) else 0}


def one_prompt_words(shape: dict[str, int]) -> str:
    if shape["prompts"] == 1:
        return "the file has one prompt"
    if shape["one_prompt_users"] == shape["users"]:
        return f"every one of {shape['users']:,} users has pairs on one prompt only"
    return f"{shape['one_prompt_users']:,} of {shape['users']:,} users have pairs on one prompt only"


def choose_mode(rows: PairRows, plans: dict[str, SplitPlan], val_fraction: float) -> tuple[str, str]:
    """(mode, why): prompt where whole prompts can be held out (enough prompts, and it keeps nearly
    as many users as the best mode), else user_prompts, else response."""
    shape = describe_shape(rows)
    kept = {mode: plan.kept_users if plan.usable(val_fraction) else 0 for mode, plan in plans.items()}
    best = max(kept.values())
    if best == 0:
        return "prompt", ""  # nothing works: the caller names why
    words = {"prompt": "holding out whole prompts", "user_prompts": "dividing each user's own prompts",
             "response": "holding out responses"}
    why_not = []
    for mode in SPLIT_MODES:
        if mode == "prompt" and shape["prompts"] < MIN_PROMPTS_FOR_PROMPT_SPLIT:
            why_not.append(f"only {shape['prompts']} distinct prompt(s), fewer than {MIN_PROMPTS_FOR_PROMPT_SPLIT}")
            continue
        if kept[mode] >= AUTO_KEEP_SHARE * best:
            reason = f"{words[mode]} keeps {kept[mode]:,} of {shape['users']:,} users"
            if mode == "prompt":
                reason = f"{shape['prompts']:,} prompts, {shape['median_prompts']} per user (median): " + reason
            return mode, "; ".join(why_not + [reason])
        why_not.append(f"{words[mode]} keeps {kept[mode]:,}" + (
            " (no validation pairs)" if plans[mode].trainable() and not kept[mode] else "") + (
            f" ({one_prompt_words(shape)})" if shape["one_prompt_users"] and mode != "response" else ""))
    raise AssertionError("unreachable: response is taken when it keeps the most users")


def impossible_error(source: str, asked: str, rows: PairRows, plans: dict[str, SplitPlan],
                     val_fraction: float) -> LoreDataError:
    """One line: what leaves no user trainable, the count that makes it so, and the modes that fit."""
    shape = describe_shape(rows)
    failed = plans.get(asked)
    fits = [mode for mode, plan in plans.items() if plan.usable(val_fraction) and mode != asked]
    cause = one_prompt_words(shape) if shape["one_prompt_users"] else (
        f"{shape['users']:,} user(s), {shape['prompts']:,} prompt(s)")
    if failed is not None and failed.dropped_users:
        cause += "; dropped: " + ", ".join(f"{n:,} {why}" for why, n in failed.dropped_users.items())
    what = f"split_by: {asked} leaves no user" if asked != "auto" else "no split_by leaves a user"
    if fits:
        advice = f"use split_by: {' or '.join(fits)}"
    elif shape["users"] < 2:
        advice = "seen users train the basis and unseen users test it: give the file more users"
    else:
        advice = "give users more pairs, on more prompts or responses"
    return LoreDataError(f"{source}: {what} with training and test pairs ({cause}); {advice}")


def empty_validation_error(source: str, plan: SplitPlan, val_fraction: float,
                           plans: dict[str, SplitPlan]) -> LoreDataError:
    why = {"prompt": "no prompt can be held out without taking some user's last training prompt",
           "user_prompts": "no user has a training prompt to spare",
           "response": "no kept pair has both its responses held out"}[plan.mode]
    fits = [mode for mode, other in plans.items() if other.usable(val_fraction) and mode != plan.mode]
    other = f"split_by: {' or '.join(fits)}" if fits else "more pairs per user"
    return LoreDataError(f"{source}: split_by: {plan.mode} with val_fraction={val_fraction} holds out no validation "
                         f"pairs ({why}); use {other}, or val_fraction: 0 for no validation")


def make_plan(rows: PairRows, asked: str, seen: set[str], settings: SplitSettings, source: str,
              too_few: set[str] = frozenset()) -> SplitPlan:
    """The plan for ``asked`` (a mode or ``auto``); a ``LoreDataError`` where no user would be trainable
    or validation would be empty."""
    if asked not in SPLIT_CHOICES:
        raise LoreDataError(f"split_by must be one of {', '.join(SPLIT_CHOICES)}, got {asked!r}")
    plans = {mode: plan_split(rows, mode, seen, settings, too_few) for mode in SPLIT_MODES}
    mode, reason = (asked, "") if asked != "auto" else choose_mode(rows, plans, settings.val_fraction)
    plan = plans[mode]
    if not plan.trainable():
        raise impossible_error(source, asked, rows, plans, settings.val_fraction)
    plan.reason = reason
    if settings.val_fraction > 0 and not plan.has_validation():
        raise empty_validation_error(source, plan, settings.val_fraction, plans)
    if not len(plan.role_rows["unseen_test"]):
        plan.notes.append("no unseen user has pool and test pairs: the protocol's unseen-user rows will be missing")
    return plan


def fixed_plan(rows: PairRows, role_rows: dict[str, np.ndarray], mode: str, source: str) -> SplitPlan:
    """The plan of a data set whose split is fixed (a paper's protocol): users outside every role are
    counted as dropped; a ``LoreDataError`` where no seen user has training and test pairs."""
    every = np.unique(rows.users)
    kept = np.unique(rows.users[np.concatenate([np.asarray(r, dtype=np.int64) for r in role_rows.values()])])
    dropped = {"outside the data set's split": int(every.size - kept.size)} if every.size > kept.size else {}
    plan = SplitPlan(mode, {role: np.asarray(role_rows.get(role, []), dtype=np.int64) for role in ROLES},
                     int(every.size), dropped)
    if not plan.trainable():
        raise LoreDataError(f"{source}: the data set's split ({mode}) leaves no seen user with training and test "
                            f"pairs ({every.size:,} users, {np.unique(rows.prompts).size:,} prompts in the source)")
    return plan
