"""The LoRe math, in one place. Every module, callback and script calls these functions.

Notation: ``features`` are preference differences ``x = e(chosen) - e(rejected)`` as ``[N, d]``;
``users`` is ``[N]`` (an index into a user table of size C); ``basis`` is ``V`` ``[d, K]``;
``weights`` are per-user simplex weights ``[C, K]``; the logit of pair i is
``x_i . V w_{users[i]} / tau``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

LossWeighting = Literal["pair_mean", "user_mean"]
Regularizer = Literal["none", "cosine", "l2"]


def simplex_weights(logits: Tensor, active_columns: Tensor | None = None) -> Tensor:
    """``softmax`` over the basis columns; pruned (inactive) columns get weight exactly 0."""
    if active_columns is not None:
        logits = logits.masked_fill(~active_columns, float("-inf"))
    return torch.softmax(logits, dim=-1)


def project(features: Tensor, basis: Tensor) -> Tensor:
    """``X V``: the features in basis coordinates, ``[N, K]``. With V frozen, compute it once."""
    return features @ basis


def projected_logits(projected: Tensor, users: Tensor, weights: Tensor, tau: float) -> Tensor:
    """Pair logits from projected features: ``(X V)_i . w_{u_i} / tau``. O(N K), no N x C matrix."""
    return (projected * weights[users]).sum(dim=-1) / tau


def pair_logits(features: Tensor, users: Tensor, basis: Tensor, weights: Tensor, tau: float) -> Tensor:
    """Bradley-Terry logits ``x_i . V w_{u_i} / tau`` for every pair, one vectorized expression."""
    return projected_logits(project(features, basis), users, weights, tau)


def preference_loss(
    logits: Tensor,
    users: Tensor,
    num_users: int,
    weighting: LossWeighting = "pair_mean",
    counts: Tensor | None = None,
    scale: float = 1.0,
) -> Tensor:
    """Negative log-likelihood of the observed preferences (label: chosen is preferred).

    ``pair_mean``: the mean over all pairs. ``user_mean``: the sum over users of each user's mean
    (each pair weighted by 1 / its user's pair count), as the reference's older class; with it a
    user's gradient does not depend on which other users are in the batch.

    Under data parallelism ``logits`` are one rank's shard of a step's batch: ``counts`` (``[C]``)
    are then the per-user pair counts of the WHOLE step batch, so each shard's loss is its exact
    share of the one-process loss (the shares sum to it), and ``scale`` (the world size) makes
    the MEAN over ranks, which DDP takes of the gradients, equal that sum. With ``counts=None``
    the batch is the whole step (one process).
    """
    nll = -F.logsigmoid(logits)
    if weighting not in ("pair_mean", "user_mean"):
        raise ValueError(f"loss weighting must be 'pair_mean' or 'user_mean', got {weighting!r}")
    if counts is None:
        if weighting == "pair_mean":
            return nll.mean() * scale
        counts = torch.bincount(users, minlength=num_users)
    counts = counts.to(nll.dtype)
    if weighting == "pair_mean":
        return nll.sum() * (scale / counts.sum())
    return (nll / counts[users]).sum() * scale


def shard(size: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous part of ``size`` rows split over ``world_size`` ranks.

    Disjoint, no padding, the union is every row; sizes differ by at most one (``torch.tensor_split``
    rule: the first ``size % world_size`` ranks get one more). A rank may get no rows.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    base, extra = divmod(size, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def basis_regularizer(basis: Tensor, reference_head: Tensor, kind: Regularizer) -> Tensor:
    """Pull of the basis columns towards the reference head ``V_ref`` (``[d]``).

    ``cosine``: ``mean_k (1 - cos(V[:, k], V_ref))``; ``l2``: ``sum_k ||V[:, k] - V_ref||^2``.
    """
    if kind == "cosine":
        cos = F.cosine_similarity(basis, reference_head[:, None].expand_as(basis), dim=0)
        return (1.0 - cos).mean()
    if kind == "l2":
        return (basis - reference_head[:, None]).pow(2).sum()
    if kind == "none":
        return basis.new_zeros(())
    raise ValueError(f"regularizer must be 'none', 'cosine' or 'l2', got {kind!r}")


def alpha_at(step: int, total_steps: int, alpha: float) -> float:
    """The regularizer's strength at ``step`` of ``total_steps``, as the reference ramps it.

    0 before 20% of the steps, linear from 20% to 80%, the full ``alpha`` from 80% on.
    """
    warmup_start = int(0.2 * total_steps)
    warmup_end = int(0.8 * total_steps)
    if step < warmup_start:
        return 0.0
    if step >= warmup_end:
        return float(alpha)
    return float(alpha) * (step - warmup_start) / (warmup_end - warmup_start)


def prune_mask(weights: Tensor, threshold: float) -> Tensor:
    """Basis columns to keep: column k survives iff ``max_u weights[u, k] >= threshold``."""
    return weights.max(dim=0).values >= threshold


def sample_shots(users: Tensor, shots: int, generator: torch.Generator | None = None) -> Tensor:
    """Indices of at most ``shots`` pairs per user, drawn uniformly without replacement.

    A user with fewer pairs keeps all of them. Vectorized: a random key per pair, a stable sort by
    user, and each pair's rank inside its user.
    """
    if shots <= 0:
        raise ValueError(f"shots must be a positive number of pairs per user, got {shots}")
    n = users.numel()
    if n == 0:
        return users.new_empty(0)
    random_order = torch.randperm(n, generator=generator, device="cpu").to(users.device)
    by_user = random_order[torch.sort(users[random_order], stable=True).indices]
    sorted_users = users[by_user]
    first_of_user = torch.ones_like(sorted_users, dtype=torch.bool)
    first_of_user[1:] = sorted_users[1:] != sorted_users[:-1]
    group_start = torch.cummax(torch.where(first_of_user, torch.arange(n, device=users.device), 0), 0).values
    rank_in_user = torch.arange(n, device=users.device) - group_start
    return torch.sort(by_user[rank_in_user < shots]).values


def initial_user_logits(
    num_users: int, rank: int, init: Literal["randn", "rand", "zeros"], generator: torch.Generator | None = None
) -> Tensor:
    """Free per-user logits ``[C, K]`` as the reference initialises them (``zeros``: uniform weights)."""
    if init == "randn":
        return torch.randn(num_users, rank, generator=generator)
    if init == "rand":
        return torch.rand(num_users, rank, generator=generator)
    if init == "zeros":
        return torch.zeros(num_users, rank)
    raise ValueError(f"weight init must be 'randn', 'rand' or 'zeros', got {init!r}")
