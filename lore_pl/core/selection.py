"""Which pair to ask a user next: active selection from a pool of candidate pairs.

A user's answer to pair i (responses a, b; ``p_i = V^T (e_a - e_b)``, the projected pair) is a
Bernoulli draw with ``P(a preferred) = sigmoid(f_i)``, ``f_i = p_i . w / tau``. What the project
knows about ``w`` after the pairs answered so far is the Laplace posterior of the few-shot MAP fit:
the fitted weights ``w_hat`` and their covariance ``Sigma_w`` (``fewshot.weight_covariance``; a user
with no answers has the population prior's). Three ways to pick the next pair:

- ``random``: uniformly among the pairs not yet asked (what the shots sweep has always done).
- ``uncertainty``: the pair whose predicted probability under ``w_hat`` is closest to 0.5, i.e. the
  smallest ``|p_i . w_hat|``. It ignores how unsure ``w`` is: a pair the current guess cannot decide
  may be one that no plausible ``w`` decides either (a pair orthogonal to the basis).
- ``information``: the pair whose answer carries the most information about ``w``, BALD (Houlsby et
  al., 2011, "Bayesian active learning for classification and preference learning"):
  ``I(y_i; w) = H[E_w sigmoid(f_i)] - E_w H[sigmoid(f_i)]`` (H the binary entropy, in nats). It is
  large where the posterior disagrees with itself about the answer, each plausible ``w`` being sure
  of its own answer, and zero for a pair whose answer no ``w`` changes. Under the Laplace posterior
  ``f_i`` is exactly Gaussian, ``N(p_i . w_hat / tau, p_i^T Sigma_w p_i / tau^2)``, because it is
  linear in ``w``; both expectations are then one-dimensional and computed by Gauss-Hermite
  quadrature (``QUADRATURE_NODES`` deterministic nodes), with no sampling and no further approximation.

All functions work on many users at once (flat pairs with a user index), in pure torch.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lore_pl.core.fewshot import FewShotSettings, adapt_users, weight_covariance, weights_logit_variance
from lore_pl.core.functional import simplex_weights

Selection = Literal["random", "uncertainty", "information"]
SELECTIONS: tuple[str, ...] = ("random", "uncertainty", "information")
QUADRATURE_NODES = 32


def check_selection(selection: str) -> None:
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; choose from {list(SELECTIONS)}")


@functools.lru_cache(maxsize=8)
def _hermite_rule(nodes: int) -> tuple[Tensor, Tensor]:
    """Gauss-Hermite nodes and weights for E over a standard normal, float64 (Golub-Welsch):
    ``E g(z) ~= sum_j weight_j g(node_j)``, exact for polynomials of degree < 2 * nodes."""
    k = torch.arange(1, nodes, dtype=torch.float64)
    jacobi = torch.diag(torch.sqrt(k / 2), 1) + torch.diag(torch.sqrt(k / 2), -1)
    roots, vectors = torch.linalg.eigh(jacobi)
    # physicists' rule (weight exp(-x^2)) turned into an expectation over N(0, 1)
    return roots * math.sqrt(2.0), vectors[0].pow(2)


def _binary_entropy_of_logit(logit: Tensor) -> Tensor:
    """``H(sigmoid(f))`` in nats, stable for large ``|f|``."""
    probability = torch.sigmoid(logit)
    return probability * F.softplus(-logit) + (1 - probability) * F.softplus(logit)


def _binary_entropy(probability: Tensor) -> Tensor:
    p = probability.clamp(1e-12, 1 - 1e-12)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def margin_moments(
    projected: Tensor, users: Tensor, weights: Tensor, covariance: Tensor, tau: float
) -> tuple[Tensor, Tensor]:
    """The mean and variance of each pair's logit ``f_i = p_i . w_u / tau`` under its user's
    posterior ``N(weights[u], covariance[u])``: ``[N]`` each (projected ``[N, K]``, users ``[N]``)."""
    projected = projected.double()
    mean = (projected * weights.double()[users]).sum(-1) / tau
    spread = torch.einsum("nk,nkl,nl->n", projected, covariance.double()[users], projected)
    return mean, spread.clamp(min=0) / tau**2


def uncertainty_scores(projected: Tensor, users: Tensor, weights: Tensor, tau: float) -> Tensor:
    """Higher for pairs whose predicted probability under ``weights[u]`` is closer to 0.5: ``-|f_i|``."""
    return -((projected.double() * weights.double()[users]).sum(-1) / tau).abs()


def information_scores(
    projected: Tensor, users: Tensor, weights: Tensor, covariance: Tensor, tau: float, nodes: int = QUADRATURE_NODES
) -> Tensor:
    """BALD, the mutual information (nats) between a pair's answer and the user's weights ``[N]``.

    ``f_i ~ N(mean_i, var_i)`` (``margin_moments``); ``I = H(E sigmoid(f)) - E H(sigmoid(f))`` by
    Gauss-Hermite quadrature over ``f``. At least 0 up to rounding, 0 where ``var_i`` is 0.
    """
    mean, variance = margin_moments(projected, users, weights, covariance, tau)
    roots, rule = _hermite_rule(nodes)
    logits = mean[:, None] + variance.sqrt()[:, None] * roots.to(mean.device)[None]  # [N, nodes]
    rule = rule.to(mean.device)
    predictive = (torch.sigmoid(logits) * rule).sum(-1)
    expected = (_binary_entropy_of_logit(logits) * rule).sum(-1)
    information = (_binary_entropy(predictive) - expected).clamp(min=0)
    # exactly 0 for a certain logit, not the two entropies' rounding (which would break ties at random)
    return torch.where(variance > 0, information, torch.zeros_like(information))


def selection_scores(
    selection: str,
    projected: Tensor,
    users: Tensor,
    weights: Tensor,
    covariance: Tensor | None,
    tau: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Each pair's score ``[N]`` under ``selection`` (higher: ask it sooner); ``random`` draws uniform
    scores from ``generator``."""
    check_selection(selection)
    if selection == "random":
        return torch.rand(projected.shape[0], generator=generator, dtype=torch.float64).to(projected.device)
    if selection == "uncertainty":
        return _not_nan(uncertainty_scores(projected, users, weights, tau), selection)
    if covariance is None:
        raise ValueError("selection 'information' needs the users' weight covariance")
    return _not_nan(information_scores(projected, users, weights, covariance, tau), selection)


