"""The diagnosis of personal signal: do people differ, and can the features see it?

Three measurements, then one verdict in plain words (the rules: ``verdict``):

(a) agreement: on pairs judged by several users, how often two of them agree (``pair_agreement``);
(b) personal signal on responses seen in training: a per-user crowd (each user's own record of a
    response, shrunk to the crowd's) against the crowd, on the test pairs whose user judged one of
    its responses in training; its gain is the upper bound of what knowing the user adds on
    responses already judged (``personal_signal``);
(c) personalization on unseen responses: the model against one shared model (K=1), the gain the
    protocol measures on unseen users' unseen prompts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lore_pl.core.baselines import crowd_logits, pair_agreement, personal_crowd_logits
from lore_pl.core.stats import mean_std_over_users, paired_bootstrap, per_user_accuracy

#: "people agree" needs (b)'s interval to end below this: knowing the user adds at most 2 points of
#: accuracy even on responses they judged; a wider interval is too few pairs to tell
AGREE_MARGIN = 0.02
#: (b) decides the verdict only from this many users on, with an interval at most this wide
MIN_USERS = 10
MAX_INTERVAL_WIDTH = 0.2

CASES = {
    "helps": "personalization helps",
    "differ": "people differ but the features cannot see it (better features or more pairs per user)",
    "agree": "people agree (one reward model is right)",
    "unknown": "cannot tell whether people differ",
}


def mean_over_users(per_user: Tensor) -> float | None:
    mean, _ = mean_std_over_users(per_user)
    return None if math.isnan(mean) else mean


def personal_signal(train_responses: Tensor, train_users: Tensor, test_responses: Tensor, test_users: Tensor,
                    num_users: int, seed: int = 0) -> dict[str, float | int | None]:
    """(b): the per-user crowd against the crowd on the covered test pairs, both from the training pairs.

    Returns ``coverage`` (share of test pairs covered), ``pairs`` (covered pairs), ``personal`` and
    ``crowd`` (mean over users of per-user accuracy on them, ties counting half), and the gain with its
    95% paired-bootstrap interval over users (``gain``, ``low``, ``high``, ``users``); None where no test
    pair is covered.
    """
    personal, covered = personal_crowd_logits(train_responses, train_users, test_responses, test_users)
    crowd = crowd_logits(train_responses, test_responses)
    test_users = torch.as_tensor(test_users).long()
    result: dict[str, float | int | None] = {
        "coverage": float(covered.double().mean()) if covered.numel() else None,
        "pairs": int(covered.sum()), "personal": None, "crowd": None, "gain": None, "low": None, "high": None,
        "users": 0,
    }
    if not bool(covered.any()):
        return result
    users = test_users[covered]
    mine = per_user_accuracy(personal[covered], users, num_users, tie_credit=0.5)
    theirs = per_user_accuracy(crowd[covered], users, num_users, tie_credit=0.5)
    result.update(personal=mean_over_users(mine), crowd=mean_over_users(theirs),
                  **paired_bootstrap(mine, theirs, seed=seed))
    return result


def above_zero(gain: dict | None) -> bool:
    """Whether a gain's 95% interval lies above 0 (a measured, finite lower end > 0)."""
    return measured(gain) and gain["low"] > 0


def measured(gain: dict | None) -> bool:
    return gain is not None and gain.get("low") is not None and math.isfinite(gain["low"])


def decisive(gain: dict | None) -> bool:
    """Whether (b) was measured on enough users, with an interval narrow enough, to decide on: a
    bootstrap over one or two users has an interval of no width, and a wide one says nothing."""
    return (measured(gain) and gain.get("users", 0) >= MIN_USERS
            and gain["high"] - gain["low"] <= MAX_INTERVAL_WIDTH)


def interval(gain: dict) -> str:
    return f"{gain['gain']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}]"


