"""The skeptic's baselines: rules that read which response won and how long it is, never the features.

Every function returns one score difference per pair (``[N]``, chosen minus rejected, like a logit):
positive predicts the chosen response, negative the rejected one, zero is a tie (scored as a coin
flip by ``per_user_accuracy(..., tie_credit=0.5)``). Responses are the integer ids of
``PreferenceSplit.responses`` (``[N, 2]``: chosen, rejected; the same id is the same text in every split).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lore_pl.core.finite import all_finite, non_finite_rows
from lore_pl.errors import LoreDataError

#: Laplace smoothing of a win-rate: one pseudo-win and one pseudo-loss, so an unseen response has 0.5
CROWD_SMOOTHING = 1.0
#: how many of the crowd's judgments one user's own prior judgments of a response are weighed against
PERSONAL_SHRINKAGE = 2.0


def check_responses(responses: Tensor, name: str = "responses") -> Tensor:
    """``responses`` as a long ``[N, 2]`` tensor of non-negative ids, or a clear error."""
    responses = torch.as_tensor(responses)
    if responses.ndim != 2 or responses.shape[1] != 2:
        raise LoreDataError(f"{name} must be [N, 2] (chosen, rejected response ids), got {tuple(responses.shape)}")
    if responses.is_floating_point() or responses.is_complex():
        raise LoreDataError(f"{name} must hold integer response ids, got {responses.dtype}")
    responses = responses.long()
    if responses.numel() and int(responses.min()) < 0:
        raise LoreDataError(f"{name} holds a negative response id ({int(responses.min())})")
    return responses


def longer_wins_logits(lengths: Tensor) -> Tensor:
    """``sign(length(chosen) - length(rejected))`` per pair ``[N]``: the longer response is predicted."""
    lengths = torch.as_tensor(lengths)
    if lengths.ndim != 2 or lengths.shape[1] != 2:
        raise LoreDataError(f"lengths must be [N, 2] (chosen, rejected), got {tuple(lengths.shape)}")
    lengths = lengths.double()
    if not all_finite(lengths):
        row = int(non_finite_rows(lengths)[0])
        raise LoreDataError(f"lengths: row {row} is not finite ({lengths[row].tolist()})")
    return torch.sign(lengths[:, 0] - lengths[:, 1])


def id_space(*responses: Tensor) -> int:
    """One more than the largest response id among ``responses`` (the size of a per-response table)."""
    largest = [int(r.max()) for r in responses if r.numel()]
    return max(largest, default=-1) + 1


def win_counts(responses: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """(wins, judgments) of each response id ``[size]`` in the pairs ``responses`` ``[N, 2]``."""
    wins = torch.bincount(responses[:, 0], minlength=size).double()
    judged = torch.bincount(responses.reshape(-1), minlength=size).double()
    return wins, judged


def win_rates(responses: Tensor, size: int, smoothing: float = CROWD_SMOOTHING) -> Tensor:
    """Each response's Laplace-smoothed win-rate ``(wins + s) / (judgments + 2 s)`` ``[size]``; 0.5 if never judged."""
    wins, judged = win_counts(responses, size)
    return (wins + smoothing) / (judged + 2 * smoothing)


def crowd_logits(train_responses: Tensor, test_responses: Tensor, smoothing: float = CROWD_SMOOTHING) -> Tensor:
    """The crowd's prediction of each test pair ``[N]``: the difference of the two responses' win-rates
    in the training pairs alone. A response never judged in training has 0.5, so two unseen ones tie."""
    train_responses, test_responses = check_responses(train_responses), check_responses(test_responses)
    rates = win_rates(train_responses, id_space(train_responses, test_responses), smoothing)
    return rates[test_responses[:, 0]] - rates[test_responses[:, 1]]


def judged_in(train_responses: Tensor, test_responses: Tensor) -> Tensor:
    """``[N, 2]`` bool: whether each test pair's chosen / rejected response was judged in training."""
    train_responses, test_responses = check_responses(train_responses), check_responses(test_responses)
    _, judged = win_counts(train_responses, id_space(train_responses, test_responses))
    return judged[test_responses] > 0


def crowd_coverage(train_responses: Tensor, test_responses: Tensor) -> float | None:
    """Share of test pairs with at least one response judged in training (the rest are coin flips for the
    crowd); None without test pairs."""
    if len(test_responses) == 0:
        return None
    return float(judged_in(train_responses, test_responses).any(dim=1).double().mean())


