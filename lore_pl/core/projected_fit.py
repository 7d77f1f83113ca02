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

import math
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

    @property
    def padding(self) -> int:
        return self.mask.numel() - self.num_pairs

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
    # a padding row is zero, so its margin is 0: it adds log 2 to the sum and nothing to the gradient
    loss = (F.softplus(-margins).sum() - pairs.padding * math.log(2.0)) / total
    slopes = torch.sigmoid(-margins).mul_(-1.0 / total)  # d loss / d margin
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


def minimize_lbfgs(objective, start: Tensor, max_iter: int, history_size: int = 20, tolerance_grad: float = 1e-9,
                   tolerance_change: float = 1e-12) -> Tensor:
    """``torch.optim.LBFGS(lr=1, line_search_fn="strong_wolfe")`` on a flat vector, step for step (the
    same line search, tests and constants), with its two-loop recursion on the history as matrices:
    four products and a scalar recursion in place of 4 x ``history_size`` tiny operations per
    iteration, which on the selection's small problems cost as much as the objective itself.

    ``objective(x) -> (loss as a float, gradient)``. Returns the last iterate, as torch's does."""
    from torch.optim.lbfgs import _strong_wolfe

    max_eval = max_iter * 5 // 4
    x = start.detach().clone()
    loss, grad = objective(x)
    evals = 1
    if float(grad.abs().max()) <= tolerance_grad:
        return x
    size = x.numel()
    steps = x.new_zeros(history_size, size)  # s_i, oldest first, the first `stored` rows
    changes = x.new_zeros(history_size, size)  # y_i
    stored, scale = 0, 1.0
    direction, step, previous_grad = None, 1.0, grad
    for iteration in range(1, max_iter + 1):
        if iteration == 1:
            direction = grad.neg()
        else:
            change = grad - previous_grad
            moved = direction * step
            curvature = float(change.dot(moved))
            if curvature > 1e-10:
                if stored == history_size:
                    steps = steps.roll(-1, 0)
                    changes = changes.roll(-1, 0)
                    stored -= 1
                steps[stored], changes[stored] = moved, change
                stored += 1
                scale = curvature / float(change.dot(change))
            direction = _two_loop(grad, steps[:stored], changes[:stored], scale)
        previous_grad, previous_loss = grad, loss
        step = min(1.0, 1.0 / float(grad.abs().sum())) if iteration == 1 else 1.0
        slope = float(grad.dot(direction))
        if slope > -tolerance_change:
            break

        def along(origin: Tensor, t: float, d: Tensor) -> tuple[float, Tensor]:
            return objective(origin + t * d)

        loss, grad, step, line_evals = _strong_wolfe(along, x, step, direction, loss, grad, slope,
                                                     max_ls=max_eval - evals)
        x = x + step * direction
        evals += line_evals
        if iteration == max_iter or evals >= max_eval or float(grad.abs().max()) <= tolerance_grad:
            break
        if float((direction * step).abs().max()) <= tolerance_change or abs(loss - previous_loss) < tolerance_change:
            break
    return x


def _two_loop(grad: Tensor, steps: Tensor, changes: Tensor, scale: float) -> Tensor:
    """L-BFGS's direction ``-H g`` from the history (rows oldest first). The two loops' scalars solve
    two triangular systems in ``P = S Y^T`` (``P_ii = 1 / rho_i``): the first loop's
    ``alpha_i = rho_i (-s_i . g - sum_{j>i} alpha_j P_ij)`` is ``triu(P) alpha = -S g``, the second's
    ``c_i = alpha_i - rho_i y_i . (r_0 + sum_{j<i} c_j s_j)`` is ``triu(P)^T c = diag(P) alpha - Y r_0``."""
    if steps.shape[0] == 0:
        return grad.neg().mul_(scale)
    upper = torch.triu(steps @ changes.t())
    alphas = torch.linalg.solve_triangular(upper, (steps @ grad).neg_()[:, None], upper=True)[:, 0]
    start = (grad.neg() - alphas @ changes).mul_(scale)
    right = upper.diagonal() * alphas - changes @ start
    coefficients = torch.linalg.solve_triangular(upper.t(), right[:, None], upper=False)[:, 0]
    return start + coefficients @ steps