def verdict(personal: dict | None, personalization: dict | None) -> tuple[str, str]:
    """(case, sentence): the first rule that holds, in this order.

    1. ``helps``: the model's gain over one shared model (c) has its 95% interval above 0.
    2. ``differ``: otherwise, the per-user crowd's gain over the crowd (b) has its interval above 0:
       users' own past judgments predict them better than everyone's, so there is personal signal,
       but the model does not carry it to unseen responses (without (c), no fit: "people differ").
    3. ``agree``: otherwise, where (b)'s interval ends below ``AGREE_MARGIN`` (+0.02): knowing the user
       adds at most that to the crowd, on the responses where it could; one reward model is right.
       Rules 2 and 3 read (b) only where it is ``decisive``: at least ``MIN_USERS`` users and an
       interval at most ``MAX_INTERVAL_WIDTH`` wide.
    4. ``unknown``: otherwise: (b) could not be measured (no test pair has a response its user judged
       in training) or its interval is too wide to tell, and (c) shows no gain.
    """
    if above_zero(personalization):
        return "helps", f"{CASES['helps']} (by {interval(personalization)} over one shared model)"
    if decisive(personal) and above_zero(personal):
        evidence = f"a user's own record beats the crowd by {interval(personal)}"
        if personalization is None:  # no fit: whether the features see it is not measured
            return "differ", f"people differ: {evidence}; whether the features can see it, a fit's protocol tells"
        return "differ", f"{CASES['differ']}: {evidence}"
    if decisive(personal) and personal["high"] < AGREE_MARGIN:
        return "agree", f"{CASES['agree']}: a user's own record adds {interval(personal)} to the crowd"
    if measured(personal):
        return "unknown", (f"{CASES['unknown']}: a user's own record adds {interval(personal)} to the crowd, "
                           f"on {personal['pairs']} test pairs of {personal['users']} users: too few to tell; "
                           "gather more pairs per user on shared responses")
    return "unknown", (f"{CASES['unknown']}: no test pair has a response its user judged in training, and "
                       "personalization shows no gain; hold out pairs so that users' responses recur "
                       "(lore-pl-diagnose FILE), or gather more pairs per user")


def diagnose(judged_responses: Tensor, judged_users: Tensor, train_responses: Tensor, train_users: Tensor,
             test_responses: Tensor, test_users: Tensor, num_users: int, personalization: dict | None = None,
             seed: int = 0) -> dict:
    """(a), (b), (c) and the verdict.

    ``judged_*``: every judgment there is (any split) for (a); ``train_*`` / ``test_*``: the training
    pairs (what the crowd may know) and the test pairs for (b); users are rows of one table of
    ``num_users``; ``personalization``: (c), a gain dict ``{"gain", "low", "high"}`` or None.
    """
    personal = personal_signal(train_responses, train_users, test_responses, test_users, num_users, seed=seed)
    case, sentence = verdict(personal, personalization)
    return {
        "agreement": pair_agreement(judged_responses, judged_users),
        "personal": personal,
        "personalization": personalization,
        "case": case,
        "verdict": sentence,
    }


def format_diagnosis(diagnosis: dict) -> str:
    """The report's section: one line per measurement, then the verdict."""
    agreement, personal, gain = diagnosis["agreement"], diagnosis["personal"], diagnosis["personalization"]
    if agreement["agreement"] is None:
        first = "(a) agreement between users on the same pair: n/a (no pair is judged by two users)"
    else:
        kappa = "n/a" if agreement["kappa"] is None else f"{agreement['kappa']:+.4f}"
        first = (f"(a) agreement between users on the same pair: {agreement['agreement']:.4f} (chance "
                 f"{agreement['chance']:.4f}, Fleiss kappa {kappa}; {agreement['shared_pairs']} pairs "
                 f"judged by several users, {agreement['judgments']} judgments)")
    if measured(personal):
        second = (f"(b) personal signal on responses seen in training: own record {personal['personal']:.4f} vs crowd "
                  f"{personal['crowd']:.4f}, gain {interval(personal)} ({personal['users']} users, "
                  f"{personal['pairs']} test pairs, {personal['coverage']:.1%} of them)")
    else:
        second = "(b) personal signal on responses seen in training: n/a (no test pair has a response its user judged)"
    third = ("(c) personalization on unseen responses: n/a" if not measured(gain)
             else f"(c) personalization on unseen responses: {interval(gain)} over one shared model (K=1)")
    return "\n".join(["diagnosis of personal signal:", "  " + first, "  " + second, "  " + third,
                      "  verdict: " + diagnosis["verdict"]])
