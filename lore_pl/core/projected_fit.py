"""The MAP objective of model selection in the spectral subspace, and its gradient, by hand.

Selection fits dozens of candidates by L-BFGS in the projected features ``X U`` ``[N, r]`` (r = 16):
thousands of evaluations of an objective whose arithmetic is a few hundred thousand multiply-adds. Through
autograd each evaluation cost about 5 ms of graph building and tiny kernels (issue 22: 62% of it in
``_Project``'s backward); here it is a dozen dense operations on the pairs laid out per user,
``[C, m_max, r]``, through each user's direction ``b_u = A w_u`` ``[C, r]``:

    z_ui = p_ui . b_u,   d/db_u = sum_i s_ui p_ui,   d/dA = (d/dB)^T W,   d/dW = (d/dB) A

so no ``[N, K]`` gather or scatter is built. The objective is ``estimator.map_loss``'s (the summed NLL
and the priors, divided by the pair count); ``tests/test_estimator.py`` checks value and gradient
against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lore_pl.core.functional import rank_within_user


@dataclass
class UserPairs:
    """Projected pairs per user, ``[C, m_max, r]``, zero-padded, with a ``[C, m_max]`` mask of real pairs."""

    projected: Tensor
    mask: Tensor
    num_pairs: int

    @classmethod
    def from_flat(cls, projected: Tensor, users: Tensor, num_users: int) -> UserPairs:
        rank = rank_within_user(users)
        width = max(int(rank.max()) + 1 if users.numel() else 0, 1)
        padded = projected.new_zeros(num_users, width, projected.shape[1])
        padded[users, rank] = projected
        mask = projected.new_zeros(num_users, width)
        mask[users, rank] = 1.0
        return cls(padded, mask, users.numel())


def map_objective(pairs: UserPairs, basis: Tensor, logits: Tensor | None, mean: Tensor | None, ridge: float,
                  deviation_ratio: float, prior: float) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(the MAP objective / N, its gradients in basis ``[r, K]``, logits ``[C, K]`` and mean ``[K]``);
    ``logits`` None is K = 1 (one shared direction, no prior)."""
    total = max(pairs.num_pairs, 1)
    if logits is None:
        directions = basis[:, 0].expand(pairs.projected.shape[0], -1)
    else:
        weights = torch.softmax(logits, dim=-1)
        directions = weights @ basis.t()  # b_u = A w_u, [C, r]
    margins = torch.bmm(pairs.projected, directions.unsqueeze(-1)).squeeze(-1)  # [C, m]
    loss = (F.softplus(-margins) * pairs.mask).sum() / total
    slopes = torch.sigmoid(-margins).mul_(pairs.mask).mul_(-1.0 / total)  # d loss / d margin
    grad_directions = torch.bmm(slopes.unsqueeze(1), pairs.projected).squeeze(1)  # [C, r]
    if logits is None:
        grad_basis = grad_directions.sum(0)[:, None]
        grad_logits = grad_mean = None
    else:
        grad_basis = grad_directions.t() @ weights
        grad_weights = grad_directions @ basis
        grad_logits = weights * (grad_weights - (weights * grad_weights).sum(-1, keepdim=True))  # through softmax
        offset = logits - mean
        loss = loss + 0.5 * prior * offset.pow(2).sum() / total
        grad_logits = grad_logits + (prior / total) * offset
        grad_mean = (-prior / total) * offset.sum(0)
    if deviation_ratio == 1.0 or basis.shape[1] == 1:
        loss = loss + 0.5 * ridge * basis.pow(2).sum() / total
        grad_basis = grad_basis + (ridge / total) * basis
    else:
        shared = basis.mean(dim=1, keepdim=True)
        deviations = basis - shared
        penalty = basis.shape[1] * shared.pow(2).sum() + deviation_ratio * deviations.pow(2).sum()
        loss = loss + 0.5 * ridge * penalty / total
        grad_basis = grad_basis + (ridge / total) * (shared + deviation_ratio * deviations)
    return loss, grad_basis, grad_logits, grad_mean
