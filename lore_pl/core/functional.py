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

from lore_pl.core import cpu_kernel
from lore_pl.errors import LoreDataError

LossWeighting = Literal["pair_mean", "user_mean"]
Regularizer = Literal["none", "cosine", "l2"]


def simplex_weights(logits: Tensor, active_columns: Tensor | None = None) -> Tensor:
    """``softmax`` over the basis columns; pruned (inactive) columns get weight exactly 0."""
    if active_columns is not None:
        logits = logits.masked_fill(~active_columns, float("-inf"))
    return torch.softmax(logits, dim=-1)


GRAD_CHUNK_BYTES = 1 << 21  # block of X per step of the V gradient on CPU: 2 MiB stays in cache
UPCAST_CHUNK_BYTES = 1 << 26  # features stored in another dtype (bfloat16) are widened 64 MiB at a time


def _upcast_rows(features: Tensor, dtype: torch.dtype, block_bytes: int) -> int:
    """Rows per block of ``block_bytes`` when ``features`` are widened to ``dtype`` block by block."""
    return max(1, block_bytes // (torch.finfo(dtype).bits // 8 * max(features.shape[1], 1)))


class _Project(torch.autograd.Function):
    """``X V`` with both products laid out the way MKL runs them fast on a CPU.

    Measured on 2 cores (N=30000, d=1024, K=5): ``X @ V`` with V row-major 41 ms, with V
    column-major 15 ms; the V gradient as autograd computes it (``X^T G``) 563 ms, as ``G^T X`` 45 ms,
    as ``G^T X`` accumulated over 2 MiB blocks of rows 19-21 ms (d=4096: 202 ms at once, 88 ms in
    blocks). The features are data, never trained, so no gradient flows to them. Features stored in
    bfloat16 are widened to V's dtype block by block, never as a whole copy.
    """

    @staticmethod
    def forward(ctx, features: Tensor, basis: Tensor) -> Tensor:
        ctx.save_for_backward(features)
        if features.device.type == "cpu":
            basis = basis.t().contiguous().t()  # column-major [d, K]: a d x K copy, negligible
        if features.dtype == basis.dtype:
            return features @ basis
        rows = _upcast_rows(features, basis.dtype, UPCAST_CHUNK_BYTES)
        out = basis.new_empty(features.shape[0], basis.shape[1])
        for start in range(0, features.shape[0], rows):
            torch.matmul(features[start:start + rows].to(basis.dtype), basis, out=out[start:start + rows])
        return out

    @staticmethod
    def backward(ctx, grad_projected: Tensor):
        (features,) = ctx.saved_tensors
        grad_t = grad_projected.t()
        cpu = features.device.type == "cpu"
        rows = max(64, GRAD_CHUNK_BYTES // (features.element_size() * features.shape[1]))
        if features.dtype == grad_t.dtype and (not cpu or features.shape[0] <= rows):
            return None, (grad_t @ features).t()
        if not cpu:
            rows = _upcast_rows(features, grad_t.dtype, UPCAST_CHUNK_BYTES)
        grad_t = grad_t.contiguous()  # row-major [K, N]: its column blocks feed MKL's fast path
        grad_basis_t = grad_t.new_zeros(grad_t.shape[0], features.shape[1])
        for start in range(0, features.shape[0], rows):
            stop = start + rows
            grad_basis_t.addmm_(grad_t[:, start:stop], features[start:stop].to(grad_t.dtype))
        return None, grad_basis_t.t()


def project(features: Tensor, basis: Tensor) -> Tensor:
    """``X V``: the features in basis coordinates, ``[N, K]``. With V frozen, compute it once."""
    if features.requires_grad:
        return features.to(basis.dtype) @ basis
    return _Project.apply(features, basis)


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
    weights = preference_row_weights(users, num_users, weighting, counts, scale, logits.dtype)
    return (-F.logsigmoid(logits) * weights).sum()


def preference_row_weights(
    users: Tensor,
    num_users: int,
    weighting: LossWeighting = "pair_mean",
    counts: Tensor | None = None,
    scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Each pair's weight ``c_i`` in ``preference_loss = sum_i c_i * nll_i`` ``[N]`` (arguments as there)."""
    if weighting not in ("pair_mean", "user_mean"):
        raise ValueError(f"loss weighting must be 'pair_mean' or 'user_mean', got {weighting!r}")
    if counts is None:
        if weighting == "pair_mean":
            return torch.full(users.shape, scale / max(users.numel(), 1), dtype=dtype, device=users.device)
        counts = torch.bincount(users, minlength=num_users)
    counts = counts.to(dtype)
    if weighting == "pair_mean":
        return (scale / counts.sum()).expand(users.shape)
    return scale / counts[users]


class _UserPassLoss(torch.autograd.Function):
    """``preference_loss`` of ``pair_logits`` by the fused CPU kernel (``lore_pl/cpu_kernel.py``).

    Outputs the loss and the logits (for metrics; not differentiable). The kernel computes both
    gradients in its one pass over the features; backward only scales them.
    """

    @staticmethod
    def forward(ctx, features: Tensor, basis: Tensor, coefficients: Tensor, users: Tensor, row_weights: Tensor):
        loss, logits, grad_coefficients, grad_basis = cpu_kernel.user_pass(
            features, users, basis, coefficients, row_weights, with_basis_grad=ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_basis, grad_coefficients)
        ctx.mark_non_differentiable(logits)
        return loss, logits

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_logits: Tensor):
        grad_basis, grad_coefficients = ctx.saved_tensors
        grad_basis = grad_loss * grad_basis if ctx.needs_input_grad[1] else None
        grad_coefficients = grad_loss * grad_coefficients if ctx.needs_input_grad[2] else None
        return None, grad_basis, grad_coefficients, None, None


def pair_loss(
    features: Tensor,
    users: Tensor,
    basis: Tensor,
    weights: Tensor,
    tau: float,
    weighting: LossWeighting = "pair_mean",
    counts: Tensor | None = None,
    scale: float = 1.0,
    fused: bool = True,
) -> tuple[Tensor, Tensor]:
    """``(preference_loss(pair_logits(...)), pair_logits(...))``: a training step's loss and logits.

    With ``fused`` and float32 or bfloat16 contiguous features on the CPU, one pass of the fused
    kernel reads the features once for the loss and both gradients (``lore_pl/cpu_kernel.py``:
    4-10x faster than the PyTorch path at d=4096); elsewhere, or when no C compiler is found, the
    PyTorch path. Both give the same numbers up to float32 rounding; the logits are detached.
    """
    num_users = weights.shape[0]
    if not (fused and cpu_kernel.applies(features, basis)):
        logits = pair_logits(features, users, basis, weights, tau)
        return preference_loss(logits, users, num_users, weighting, counts, scale), logits.detach()
    row_weights = preference_row_weights(users, num_users, weighting, counts, scale)
    return _UserPassLoss.apply(features, basis, weights / tau, users, row_weights)


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


def rank_within_user(users: Tensor, order: Tensor | None = None) -> Tensor:
    """Each pair's rank among its user's pairs ``[N]``, taking pairs in ``order`` (default: as stored).

    Vectorized: a stable sort by user of ``order``, and each pair's offset in its group.
    """
    n = users.numel()
    if order is None:
        order = torch.arange(n, device=users.device)
    by_user = order[torch.sort(users[order], stable=True).indices]
    sorted_users = users[by_user]
    first_of_user = torch.ones_like(sorted_users, dtype=torch.bool)
    first_of_user[1:] = sorted_users[1:] != sorted_users[:-1]
    positions = torch.arange(n, device=users.device)
    group_start = torch.cummax(torch.where(first_of_user, positions, 0), 0).values
    rank = torch.empty_like(positions)
    rank[by_user] = positions - group_start
    return rank


def random_rank_within_user(users: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random order of each user's pairs: pair i's rank among its user's pairs ``[N]``."""
    order = torch.randperm(users.numel(), generator=generator, device="cpu").to(users.device)
    return rank_within_user(users, order)


def check_shots(shots: int | None) -> None:
    """Refuse a shots setting (pairs per user to fit on, ``None`` for all) that is not a positive count."""
    if shots is not None and shots <= 0:
        raise LoreDataError(f"shots must be a positive number of pairs per user (or null for all), got {shots}")


def sample_shots(users: Tensor, shots: int, generator: torch.Generator | None = None) -> Tensor:
    """Sorted indices of at most ``shots`` pairs per user, drawn uniformly without replacement.

    A user with fewer pairs keeps all of them.
    """
    if shots <= 0:
        raise ValueError(f"shots must be a positive number of pairs per user, got {shots}")
    if users.numel() == 0:
        return users.new_empty(0)
    return torch.nonzero(random_rank_within_user(users, generator) < shots)[:, 0]


def population_logits(seen_weights: Tensor, floor: float = 1e-6) -> Tensor:
    """Logits ``[K]`` of the seen users' mean weights: a new user's prior and starting point."""
    return seen_weights.mean(dim=0).clamp(min=floor).log()


def initial_user_logits(
    num_users: int,
    rank: int,
    init: Literal["randn", "rand", "zeros", "population"],
    generator: torch.Generator | None = None,
    prior_logits: Tensor | None = None,
) -> Tensor:
    """Free per-user logits ``[C, K]``: ``randn`` / ``rand`` as the reference initialises them,
    ``zeros`` (uniform weights), or ``population`` (every user at ``prior_logits``, the seen mean)."""
    if init == "randn":
        return torch.randn(num_users, rank, generator=generator)
    if init == "rand":
        return torch.rand(num_users, rank, generator=generator)
    if init == "zeros":
        return torch.zeros(num_users, rank)
    if init == "population":
        if prior_logits is None:
            raise ValueError("init 'population' needs the seen users' weights (a basis that has them)")
        return prior_logits.detach().cpu().float().expand(num_users, rank).clone()
    raise ValueError(f"weight init must be 'randn', 'rand', 'zeros' or 'population', got {init!r}")