def _not_nan(scores: Tensor, selection: str) -> Tensor:
    """A NaN score loses every comparison, so its user would silently get no pair (-1): refuse it."""
    if bool(torch.isnan(scores).any()):
        raise ValueError(f"selection {selection!r}: {int(torch.isnan(scores).sum())} pair score(s) are NaN (an "
                         "overflow of the pairs, weights, covariance or tau)")
    return scores


def best_per_user(scores: Tensor, users: Tensor, num_users: int, available: Tensor | None = None) -> Tensor:
    """For each user, the index (into the flat pairs) of their best-scoring available pair ``[C]``:
    the first such pair on ties, -1 for a user with none left."""
    count = scores.shape[0]
    available = torch.ones(count, dtype=torch.bool, device=scores.device) if available is None else available
    scores = scores.double().masked_fill(~available, -math.inf)
    best = torch.full((num_users,), -math.inf, dtype=torch.float64, device=scores.device)
    best.scatter_reduce_(0, users, scores, "amax")
    winners = available & (scores == best[users])
    positions = torch.arange(count, device=scores.device)
    first = torch.full((num_users,), count, dtype=torch.long, device=scores.device)
    first.scatter_reduce_(0, users[winners], positions[winners], "amin")
    return torch.where(first == count, torch.full_like(first, -1), first)


def posterior_precision(
    fit_precision: Tensor | float | None,
    basis_precision: Tensor | None,
    rank: int,
    user_weights: Tensor | None = None,
    prior_logits: Tensor | None = None,
) -> Tensor:
    """The prior precision ``[K]`` a user's posterior (hence ``information``) is built with.

    The fit's own prior where it has one (> 0), else the basis's, else an empirical-Bayes one (one
    over each column's variance of the stored users' logits, ``logit_variance``). A fit without a
    prior (the reference's) has an improper posterior before its first answers: every direction
    the user has not answered along would look certain, and nothing would look worth asking.
    """
    if rank <= 1:  # one column: the weight is 1 whatever the answers, there is nothing to be unsure of
        return torch.ones(max(rank, 1), dtype=torch.float64)
    for precision in (fit_precision, basis_precision):
        if precision is not None:
            precision = torch.as_tensor(precision, dtype=torch.float64).expand(rank)
            if bool((precision > 0).all()):
                return precision.clone()
    if user_weights is not None and prior_logits is not None and user_weights.shape[0] >= 2:
        variance = weights_logit_variance(user_weights.double(), prior_logits.double())
        return 1.0 / variance
    raise ValueError(
        "selection 'information' needs a prior on the users' logits: the fit has none (prior "
        "strength 0), the basis has no prior_precision and fewer than 2 users to estimate one from"
    )


def active_fits(
    projected: Tensor,
    users: Tensor,
    num_users: int,
    counts: list[int],
    selection: str,
    settings: FewShotSettings,
    tau: float,
    prior_logits: Tensor | None = None,
    prior_precision: Tensor | None = None,
    covariance_precision: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Ask every user ``max(counts)`` pairs of their pool one at a time, refitting after each answer.

    ``projected`` ``[N, K]`` is the users' pool (``users`` ``[N]``), already answered (chosen first).
    Before each question every user's posterior is their current fit (``adapt_users`` with
    ``settings`` on the pairs asked so far, from the settings' start, as ``PersonalRewardModel.observe``
    refits) with its Laplace covariance under ``covariance_precision``; the next pair is the best
    under ``selection`` among the pairs not yet asked. Returns the weights after each of ``counts``
    answers ``[len(counts), C, K]`` and the order asked ``[C, max(counts)]`` (-1 once a pool is spent).
    """
    check_selection(selection)
    if selection == "information" and covariance_precision is None:
        raise ValueError("selection 'information' needs covariance_precision (see posterior_precision)")
    if not counts or min(counts) < 1:
        raise ValueError(f"counts must be positive numbers of pairs, got {counts}")
    total = max(counts)
    asked = torch.zeros(projected.shape[0], dtype=torch.bool, device=projected.device)
    order = torch.full((num_users, total), -1, dtype=torch.long, device=projected.device)
    recorded = {}

    def fit() -> Tensor:
        return adapt_users(
            projected[asked], users[asked], num_users, settings, tau, prior_logits, prior_precision=prior_precision
        )

    logits = fit()
    for step in range(total):
        covariance = None
        if selection == "information":
            covariance = weight_covariance(projected[asked], users[asked], logits, tau, covariance_precision)
        weights = torch.softmax(logits, dim=-1)
        scores = selection_scores(selection, projected, users, weights, covariance, tau, generator)
        chosen = best_per_user(scores, users, num_users, ~asked)
        order[:, step] = chosen
        asked[chosen[chosen >= 0]] = True
        logits = fit()
        if step + 1 in counts:
            recorded[step + 1] = simplex_weights(logits)
    return torch.stack([recorded[c] for c in counts]), order