def personal_crowd_logits(
    train_responses: Tensor,
    train_users: Tensor,
    test_responses: Tensor,
    test_users: Tensor,
    smoothing: float = CROWD_SMOOTHING,
    shrinkage: float = PERSONAL_SHRINKAGE,
) -> tuple[Tensor, Tensor]:
    """(score differences ``[N]``, personally covered ``[N]`` bool) of a per-user crowd on the test pairs.

    User u's rate of response r is their own record in their training pairs shrunk to the crowd:
    ``(wins_u(r) + shrinkage * crowd(r)) / (judgments_u(r) + shrinkage)``; it is the crowd's rate where
    u never judged r. A test pair is covered when its user judged either of its responses in training:
    only there can the per-user crowd differ from the crowd.
    """
    train_responses, test_responses = check_responses(train_responses), check_responses(test_responses)
    train_users, test_users = torch.as_tensor(train_users).long(), torch.as_tensor(test_users).long()
    if train_users.shape != (len(train_responses),) or test_users.shape != (len(test_responses),):
        raise LoreDataError("users must be [N], one per pair of responses")
    size = id_space(train_responses, test_responses)
    crowd = win_rates(train_responses, size, smoothing)
    # one key per (user, response), so a user's record is a sorted table looked up by searchsorted
    keys = torch.cat([train_users * size + train_responses[:, 0], train_users * size + train_responses[:, 1]])
    won = torch.cat([torch.ones(len(train_responses)), torch.zeros(len(train_responses))]).double()
    table, inverse, judged = torch.unique(keys, return_inverse=True, return_counts=True)
    wins = torch.zeros(table.numel(), dtype=torch.float64).index_add_(0, inverse, won)

    def rate(column: int) -> tuple[Tensor, Tensor]:
        response = test_responses[:, column]
        key = test_users * size + response
        found = torch.zeros_like(key, dtype=torch.bool)
        own_wins = own_judged = torch.zeros(len(key), dtype=torch.float64)
        if table.numel():
            position = torch.searchsorted(table, key).clamp(max=table.numel() - 1)
            found = table[position] == key
            own_wins = torch.where(found, wins[position], 0.0)
            own_judged = torch.where(found, judged[position].double(), 0.0)
        return (own_wins + shrinkage * crowd[response]) / (own_judged + shrinkage), found

    (chosen, chosen_found), (rejected, rejected_found) = rate(0), rate(1)
    return chosen - rejected, chosen_found | rejected_found


def pair_agreement(responses: Tensor, users: Tensor) -> dict[str, float | int | None]:
    """How often different users agree on the same pair of responses (Fleiss' statistics).

    A pair is the unordered set of its two responses; each user's first judgment of it counts once
    (a repeat is not another rater), pairs of one response against itself are left out. Over the pairs
    judged by at least two users: ``agreement`` is Fleiss' mean observed agreement (per pair, the share
    of pairs of judgments that agree; then the mean over pairs), ``chance`` the agreement expected from
    the overall share of wins of the lower id, ``kappa`` = (agreement - chance) / (1 - chance). None
    where no pair is shared.
    """
    responses = check_responses(responses)
    users = torch.as_tensor(users).long()
    distinct = responses[:, 0] != responses[:, 1]
    responses, users = responses[distinct], users[distinct]
    low, high = responses.min(dim=1).values, responses.max(dim=1).values
    low_won = (responses[:, 0] == low).double()
    judgments = torch.stack([users, low, high], dim=1)
    _, inverse = torch.unique(judgments, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1 if inverse.numel() else 0,), len(users), dtype=torch.long)
    first = first.scatter_reduce(0, inverse, torch.arange(len(users)), reduce="amin")
    low, high, low_won = low[first], high[first], low_won[first]
    _, pair_of, raters = torch.unique(torch.stack([low, high], dim=1), dim=0, return_inverse=True,
                                      return_counts=True)
    wins = torch.zeros(raters.numel(), dtype=torch.float64).index_add_(0, pair_of, low_won)
    shared = raters >= 2
    result: dict[str, float | int | None] = {
        "shared_pairs": int(shared.sum()),
        "judgments": int(raters[shared].sum()),
        "agreement": None,
        "chance": None,
        "kappa": None,
    }
    if not bool(shared.any()):
        return result
    n, a = raters[shared].double(), wins[shared]
    per_pair = (a * (a - 1) + (n - a) * (n - a - 1)) / (n * (n - 1))
    share = float(a.sum() / n.sum())
    chance = share**2 + (1 - share) ** 2
    agreement = float(per_pair.mean())
    result.update(agreement=agreement, chance=chance,
                  kappa=(agreement - chance) / (1 - chance) if chance < 1 else None)
    return result
