"""Phase 2, the one few-shot solver: V frozen, K logits per new user, fitted by full-batch Adam.

``FewShotModule``, the protocol, the sweeps and ``PersonalRewardModel.personalize`` all call
``adapt_users`` with a ``FewShotSettings``. Because the objective is a sum of independent per-user
terms, many users (or many virtual users: one per (shots, trial, user) of a sweep) are fitted at
once, and each gets exactly the fit it would get alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lore_pl.core.functional import (
    check_shots,
    initial_user_logits,
    preference_loss,
    projected_logits,
    rank_within_user,
    sample_shots,
    simplex_weights,
)
from lore_pl.core.stats import mean_over_users, per_user_accuracy
from lore_pl.core.threads import threads_for

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
            ``population`` (the population's mean logits, the default; uniform weights for a basis
            without users).
        prior_strength: precision of a Gaussian prior on each user's logits around the population's
            mean: the MAP fit of the user's summed NLL, so the pull fades as the user brings pairs
            (0: the reference's plain fit; see ``fewshot_loss``). ``null``: chosen on the users'
            validation pairs where there are some (``choose_prior``), else the basis's own prior.
    """

    shots: int | None = 10
    shot_seed: int = 0
    steps: int = 500
    lr: float = 0.1
    weight_init: WeightInit = "population"
    prior_strength: float | None = None

    def __post_init__(self) -> None:
        check_shots(self.shots)
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_init not in ("randn", "zeros", "population"):
            raise ValueError(f"weight_init must be 'randn', 'zeros' or 'population', got {self.weight_init!r}")
        if self.prior_strength is not None and not self.prior_strength >= 0:
            raise ValueError(
                f"prior_strength must be >= 0 (or null: chosen on validation pairs), got {self.prior_strength}"
            )

    def shot_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.shot_seed)

    def precision(self, chosen: Tensor | None) -> float | Tensor | None:
        """The prior's precision: ``prior_strength``, or where that is ``None`` the ``chosen`` one."""
        return chosen if self.prior_strength is None else self.prior_strength

    def init_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.shot_seed + 1)


def fewshot_loss(
    projected: Tensor,
    users: Tensor,
    logits: Tensor,
    tau: float,
    prior_logits: Tensor | None = None,
    prior_strength: float | Tensor = 0.0,
) -> Tensor:
    """Phase 2's objective for new users' logits ``[C, K]`` on projected pairs ``X V``.

    The sum over users of each user's mean NLL (the reference's few-shot loss: a user's fit does
    not depend on the other users), plus, for ``prior_strength`` > 0, a Gaussian prior on each
    user's logits around ``prior_logits``: ``1 / (2 m_u) * sum_k s_k (logits_uk - prior_k)^2`` with
    ``s = prior_strength`` (a number, or one per column) and m_u the user's pairs, i.e. the MAP
    objective divided by m_u. Its pull fades with more pairs.
    ``fewshot_loss_and_grad`` computes the same loss and its gradient by hand (no autograd).
    """
    num_users = logits.shape[0]
    pair = projected_logits(projected, users, simplex_weights(logits), tau)
    loss = preference_loss(pair, users, num_users, "user_mean")
    strength = _strength(prior_strength, logits, prior_logits)
    if strength is not None:
        pairs = torch.bincount(users, minlength=num_users).clamp(min=1).to(logits.dtype)
        loss = loss + (strength / (2.0 * pairs[:, None]) * (logits - prior_logits).pow(2)).sum()
    return loss


def _strength(prior_strength: float | Tensor | None, logits: Tensor, prior_logits: Tensor | None) -> Tensor | None:
    """The prior's precision as a ``[K]`` tensor, or None when there is no prior (0 or None)."""
    if prior_strength is None:
        return None
    strength = torch.as_tensor(prior_strength, dtype=logits.dtype, device=logits.device).expand(logits.shape[1])
    if bool((strength < 0).any()):
        raise ValueError(f"prior_strength must be >= 0, got {prior_strength}")
    if not bool((strength > 0).any()):
        return None
    if prior_logits is None:
        raise ValueError("a prior_strength > 0 needs prior_logits")
    return strength




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
    prior_strength: float | Tensor = 0.0,
    with_loss: bool = True,
) -> tuple[Tensor | None, Tensor]:
    """``fewshot_loss`` and its gradient in the logits, derived by hand (no autograd graph).

    Phase 2 runs hundreds of steps on tiny tensors, where building the graph costs more than the
    arithmetic; ``tests/test_functional.py`` checks this gradient against autograd's. The loss
    (``None`` unless ``with_loss``) is not needed to take a step.
    """
    return _loss_and_grad(pairs, logits, tau, prior_logits, _strength(prior_strength, logits, prior_logits), with_loss)


