"""Per-user accuracy, its mean and std over users, and comparing two models on the same users: the
gain in mean per-user accuracy, with an interval.

The one definition of per-user accuracy: ``modules.metrics.PerUserAccuracy`` (the torchmetrics twin,
exact under DDP), the protocol, the few-shot prior choice and the sweeps all count through here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def count_per_user(mask: Tensor, users: Tensor, num_users: int) -> Tensor:
    """How many of each user's pairs ``mask`` holds ``[..., C]`` (int64), for ``mask`` ``[..., N]`` over the
    pairs of ``users`` ``[N]``; leading dims are independent (e.g. one row per fit of the same pairs)."""
    leading = mask.shape[:-1]
    if not leading:
        return torch.bincount(users[mask], minlength=num_users)
    fits = math.prod(leading)
    # fit f's user u is bin f * C + u: one bincount for every fit
    offsets = num_users * torch.arange(fits, device=users.device).reshape(*leading, 1)
    bins = (users + offsets)[mask]
    return torch.bincount(bins, minlength=fits * num_users).reshape(*leading, num_users)


def per_user_accuracy(logits: Tensor, users: Tensor, num_users: int, tie_credit: float = 0.0) -> Tensor:
    """Each user's fraction of pairs with a positive logit ``[..., C]`` (NaN for a user with no pairs),
    for ``logits`` ``[..., N]`` of the pairs of ``users`` ``[N]`` (leading dims: fits scored on the same pairs).

    A zero logit (no preference) counts ``tie_credit``: 0 for a model, whose exact ties are degenerate
    pairs; 0.5, a coin flip's expected score, for a rule that ties by construction (equal lengths).
    """
    correct = count_per_user(logits > 0, users, num_users).double()
    if tie_credit:
        correct += tie_credit * count_per_user(logits == 0, users, num_users).double()
    return accuracy_of_counts(correct, torch.bincount(users, minlength=num_users))


def accuracy_of_counts(correct: Tensor, total: Tensor) -> Tensor:
    """Each user's accuracy from their counts of correct and all pairs (NaN for a user with none)."""
    return correct.double() / total.double()


def mean_over_users(per_user: Tensor) -> Tensor:
    """Mean over the users ``[..., C]`` -> ``[...]`` who have pairs: a user NaN in any row is left out
    (``per_user_accuracy``'s users without pairs are NaN in every row)."""
    present = ~torch.isnan(per_user).reshape(-1, per_user.shape[-1]).any(dim=0)
    return per_user[..., present].mean(dim=-1)


def user_mean_std(per_user: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(mean, plain std, how many) over the users ``[C]`` who have pairs (NaN entries, users without any,
    left out), as tensors on ``per_user``'s device; NaN (float64) mean and std where no user has."""
    present = ~torch.isnan(per_user)
    accuracy = per_user[present]
    if accuracy.numel() == 0:
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=per_user.device)
        return nan, nan, present.sum()
    return accuracy.mean(), accuracy.std(unbiased=False), present.sum()


def mean_std_over_users(per_user: Tensor) -> tuple[float, float]:
    """Mean and plain std over the users who have pairs (NaN rows, users without any, left out);
    NaN for both where no user has."""
    mean, std, _ = user_mean_std(per_user)
    return float(mean), float(std)


def paired_bootstrap(
    model: Tensor, baseline: Tensor, samples: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Mean over users of ``model - baseline`` (per-user accuracies of the same users), and a
    ``level`` percentile interval from resampling the users with replacement ``samples`` times.

    Users where either is NaN (no pairs) are left out. Returns ``{"gain", "low", "high", "users"}``.
    """
    if model.shape != baseline.shape or model.ndim != 1:
        raise ValueError(
            f"per-user accuracies of the same users are needed, got {tuple(model.shape)} and {tuple(baseline.shape)}"
        )
    if samples < 1 or not 0 < level < 1:
        raise ValueError(f"samples must be >= 1 and level in (0, 1), got {samples} and {level}")
    difference = model.double() - baseline.double()
    difference = difference[~torch.isnan(difference)]
    if difference.numel() == 0:
        nan = float("nan")
        return {"gain": nan, "low": nan, "high": nan, "users": 0}
    generator = torch.Generator().manual_seed(seed)
    resampled = torch.randint(difference.numel(), (samples, difference.numel()), generator=generator)
    means = difference[resampled].mean(dim=1)
    tail = (1 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return {"gain": float(difference.mean()), "low": low, "high": high, "users": int(difference.numel())}
