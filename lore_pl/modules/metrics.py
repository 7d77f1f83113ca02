"""Per-user preference accuracy, exact under DDP."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lore_pl.core.stats import accuracy_of_counts, count_per_user, user_mean_std


class PerUserAccuracy(Metric):
    """Mean over users of each user's pairwise accuracy, and the std over users.

    The torchmetrics twin of ``lore_pl.core.stats.per_user_accuracy`` (counted by the same functions).
    A pair is correct when its logit is strictly positive (chosen scored above rejected). The
    states are per-user sums (correct, total) reduced with ``sum``, so the result is the same on
    one process and under DDP. Users with no pairs are left out of the mean and the std. The std
    is the plain population std over users (the reference code scaled it by 0.25 for its plots).
    ``compute`` returns ``{"mean", "std", "users"}``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, num_users: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_users, int) or num_users < 1:
            raise ValueError(f"num_users must be a positive int, got {num_users!r}")
        self.num_users = num_users
        self.add_state("correct", default=torch.zeros(num_users, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_users, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, users: Tensor) -> None:
        if logits.shape != users.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and users {tuple(users.shape)} must have the same shape")
        if users.numel() and (int(users.min()) < 0 or int(users.max()) >= self.num_users):
            raise ValueError(f"user index out of range [0, {self.num_users}): {int(users.min())}..{int(users.max())}")
        self.correct += count_per_user(logits > 0, users, self.num_users)
        self.total += torch.bincount(users, minlength=self.num_users)

    def per_user(self) -> Tensor:
        """Each user's accuracy, NaN for users with no pairs."""
        return accuracy_of_counts(self.correct, self.total)

    def compute(self) -> dict[str, Tensor]:
        mean, std, users = user_mean_std(self.per_user())
        return {"mean": mean, "std": std, "users": users}