def _loss_and_grad(pairs: PaddedPairs, logits: Tensor, tau: float, prior_logits: Tensor | None,
                   strength: Tensor | None, with_loss: bool) -> tuple[Tensor | None, Tensor]:
    """``fewshot_loss_and_grad`` with the prior's precision already checked (``_strength``): the
    Adam loop's step, which must not re-check it (two device syncs) every time."""
    weights = torch.softmax(logits, dim=-1)
    margin = (pairs.projected * weights[:, :, None]).sum(dim=1) / tau
    loss = (F.softplus(-margin) * pairs.row_scale).sum() if with_loss else None
    # d loss / d margin = -sigmoid(-margin) / m_u; margin is linear in w with slope projected / tau
    grad_margin = torch.sigmoid(-margin).mul_(pairs.row_scale).mul_(-1.0 / tau)
    grad_weights = (pairs.projected * grad_margin[:, None, :]).sum(dim=-1)
    # back through softmax: dz = w * (dw - <w, dw>)
    grad_logits = weights * (grad_weights - (weights * grad_weights).sum(dim=-1, keepdim=True))
    if strength is not None:
        pull = strength[None, :] / pairs.pairs[:, None]
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
    prior_strength: float | Tensor = 0.0,
) -> Tensor:
    """Fit every user's logits at once by full-batch Adam on the projected pairs ``X V`` ``[N, K]``.

    The objective is ``fewshot_loss``: each user's fit is exactly what it would be alone, and
    ``prior_strength`` > 0 makes it a MAP fit around ``prior_logits``. Returns the logits ``[C, K]``.
    Adam (beta 0.9, 0.999, eps 1e-8) is written out as torch.optim.Adam computes it.
    """
    logits = init_logits.detach().clone().to(projected.device)
    if logits.shape[1] <= 1:
        return logits  # a single column always has weight 1: nothing to fit
    if prior_logits is not None:
        prior_logits = prior_logits.to(logits)
    prior_strength = _strength(prior_strength, logits, prior_logits)
    pairs = PaddedPairs.from_flat(projected.detach().to(logits.dtype), users, logits.shape[0])
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    first, second = torch.zeros_like(logits), torch.zeros_like(logits)
    # Small CPU problems run several times faster on one thread (lore_pl/core/threads.py; measured 3.7x here)
    with threads_for(pairs.projected.numel(), pairs.projected.device):
        for step in range(1, steps + 1):
            _, grad = _loss_and_grad(pairs, logits, tau, prior_logits, prior_strength, with_loss=False)
            first.lerp_(grad, 1 - beta1)
            second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (second.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
            logits.addcdiv_(first, denom, value=-lr / (1 - beta1**step))
    return logits


def adapt_users(
    projected: Tensor,
    users: Tensor,
    num_users: int,
    settings: FewShotSettings,
    tau: float,
    prior_logits: Tensor | None = None,
    init_logits: Tensor | None = None,
    prior_precision: Tensor | None = None,
) -> Tensor:
    """Phase 2: every user's logits ``[C, K]`` from their projected pairs ``X V`` ``[N, K]``.

    The start is ``init_logits`` or ``settings.weight_init`` (drawn with ``settings.init_generator()``);
    ``prior_logits`` (the population's mean logits) is the ``population`` start and the prior's
    centre. The prior's precision is ``settings.prior_strength``, or where that is ``None`` (chosen
    elsewhere) ``prior_precision`` ``[K]`` (none: no prior). For K <= 1 there is nothing to fit: the
    logits are zeros ``[C, 1]``.
    """
    rank = projected.shape[1]
    if rank <= 1:
        return projected.new_zeros(num_users, max(rank, 1))
    if init_logits is None:
        init = "zeros" if settings.weight_init == "population" and prior_logits is None else settings.weight_init
        init_logits = initial_user_logits(num_users, rank, init, settings.init_generator(), prior_logits)
    strength = settings.precision(prior_precision)
    return fit_user_weights(
        projected,
        users,
        init_logits.to(projected),
        steps=settings.steps,
        lr=settings.lr,
        tau=tau,
        prior_logits=prior_logits,
        prior_strength=0.0 if strength is None else strength,
    )


#: the priors ``choose_prior`` compares: isotropic precisions, and empirical-Bayes ones (these
#: numbers over each column's variance of the population's logits)
ISOTROPIC_PRIORS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
EMPIRICAL_PRIORS = (0.1, 0.3, 1.0, 3.0, 10.0)


def logit_variance(user_logits: Tensor, prior_logits: Tensor) -> Tensor:
    """Each column's variance ``[K]`` of the users' logits around the population's, the softmax's
    free shift removed (every logit vector centred on its mean)."""
    centred = user_logits - user_logits.mean(dim=1, keepdim=True)
    mean = prior_logits - prior_logits.mean()
    return (centred - mean).pow(2).mean(dim=0).clamp(min=1e-3)


def weights_logit_variance(user_weights: Tensor, prior_logits: Tensor) -> Tensor:
    """``logit_variance`` of users given by their weights (a basis file stores weights, not logits)."""
    return logit_variance(user_weights.clamp(min=1e-30).log(), prior_logits)


def choose_prior(
    projected: Tensor,
    users: Tensor,
    projected_val: Tensor,
    val_users: Tensor,
    num_users: int,
    settings: FewShotSettings,
    tau: float,
    prior_logits: Tensor,
    variance: Tensor | None = None,
) -> tuple[Tensor, str, list[tuple[str, float]]]:
    """The prior for new users, chosen on their validation pairs (prompts disjoint from their shots).

    Every candidate (``ISOTROPIC_PRIORS``, and ``EMPIRICAL_PRIORS`` over ``variance`` where given) is
    fitted from the ``population`` start; the best mean per-user validation accuracy wins (ties: the
    first, weakest). Returns (its precision ``[K]``, its label, every (label, accuracy)).
    """
    rank = projected.shape[1]
    candidates = [(f"isotropic {s:g}", torch.full((rank,), s)) for s in ISOTROPIC_PRIORS]
    if variance is not None:
        candidates += [(f"empirical {s:g}/variance", s / variance.float().cpu()) for s in EMPIRICAL_PRIORS]
    start = replace(settings, weight_init="population", prior_strength=None)
    curve, best = [], None
    for label, precision in candidates:
        logits = adapt_users(projected, users, num_users, start, tau, prior_logits, prior_precision=precision)
        margin = (projected_val * torch.softmax(logits, dim=-1)[val_users]).sum(-1)
        accuracy = float(mean_over_users(per_user_accuracy(margin, val_users, num_users)))
        curve.append((label, accuracy))
        if best is None or accuracy > best[0] + 1e-12:
            best = (accuracy, label, precision)
    return best[2], best[1], curve


# ------------------------------------------------------------------------ many fits as one
@dataclass
class StackedFits:
    """The pairs of many independent fits, stacked as virtual users ``fit * C + user``."""

    projected: Tensor  # [rows, K]
    users: Tensor  # [rows], virtual user ids
    num_fits: int
    num_users: int


def stack_shots(
    projected: Tensor, users: Tensor, num_users: int, shots: list[int], trials: int, generator: torch.Generator
) -> StackedFits:
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
    return mean_over_users(per_user_accuracy(logits, test_users, weights.shape[1]))


def fit_stacked(
    stacked: StackedFits,
    settings: FewShotSettings,
    tau: float,
    prior_logits: Tensor | None = None,
    prior_precision: Tensor | None = None,
) -> Tensor:
    """Fit all stacked fits at once (``adapt_users`` on the virtual users); returns weights ``[F, C, K]``."""
    logits = adapt_users(
        stacked.projected,
        stacked.users,
        stacked.num_fits * stacked.num_users,
        settings,
        tau,
        prior_logits,
        prior_precision=prior_precision,
    )
    return simplex_weights(logits).reshape(stacked.num_fits, stacked.num_users, logits.shape[1])


# ------------------------------------------------------------------------ uncertainty
def weight_covariance(
    projected: Tensor, users: Tensor, logits: Tensor, tau: float, precision: Tensor | float | None = None
) -> Tensor:
    """Each user's posterior covariance of their weights ``[C, K, K]`` by a Laplace approximation.

    The curvature of user u's MAP objective at its logits ``l_u`` (summed NLL plus the Gaussian prior
    of ``precision``) in the Gauss-Newton form, ``H_u = sum_i s_i (1 - s_i) g_i g_i^T + diag(precision)``
    with ``g_i = J_u p_i / tau`` the logit's gradient (``J_u = diag(w) - w w^T``, the softmax's
    Jacobian), gives the logits' covariance ``H_u^+``; the weights' is ``J_u H_u^+ J_u``. A user with
    few pairs keeps the prior's spread; one with many pairs is pinned down.
    """
    num_users, rank = logits.shape
    weights = torch.softmax(logits.double(), dim=-1)
    jacobian = torch.diag_embed(weights) - weights[:, :, None] * weights[:, None, :]  # [C, K, K]
    gradients = torch.bmm(jacobian[users], projected.double()[:, :, None])[:, :, 0] / tau  # [N, K]
    margin = (projected.double() * weights[users]).sum(-1) / tau
    curvature = torch.sigmoid(margin) * torch.sigmoid(-margin)
    hessian = torch.zeros(num_users, rank, rank, dtype=torch.float64)
    hessian.index_add_(0, users, curvature[:, None, None] * gradients[:, :, None] * gradients[:, None, :])
    if precision is not None:
        hessian = hessian + torch.diag_embed(torch.as_tensor(precision, dtype=torch.float64).expand(rank))
    # the softmax ignores a shift of all logits: H is singular along ones without a prior; pinv skips it
    covariance = torch.linalg.pinv(hessian, hermitian=True)
    return (jacobian @ covariance @ jacobian).to(projected.dtype if projected.is_floating_point() else torch.float32)
