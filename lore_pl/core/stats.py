"""Comparing two models on the same users: the gain in mean per-user accuracy, with an interval."""

from __future__ import annotations

import torch
from torch import Tensor


def per_user_accuracy(logits: Tensor, users: Tensor, num_users: int, tie_credit: float = 0.0) -> Tensor:
    """Each user's fraction of pairs with a positive logit ``[C]`` (NaN for a user with no pairs).

    A zero logit (no preference) counts ``tie_credit``: 0 for a model, whose exact ties are degenerate
    pairs; 0.5, a coin flip's expected score, for a rule that ties by construction (equal lengths).
    """
    correct = torch.bincount(users[logits > 0], minlength=num_users).double()
    if tie_credit:
        correct += tie_credit * torch.bincount(users[logits == 0], minlength=num_users).double()
    total = torch.bincount(users, minlength=num_users).double()
    return correct / total


def mean_std_over_users(per_user: Tensor) -> tuple[float, float]:
    """Mean and plain std over the users who have pairs (NaN rows, users without any, left out);
    NaN for both where no user has."""
    per_user = per_user[~torch.isnan(per_user)]
    if per_user.numel() == 0:
        return float("nan"), float("nan")
    return float(per_user.mean()), float(per_user.std(unbiased=False))


def paired_bootstrap(model: Tensor, baseline: Tensor, samples: int = 2000, level: float = 0.95,
                     seed: int = 0) -> dict[str, float]:
    """Mean over users of ``model - baseline`` (per-user accuracies of the same users), and a
    ``level`` percentile interval from resampling the users with replacement ``samples`` times.

    Users where either is NaN (no pairs) are left out. Returns ``{"gain", "low", "high", "users"}``.
    """
    if model.shape != baseline.shape or model.ndim != 1:
        raise ValueError(f"per-user accuracies of the same users are needed, got {tuple(model.shape)} and "
                         f"{tuple(baseline.shape)}")
    if samples < 1 or not 0 < level < 1:
        raise ValueError(f"samples must be >= 1 and level in (0, 1), got {samples} and {level}")
    difference = (model.double() - baseline.double())
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
