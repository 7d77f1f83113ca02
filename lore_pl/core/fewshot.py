"""Phase 2, the one few-shot solver: V frozen, K logits per new user, fitted by full-batch Adam.

``FewShotModule``, the protocol, the sweeps and ``PersonalRewardModel.personalize`` all call
``adapt_users`` with a ``FewShotSettings``. Because the objective is a sum of independent per-user
terms, many users (or many virtual users: one per (shots, trial, user) of a sweep) are fitted at
once, and each gets exactly the fit it would get alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lore_pl.core.functional import (
    initial_user_logits,
    preference_loss,
    projected_logits,
    rank_within_user,
    sample_shots,
    simplex_weights,
)
from lore_pl.errors import LoreDataError

WeightInit = Literal["randn", "zeros", "population"]


@dataclass(frozen=True)
class FewShotSettings:
    """How new users are adapted to a frozen basis (phase 2).

    Args:
        shots: pairs per user to fit on, drawn at random (``null``: all of the user's pairs).
        shot_seed: seed of the shots subsample; the initial logits use ``shot_seed + 1``.
        steps: full-batch Adam steps (500 in the reference).
        lr: Adam learning rate (0.1 in the reference, 0.5 on PRISM).
        weight_init: initial logits: ``randn`` (the reference), ``zeros`` (uniform weights) or
            ``population`` (the seen users' mean weights).
        prior_strength: Gaussian pull of each user's logits towards the seen users' mean, divided by
            the user's pair count (0: the reference's plain fit; see ``fewshot_loss``).
    """

    shots: int | None = 10
    shot_seed: int = 0
    steps: int = 500
    lr: float = 0.1
    weight_init: WeightInit = "randn"
    prior_strength: float = 0.0

    def __post_init__(self) -> None:
        if self.shots is not None and self.shots <= 0:
            raise LoreDataError(f"shots must be a positive number of pairs per user (or null for all), got {self.shots}")
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_init not in ("randn", "zeros", "population"):
            raise ValueError(f"weight_init must be 'randn', 'zeros' or 'population', got {self.weight_init!r}")
        if not self.prior_strength >= 0:
            raise ValueError(f"prior_strength must be >= 0, got {self.prior_strength}")

    def shot_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.shot_seed)

    def init_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.shot_seed + 1)


def fewshot_loss(
    projected: Tensor,
    users: Tensor,
    logits: Tensor,
    tau: float,
    prior_logits: Tensor | None = None,
    prior_strength: float = 0.0,
) -> Tensor:
    """Phase 2's objective for new users' logits ``[C, K]`` on projected pairs ``X V``.

    The sum over users of each user's mean NLL (the reference's few-shot loss: a user's fit does
    not depend on the other users), plus, for ``prior_strength`` > 0, a Gaussian prior on each
    user's logits around ``prior_logits``: ``prior_strength / (2 m_u) * ||logits_u - prior||^2``
    with m_u the user's pairs, i.e. the MAP objective divided by m_u. Its pull fades with more pairs.
    ``fewshot_loss_and_grad`` computes the same loss and its gradient by hand (no autograd).
    """
    num_users = logits.shape[0]
    pair = projected_logits(projected, users, simplex_weights(logits), tau)
    loss = preference_loss(pair, users, num_users, "user_mean")
    if prior_strength > 0:
        if prior_logits is None:
            raise ValueError("a prior_strength > 0 needs prior_logits")
        counts = torch.bincount(users, minlength=num_users)
        pairs = counts.clamp(min=1).to(logits.dtype)
        loss = loss + ((prior_strength / (2.0 * pairs))[:, None] * (logits - prior_logits).pow(2)).sum()
    return loss


SMALL_PROBLEM = 1 << 21  # padded elements under which a few-shot fit runs on one CPU thread


@dataclass
class PaddedPairs:
    """Projected pairs laid out per user, ``[C, K, m_max]``, zero-padded, for dense few-shot steps.

    Dense per-user products replace the gather and scatter of a flat ``[N, K]`` layout, which on a
    CPU cost far more than the arithmetic of a K-parameter fit; pairs last, so each reduction runs
    over contiguous memory (measured 2-5x faster than einsum/bmm on 2 cores).
    """

    projected: Tensor  # [C, K, m_max]
    row_scale: Tensor  # [C, m_max]: 1 / m_u on real pairs, 0 on padding
    pairs: Tensor  # [C]: m_u, at least 1 (users with no pairs feel only the prior)

    @classmethod
    def from_flat(cls, projected: Tensor, users: Tensor, num_users: int) -> PaddedPairs:
        rank = rank_within_user(users)
        per_user = torch.bincount(users, minlength=num_users)
        width = max(int(per_user.max()) if users.numel() else 0, 1)
        padded = projected.new_zeros(num_users, width, projected.shape[1])
        padded[users, rank] = projected
        padded = padded.transpose(1, 2).contiguous()
        pairs = per_user.clamp(min=1).to(projected.dtype)
        row_scale = projected.new_zeros(num_users, width)
        row_scale[users, rank] = 1.0 / pairs[users]
        return cls(padded, row_scale, pairs)


def fewshot_loss_and_grad(
    pairs: PaddedPairs,
    logits: Tensor,
    tau: float,
    prior_logits: Tensor | None = None,
    prior_strength: float = 0.0,
    with_loss: bool = True,
) -> tuple[Tensor | None, Tensor]:
    """``fewshot_loss`` and its gradient in the logits, derived by hand (no autograd graph).

    Phase 2 runs hundreds of steps on tiny tensors, where building the graph costs more than the
    arithmetic; ``tests/test_functional.py`` checks this gradient against autograd's. The loss
    (``None`` unless ``with_loss``) is not needed to take a step.
    """
    weights = torch.softmax(logits, dim=-1)
    margin = (pairs.projected * weights[:, :, None]).sum(dim=1) / tau
    loss = (F.softplus(-margin) * pairs.row_scale).sum() if with_loss else None
    # d loss / d margin = -sigmoid(-margin) / m_u; margin is linear in w with slope projected / tau
    grad_margin = torch.sigmoid(-margin).mul_(pairs.row_scale).mul_(-1.0 / tau)
    grad_weights = (pairs.projected * grad_margin[:, None, :]).sum(dim=-1)
    # back through softmax: dz = w * (dw - <w, dw>)
    grad_logits = weights * (grad_weights - (weights * grad_weights).sum(dim=-1, keepdim=True))
    if prior_strength > 0:
        if prior_logits is None:
            raise ValueError("a prior_strength > 0 needs prior_logits")
        pull = (prior_strength / pairs.pairs)[:, None]
        offset = logits - prior_logits
        if with_loss:
            loss = loss + (0.5 * pull * offset.pow(2)).sum()
        grad_logits = grad_logits + pull * offset
    return loss, grad_logits


def fit_user_weights(
    projected: Tensor,
    users: Tensor,
    init_logits: Tensor,
    *,
    steps: int = 500,
    lr: float = 0.1,
    tau: float = 100.0,
    prior_logits: Tensor | None = None,
    prior_strength: float = 0.0,
) -> Tensor:
    """Fit every user's logits at once by full-batch Adam on the projected pairs ``X V`` ``[N, K]``.

    The objective is ``fewshot_loss``: each user's fit is exactly what it would be alone, and
    ``prior_strength`` > 0 makes it a MAP fit around ``prior_logits``. Returns the logits ``[C, K]``.
    Adam (beta 0.9, 0.999, eps 1e-8) is written out as torch.optim.Adam computes it.
    """
    logits = init_logits.detach().clone().to(projected.device)
    if logits.shape[1] <= 1:
        return logits  # a single column always has weight 1: nothing to fit
    if prior_strength < 0:
        raise ValueError(f"prior_strength must be >= 0, got {prior_strength}")
    if prior_logits is not None:
        prior_logits = prior_logits.to(logits)
    pairs = PaddedPairs.from_flat(projected.detach().to(logits.dtype), users, logits.shape[0])
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    first, second = torch.zeros_like(logits), torch.zeros_like(logits)
    # Small CPU problems run several times faster on one thread: each step is a handful of
    # microsecond-sized ops, and waking a second thread costs more than it saves (measured 3.7x).
    threads = torch.get_num_threads()
    if pairs.projected.device.type == "cpu" and pairs.projected.numel() < SMALL_PROBLEM:
        torch.set_num_threads(1)
    try:
        for step in range(1, steps + 1):
            _, grad = fewshot_loss_and_grad(pairs, logits, tau, prior_logits, prior_strength, with_loss=False)
            first.lerp_(grad, 1 - beta1)
            second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (second.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
            logits.addcdiv_(first, denom, value=-lr / (1 - beta1**step))
    finally:
        torch.set_num_threads(threads)
    return logits


def adapt_users(
    projected: Tensor,
    users: Tensor,
    num_users: int,
    settings: FewShotSettings,
    tau: float,
    prior_logits: Tensor | None = None,
    init_logits: Tensor | None = None,
) -> Tensor:
    """Phase 2: every user's logits ``[C, K]`` from their projected pairs ``X V`` ``[N, K]``.

    The start is ``init_logits`` or ``settings.weight_init`` (drawn with ``settings.init_generator()``);
    ``prior_logits`` (the seen users' mean, ``population_logits``) is the ``population`` start and
    the prior's centre. For K <= 1 there is nothing to fit: the logits are zeros ``[C, 1]``.
    """
    rank = projected.shape[1]
    if rank <= 1:
        return projected.new_zeros(num_users, max(rank, 1))
    if init_logits is None:
        if settings.weight_init == "population" and prior_logits is None:
            raise LoreDataError("weight_init 'population' needs the seen users' weights (a basis that has them)")
        init_logits = initial_user_logits(num_users, rank, settings.weight_init, settings.init_generator(), prior_logits)
    return fit_user_weights(projected, users, init_logits.to(projected), steps=settings.steps, lr=settings.lr, tau=tau,
                            prior_logits=prior_logits, prior_strength=settings.prior_strength)


# ------------------------------------------------------------------------ many fits as one
@dataclass
class StackedFits:
    """The pairs of many independent fits, stacked as virtual users ``fit * C + user``."""

    projected: Tensor  # [rows, K]
    users: Tensor  # [rows], virtual user ids
    num_fits: int
    num_users: int


def stack_shots(projected: Tensor, users: Tensor, num_users: int, shots: list[int], trials: int,
                generator: torch.Generator) -> StackedFits:
    """For every (shots, trial), in that order, a fresh ``shots``-per-user subsample of the pool."""
    rows, virtual = [], []
    for fit, shot_count in enumerate(s for s in shots for _ in range(trials)):
        kept = sample_shots(users, shot_count, generator)
        rows.append(kept)
        virtual.append(users[kept] + fit * num_users)
    index = torch.cat(rows)
    return StackedFits(projected[index], torch.cat(virtual), len(shots) * trials, num_users)


def per_fit_accuracy(projected_test: Tensor, test_users: Tensor, weights: Tensor, tau: float) -> Tensor:
    """Mean over users of per-user test accuracy for each fit: ``weights`` ``[F, C, K]`` -> ``[F]``.

    Users without test pairs are left out, as in ``PerUserAccuracy``.
    """
    logits = torch.einsum("nk,fnk->fn", projected_test, weights[:, test_users]) / tau
    num_fits, num_users = weights.shape[:2]
    correct = torch.zeros(num_fits, num_users, dtype=torch.float64, device=logits.device)
    correct.index_add_(1, test_users, (logits > 0).double())
    total = torch.bincount(test_users, minlength=num_users).double()
    present = total > 0
    return (correct[:, present] / total[present]).mean(dim=1)


def fit_stacked(stacked: StackedFits, settings: FewShotSettings, tau: float, prior_logits: Tensor | None = None) -> Tensor:
    """Fit all stacked fits at once (``adapt_users`` on the virtual users); returns weights ``[F, C, K]``."""
    logits = adapt_users(stacked.projected, stacked.users, stacked.num_fits * stacked.num_users, settings, tau,
                         prior_logits)
    return simplex_weights(logits).reshape(stacked.num_fits, stacked.num_users, logits.shape[1])
